"""The launcher's data preflight: every bad local file is named, with its row or
column and the fix, before Flower starts; headerless CSV/TSV files load with
``data.header=false`` exactly as the same file with a header."""

from __future__ import annotations

import dataclasses
import gzip
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import fedlora.data as fd
from fedlora.config import DataConfig
from fedlora.config.flat import ConfigError, build_config
from fedlora.data import preflight
from fedlora.data.preflight import check_data_file, check_data_files, first_bad_byte

ROOT = Path(__file__).resolve().parents[2]
SENTENCES = [
    "hide new secretions from the parental units",
    "contains no wit , only labored gags",
    "that loves its characters and communicates something rather beautiful",
    "remains utterly satisfied to remain the same throughout",
    "on the worst revenge-of-the-nerds clichés the filmmakers could dredge up",
    "that 's far too tragic to merit such superficial treatment",
]
LABELS = [0, 0, 1, 0, 0, 1]


def _cfg(path: Path | str, **kw: Any) -> DataConfig:
    kw = {"num_classes": 2, "partitioner": "iid", **kw}
    return DataConfig(source="local", path=str(path), **kw)


def _tsv(path: Path, header: bool = True) -> Path:
    """GLUE-style SST-2 rows (tab-separated, no quoting), with or without header."""
    rows = [f"{s}\t{y}" for s, y in zip(SENTENCES, LABELS, strict=True)]
    path.write_text("\n".join((["sentence\tlabel"] if header else []) + rows) + "\n")
    return path


def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


# name -> (file name, content, DataConfig overrides, what the message must say)
BAD: dict[str, tuple[str, str | bytes, dict[str, Any], list[str]]] = {
    "not utf-8 (Latin-1)": (
        "latin1.csv",
        b"text,label\ncaf\xe9 au lait,1\n",
        {},
        [
            "not valid UTF-8: byte 0xe9 at offset 14 (line 2)",
            "re-save the file as UTF-8",
        ],
    ),
    "random bytes": (
        "noise.tsv",
        bytes(range(256)) * 4,
        {},
        ["not a text file: byte 0x00 at offset 0 (line 1) is a NUL byte"],
    ),
    "a gzip archive": (
        "blob.csv",
        gzip.compress(b"text,label\na,1\n", mtime=0),
        {},
        ["not CSV", "the bytes b'\\x1f\\x8b' of a gzip archive; decompress it"],
    ),
    "UTF-16 text": (
        "excel.tsv",
        "text\tlabel\nsome words\t1\n".encode("utf-16"),
        {},
        ["not TSV", "UTF-16 text", "re-save it as UTF-8"],
    ),
    "invalid UTF-8 late in the file": (
        "late.tsv",
        b"text\tlabel\n" + b"fine words\t1\n" * 3 + b"bad \xc3(\t0\n",
        {},
        ["not valid UTF-8: byte 0xc3 at offset 54 (line 5)"],
    ),
    "NUL bytes": (
        "nul.jsonl",
        b'{"text": "a", "label": 0}\n\x00\x00\x00\n',
        {},
        ["not a text file", "offset 26 (line 2) is a NUL byte"],
    ),
    "unparseable CSV": (
        "quote.csv",
        'text,label\n"never closed,1\nb,0\n',
        {},
        ["cannot be read as CSV", "EOF inside string", "export it again as CSV"],
    ),
    "more fields than the header": (
        "fields.csv",
        "text,label\na, b,1\nc,0\n",
        {},
        [
            "rows have 3 fields but the header row has 2 columns",
            "quote fields that contain the separator",
        ],
    ),
    "unparseable JSON lines": (
        "junk.jsonl",
        "this is not json\n",
        {},
        [
            "cannot be read as JSON lines",
            "one object per line",
            "export it again as JSON lines",
        ],
    ),
    "not parquet": (
        "junk.parquet",
        b"this is not a parquet file",
        {},
        ["cannot be read as Parquet", "magic bytes"],
    ),
    "empty file": ("empty.csv", b"", {}, ["the file is empty (0 bytes)"]),
    "header only": (
        "header.csv",
        "text,label\n",
        {},
        ["no data rows, only the header ['text', 'label']"],
    ),
    "named column absent": (
        "cols.csv",
        "body,label\nsome words here,1\n",
        {},
        [
            "column 'text' (data.text_column) is missing",
            "the columns are ['body', 'label']",
            "set data.text_column=<one of them>",
        ],
    ),
    "label column absent": (
        "nolabel.jsonl",
        '{"text": "a", "y": 1}\n',
        {},
        ["column 'label' (data.label_column) is missing", "['text', 'y']"],
    ),
    "non-integer labels": (
        "float.csv",
        "text,label\na,0\nb,1.5\nc,1\n",
        {},
        ["not integers (data row 2, value 1.5)", "use integer class ids in [0, 2)"],
    ),
    "negative labels": (
        "neg.csv",
        "text,label\na,0\nb,-1\nc,1\n",
        {},
        ["labels [-1] are outside [0, 2) (data row 2)", "raise data.num_classes"],
    ),
    "more classes than data.num_classes": (
        "wide.csv",
        "text,label\na,0\nb,1\nc,4\nd,4\n",
        {},
        ["labels [4] are outside [0, 2) (data rows 3, 4 (2 rows))"],
    ),
    "more string classes than data.num_classes": (
        "names.jsonl",
        "".join(f'{{"text": "t", "label": "{n}"}}\n' for n in ["pos", "neg", "mid"]),
        {},
        ["3 distinct string labels ['mid', 'neg', 'pos'] but data.num_classes=2"],
    ),
    "empty label": (
        "gap.csv",
        "text,label\na,0\nb,\nc,1\n",
        {},
        ["some rows have no label (data row 2)", "fill them in or drop"],
    ),
    "header=false on a file with a header": (
        "has_header.tsv",
        "sentence\tlabel\nsome words here\t1\n",
        {"header": False, "columns": ("sentence", "label"), "text_column": "sentence"},
        ["data.header=false but the first row", "the file has a header row"],
    ),
    "header=false, fewer names than fields": (
        "three.tsv",
        "some words here\t1\textra\n",
        {"header": False, "columns": ("text", "label")},
        ["rows have 3 fields but data.columns names 2 columns ['text', 'label']"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_bad_file_kind_is_named_with_the_problem(
    tmp_path: Path, case: str
) -> None:
    name, content, overrides, needles = BAD[case]
    path = _write(tmp_path / name, content)
    with pytest.raises(ConfigError) as err:
        check_data_files(_cfg(path, **overrides))
    msg = str(err.value)
    assert msg.startswith(f"data.path={path}: "), msg
    for needle in needles:
        assert needle in msg, msg


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "train.tsv"
    with pytest.raises(ConfigError, match="no such file") as err:
        check_data_files(_cfg(path))
    assert f"data.path={path}" in str(err.value)
    with pytest.raises(ConfigError, match=r"relative to .*; give the path"):
        check_data_files(_cfg("no-such-relative-file.csv"))


def test_a_headerless_file_is_recognised_and_the_fix_named(tmp_path: Path) -> None:
    path = _tsv(tmp_path / "train.tsv", header=False)
    with pytest.raises(ConfigError) as err:
        check_data_files(_cfg(path, text_column="sentence"))
    msg = str(err.value)
    assert f"data.path={path}" in msg
    assert "no column 'sentence' (data.text_column), 'label' (data.label_column)" in msg
    assert "seems to have no header row" in msg
    assert f"its first row ['{SENTENCES[0]}', '0'] looks like data" in msg
    assert "(a sentence, a number)" in msg
    assert "set data.header=false data.columns=[sentence,label]" in msg
    # The suggestion follows the file's column order.
    flipped = _write(tmp_path / "flipped.csv", "1,a good and kind film\n0,bad one\n")
    with pytest.raises(ConfigError, match=r"data\.columns=\[label,text\]"):
        check_data_files(_cfg(flipped))


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
def test_a_good_file_passes_and_counts_its_rows(tmp_path: Path, ext: str) -> None:
    frame = pd.DataFrame({"sentence": SENTENCES, "label": LABELS})
    path = tmp_path / f"good{ext}"
    if ext == ".csv":
        frame.to_csv(path, index=False)
    elif ext == ".tsv":
        _tsv(path)
    elif ext == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_json(path, orient="records", lines=ext == ".jsonl")
    cfg = _cfg(path, text_column="sentence")
    check_data_files(cfg)
    assert check_data_file("data.path", str(path), cfg) == len(SENTENCES)


def test_string_labels_and_causal_files_pass(tmp_path: Path) -> None:
    names = _write(tmp_path / "n.csv", "text,label\na,pos\nb,neg\n")
    check_data_files(_cfg(names))
    alpaca = _write(tmp_path / "a.jsonl", '{"instruction": "add", "output": "3"}\n')
    check_data_files(_cfg(alpaca, task="causal_lm"))


def test_the_test_path_is_checked_the_same_way(tmp_path: Path) -> None:
    train = _tsv(tmp_path / "train.tsv")
    dev = _write(tmp_path / "dev.tsv", b"sentence\tlabel\nna\xefve\t1\n")
    cfg = _cfg(train, text_column="sentence", test_path=str(dev))
    with pytest.raises(ConfigError) as err:
        check_data_files(cfg)
    assert str(err.value).startswith(f"data.test_path={dev}: not valid UTF-8")
    check_data_files(dataclasses.replace(cfg, test_path=str(train)))
    # data.test_path is a local file for every source (the held-out set).
    synthetic = DataConfig(test_path=str(tmp_path / "gone.csv"))
    with pytest.raises(ConfigError, match=r"data\.test_path=.*gone\.csv: no such"):
        check_data_files(synthetic)


def test_hub_and_synthetic_sources_read_no_file() -> None:
    check_data_files(DataConfig())
    check_data_files(DataConfig(source="hf", path="no/such-dataset"))
    assert preflight.data_files(DataConfig(source="hf", path="x/y")) == []


def test_headerless_file_loads_the_same_rows_as_with_a_header(
    tmp_path: Path,
) -> None:
    """data.header=false + data.columns: the clients' loaders (partitions, held-out
    set, a site's own file) give exactly the rows of the file with a header."""
    with_header = _cfg(_tsv(tmp_path / "h.tsv"), text_column="sentence")
    headerless = _cfg(
        _tsv(tmp_path / "n.tsv", header=False),
        text_column="sentence",
        header=False,
        columns=("sentence", "label"),
        test_fraction=0.34,
    )
    with_header = dataclasses.replace(with_header, test_fraction=0.34)
    check_data_files(headerless)

    def rows(cfg: DataConfig) -> list[dict[str, Any]]:
        parts = [
            fd.load_partition(cfg, seed=3, partition_id=p, num_partitions=2)
            for p in range(2)
        ]
        site = fd.load_partition(
            cfg, seed=3, partition_id=0, num_partitions=1, path_override=cfg.path
        )
        sets = [fd.load_heldout(cfg, seed=3), *parts, site]
        return [ds.to_dict() for ds in sets]

    got = rows(headerless)
    assert got == rows(with_header)
    assert got[-1] == {"text": SENTENCES, "label": LABELS}  # the whole file, in order


def test_header_and_columns_are_validated_with_the_fix() -> None:
    cases = [
        ({"header": False}, "data.header=false needs data.columns"),
        ({"columns": ("text", "label")}, "set data.header=false too"),
        (
            {"header": False, "columns": ("text", "y")},
            "has no 'label' (data.label_column)",
        ),
        ({"header": False, "columns": ("text", "label", "text")}, "distinct"),
        (
            {"header": False, "columns": ("text", "label"), "path": "d.jsonl"},
            "data.header=false is for CSV/TSV files, not data.path='d.jsonl'",
        ),
    ]
    for overrides, needle in cases:
        with pytest.raises(ConfigError, match=re.escape(needle)):
            _cfg(overrides.pop("path", "d.csv"), **overrides)
    flat = {"data.source": "local", "data.path": "d.tsv", "data.header": "false"}
    cfg = build_config(DataConfig, {**flat, "data.columns": "label,text"}, "data.")
    assert (cfg.header, cfg.columns) == (False, ("label", "text"))


def test_the_utf8_scan_reads_in_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offsets and lines are right when a character or the bad byte straddles a
    block boundary."""
    monkeypatch.setattr(preflight, "_BLOCK", 3)
    good = _write(tmp_path / "g.csv", "é\nçé€\n" * 5)
    assert first_bad_byte(good) is None
    text = ("é\nçé€\n" * 3).encode()
    bad = _write(tmp_path / "b.csv", text + b"ab\xff\n")
    found = first_bad_byte(bad)
    assert found == preflight.BadByte(len(text) + 2, 7, 0xFF, "utf-8")


def test_the_preflight_imports_no_torch_datasets_or_flower(tmp_path: Path) -> None:
    """The launcher's check stays fast: pandas only."""
    path = _tsv(tmp_path / "t.tsv")
    code = (
        "import sys\n"
        "from fedlora.config import DataConfig\n"
        "from fedlora.data.preflight import check_data_files\n"
        f"check_data_files(DataConfig(source='local', path={str(path)!r}, "
        "text_column='sentence', num_classes=2))\n"
        "heavy = ('torch', 'flwr', 'transformers', 'datasets')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""
