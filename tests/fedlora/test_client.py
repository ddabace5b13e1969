"""Client round logic without Flower: what is trained, sent, and reproducible."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_configs import tiny_config

from fedlora.cache import model_bundle
from fedlora.client.round import evaluate_round, train_round
from fedlora.client.site import SiteConfig
from fedlora.config.flat import build_config
from fedlora.lora.state import adapter_state
from strategies.config import ExperimentConfig

CFG = tiny_config(
    "causal_lm",
    {
        "data.num_examples": 400,
        "federation.clients": 2,
        "federation.local_steps": 3,
        "train.batch_size": 4,
    },
)


@pytest.fixture(scope="module")
def initial() -> dict[str, torch.Tensor]:
    return adapter_state(model_bundle(CFG).model)


def test_train_round_sends_every_trained_tensor_and_nothing_else(initial) -> None:  # type: ignore[no-untyped-def]
    out = train_round(CFG, SiteConfig(0, 2), 1, initial)
    assert set(out.state) == set(initial)
    assert all(out.state[k].shape == initial[k].shape for k in initial)
    changed = [k for k in initial if not torch.equal(out.state[k], initial[k])]
    assert changed and all(".lora_" in k for k in changed)
    assert out.result.steps == 3 and out.num_examples > 0


def test_train_round_is_reproducible_and_starts_from_the_global_state(initial) -> None:  # type: ignore[no-untyped-def]
    a = train_round(CFG, SiteConfig(1, 2), 2, initial)
    train_round(
        CFG, SiteConfig(0, 2), 1, initial
    )  # the cached model is reused in between
    b = train_round(CFG, SiteConfig(1, 2), 2, initial)
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert a.result.loss == b.result.loss


def test_data_order_depends_on_the_round(initial) -> None:  # type: ignore[no-untyped-def]
    a = train_round(CFG, SiteConfig(0, 2), 1, initial)
    b = train_round(CFG, SiteConfig(0, 2), 2, initial)
    assert a.result.loss != b.result.loss


def test_evaluate_round_reports_perplexity(initial) -> None:  # type: ignore[no-untyped-def]
    result = evaluate_round(CFG, SiteConfig(0, 2), initial)
    assert result.accuracy is None and result.perplexity is not None
    assert result.perplexity == pytest.approx(
        torch.tensor(result.loss).exp().item(), rel=1e-6
    )


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_local_file_with_custom_columns_trains(tmp_path, suffix: str) -> None:  # type: ignore[no-untyped-def]
    """data=local reads the file's own column names and trains on its rows."""
    import json

    from fedlora.data import load_partition

    rows = [
        {
            "sentence": f"the film number {i} was {'great' if i % 2 else 'dull'}",
            "sentiment": "pos" if i % 2 else "neg",
        }
        for i in range(120)
    ]
    path = tmp_path / f"train{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        sep = "," if suffix == ".csv" else "\t"
        lines = [f"sentence{sep}sentiment"] + [
            f"{r['sentence']}{sep}{r['sentiment']}" for r in rows
        ]
        path.write_text("\n".join(lines) + "\n")
    cfg = build_config(
        ExperimentConfig,
        {
            "model.name": "tiny_llama",
            "model.tiny_hidden_size": 64,
            "data.source": "local",
            "data.path": str(path),
            "data.text_column": "sentence",
            "data.label_column": "sentiment",
            "data.num_classes": 2,
            "data.partitioner": "iid",
            "federation.clients": 2,
            "federation.local_steps": 2,
            "train.batch_size": 8,
        },
    )
    part = load_partition(cfg.data, seed=cfg.seed, partition_id=0, num_partitions=2)
    texts = {r["sentence"] for r in rows}
    assert len(part) > 0 and all(t in texts for t in part["text"])
    assert set(part["label"]) <= {0, 1}
    initial = adapter_state(model_bundle(cfg).model)
    out = train_round(cfg, SiteConfig(0, 2), 1, initial)
    assert out.num_examples == len(part)
    assert torch.isfinite(torch.tensor(out.result.loss))
    assert any(not torch.equal(out.state[k], initial[k]) for k in initial)


def test_site_rank_comes_from_node_config_then_client_ranks() -> None:
    from fedlora.client.round import site_rank
    from fedlora.client.site import SiteConfig
    from fedlora.config import AdapterConfig, ClientConfig, FederationConfig
    from fedlora.config.flat import ConfigError

    cfg = ClientConfig(
        adapter=AdapterConfig(rank=16),
        federation=FederationConfig(client_ranks=(4, 8, 16)),
    )
    assert [site_rank(cfg, SiteConfig(i, 8)) for i in range(4)] == [4, 8, 16, 4]
    assert site_rank(cfg, SiteConfig(0, 8, rank=12)) == 12
    with pytest.raises(ConfigError, match="rank 32 exceeds adapter.rank=16"):
        site_rank(cfg, SiteConfig(0, 8, rank=32))


def test_a_site_refuses_a_base_model_other_than_the_servers() -> None:
    import dataclasses

    from fedlora.client.round import check_base_model
    from fedlora.fingerprint import base_fingerprint

    server = base_fingerprint(model_bundle(CFG).model)
    check_base_model(CFG, SiteConfig(0, 2), server)  # same weights: trains
    # the adapter rank is not part of the base model
    other_rank = dataclasses.replace(
        CFG, adapter=dataclasses.replace(CFG.adapter, rank=2)
    )
    assert base_fingerprint(model_bundle(other_rank).model) == server
    wider = dataclasses.replace(
        CFG, model=dataclasses.replace(CFG.model, tiny_hidden_size=32)
    )
    with pytest.raises(ValueError, match="is not the server's"):
        check_base_model(wider, SiteConfig(0, 2), server)


def test_training_changes_neither_the_fingerprint_nor_the_initial_adapter() -> None:
    """A classifier's first loss sets ``config.problem_type``, and training moves
    the adapter; the base fingerprint and the bundle's initial adapter (what the
    server and the sites compare and start from) stay those of a fresh build."""
    from fedlora.cache import build_model_bundle
    from fedlora.fingerprint import base_fingerprint

    cfg = tiny_config(
        "classification", {"data.num_examples": 120, "adapter.train_head": True}
    )
    bundle = model_bundle(cfg)
    before = base_fingerprint(bundle.model)
    train_round(cfg, SiteConfig(0, 2), 1, bundle.initial)
    assert bundle.model.config.problem_type == "single_label_classification"
    assert base_fingerprint(bundle.model) == before
    trained = adapter_state(bundle.model)
    assert any(not torch.equal(trained[k], v) for k, v in bundle.initial.items())
    fresh = build_model_bundle(cfg)
    assert base_fingerprint(fresh.model) == before
    assert all(torch.equal(fresh.initial[k], v) for k, v in bundle.initial.items())


def test_a_client_on_built_in_data_imports_no_table_stack() -> None:
    """A client process that trains and evaluates on the built-in sources never
    imports HF ``datasets``, pyarrow or pandas (~90 MiB per Ray actor): the
    sources return plain columns (``fedlora.data.rows``)."""
    code = (
        "import sys\n"
        "from tiny_configs import tiny_config\n"
        "from fedlora.cache import model_bundle\n"
        "from fedlora.client.round import evaluate_round, train_round\n"
        "from fedlora.client.site import SiteConfig\n"
        "from fedlora.lora.state import adapter_state\n"
        "for task in ('causal_lm', 'classification'):\n"
        "    cfg = tiny_config(task, {'federation.local_steps': 2,\n"
        "                             'train.batch_size': 4})\n"
        "    state = adapter_state(model_bundle(cfg).model)\n"
        "    train_round(cfg, SiteConfig(0, 2), 1, state)\n"
        "    evaluate_round(cfg, SiteConfig(1, 2), state)\n"
        "heavy = ('datasets', 'pyarrow', 'pandas', 'flwr_datasets')\n"
        "print('imported:' + ','.join(m for m in heavy if m in sys.modules))\n"
    )
    tests = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tests.parent,
        env={**os.environ, "PYTHONPATH": str(tests)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "imported:" in proc.stdout.splitlines(), proc.stdout
