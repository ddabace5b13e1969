"""End-to-end federations through the real launcher (Flower runtime, Ray actors).

Each test starts ``python -m simulations.run`` in a subprocess, exactly as a user
would, then checks the run directory against an in-process reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from fedlora.cache import collator, heldout_dataset
from fedlora.config.flat import build_config
from fedlora.train import evaluate
from strategies.config import ExperimentConfig

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _launch(
    run_dir: Path, *overrides: str, timeout: int = 420
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        "-m",
        "simulations.run",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _leftovers(run_dir: Path) -> list[str]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(run_dir) in cmd and p.pid != os.getpid():
            found.append(f"{p.pid}: {cmd[:120]}")
    return found


def _run_config(run_dir: Path) -> ExperimentConfig:
    """The experiment config the run used (its resolved config.yaml)."""
    return build_config(
        ExperimentConfig, yaml.safe_load((run_dir / "config.yaml").read_text())
    )


def _rows(run_dir: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_minilm_qlora_federation_writes_a_loadable_run_directory(
    tmp_path: Path,
) -> None:
    """Run dir contract; the saved adapter reproduces the server's final accuracy."""
    from peft import PeftModel

    from fedlora.models import load_base_model

    run_dir = tmp_path / "run"
    proc = _launch(
        run_dir, "federation=smoke", "federation.clients=3", "data.num_examples=600"
    )
    assert "eval acc" in proc.stdout  # the per-round table
    # A console a person reads: the table, the summary, no worker chatter; the
    # full output is in the run directory.
    console = (proc.stdout + proc.stderr).splitlines()
    assert len(console) <= 30, "\n".join(console)
    assert not [x for x in console if "ClientAppActor" in x or "Warning" in x]
    assert "rounds in" in console[-1] and str(run_dir) in console[-1]
    kept = (run_dir / "flwr" / "client_logs").glob("worker-*.err")
    assert ":actor_name:ClientAppActor" in "".join(p.read_text() for p in kept)
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "adapter/adapter_config.json",
        "checkpoints/round-002/adapter_model.safetensors",
        "plots/metrics.png",
        "plots/bytes.png",
    ):
        assert (run_dir / name).exists(), name
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["clients"] == 3 and r["bytes_up"] > 0 and r["bytes_down"] > 0
        assert r["epsilon"] is None and r["eval_accuracy"] is not None
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"]["eval_accuracy"] == rows[-1]["eval_accuracy"]

    cfg = build_config(
        ExperimentConfig, {"federation.clients": 3, "data.num_examples": 600}
    )
    base = load_base_model(
        cfg.model, task="classification", num_labels=4, seed=cfg.seed
    )
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    result = evaluate(
        model,
        heldout_dataset(cfg),
        collator(cfg),
        task="classification",
        batch_size=64,
        device=torch.device("cpu"),
    )
    assert result.accuracy == pytest.approx(summary["final"]["eval_accuracy"], abs=1e-9)
    assert result.loss == pytest.approx(summary["final"]["eval_loss"], rel=1e-4)
    assert not _leftovers(run_dir)


def test_one_client_one_round_equals_plain_local_training(tmp_path: Path) -> None:
    """Federation with 1 client and 1 round = the same steps trained locally."""
    from safetensors.torch import load_file

    from fedlora.cache import partition_dataset
    from fedlora.lora.state import adapter_state
    from fedlora.models import load_base_model, wrap_lora
    from fedlora.train import derive_seed, train_local

    overrides = {
        "model.name": "tiny_llama",
        "model.tiny_hidden_size": 64,
        "data.source": "synthetic_instruct",
        "data.task": "causal_lm",
        "data.partitioner": "iid",
        "data.num_examples": 300,
        "federation.clients": 1,
        "federation.min_clients": 1,
        "federation.rounds": 1,
        "federation.local_steps": 4,
        "train.batch_size": 4,
    }
    run_dir = tmp_path / "run"
    _launch(
        run_dir,
        "model=tiny_llama",
        "data=synthetic_instruct",
        *(f"{k}={v}" for k, v in overrides.items()),
    )
    federated = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    rows = _rows(run_dir)
    assert rows[1]["eval_perplexity"] < rows[0]["eval_perplexity"]  # QLoRA learns

    cfg = _run_config(run_dir)
    # A fresh (uncached) model: same seed, so the same initial adapter as the server.
    base = load_base_model(cfg.model, task="causal_lm", num_labels=0, seed=cfg.seed)
    model = wrap_lora(base, cfg.model, cfg.adapter, task="causal_lm", seed=cfg.seed)
    seed = derive_seed(cfg.seed, 1, 0, "train")
    torch.manual_seed(seed)
    train_local(
        model,
        partition_dataset(cfg, 0, 1),
        collator(cfg),
        cfg=cfg.train,
        steps=4,
        start_step=0,
        total_steps=4,
        generator=torch.Generator().manual_seed(seed),
        device=torch.device("cpu"),
    )
    local = adapter_state(model)
    assert set(local) == set(federated)
    bad = [
        k
        for k in local
        if not torch.allclose(local[k], federated[k], atol=1e-5, rtol=1e-4)
    ]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"
    assert any(
        not torch.equal(v, torch.zeros_like(v))
        for k, v in local.items()
        if "lora_B" in k
    )


def test_ffa_under_dp_reports_epsilon_and_halves_the_bytes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _launch(
        run_dir,
        "model=tiny_llama",
        "data=synthetic_instruct",
        "adapter=ffa",
        "privacy=dp",
        "privacy.epsilon=3",
        "model.tiny_hidden_size=64",
        "data.num_examples=400",
        "federation=smoke",
        "federation.rounds=2",
    )
    rows = _rows(run_dir)
    eps = [r["epsilon"] for r in rows[1:]]
    assert all(e is not None for e in eps) and 0 < eps[0] < eps[1] <= 3.0
    summary = json.loads((run_dir / "summary.json").read_text())
    clients = summary["privacy"]["clients"]
    assert sorted(clients) == ["partition-0", "partition-1"]
    assert all(c["dp-steps"] == 2 * 3 for c in clients.values())
    # A and B of q_proj/v_proj have the same size here; FFA sends only B each way.
    half = summary["adapter"]["parameters"] * 4 / 2
    per_client_up = rows[1]["bytes_up"] / rows[1]["clients"]
    assert half <= per_client_up <= half + 2048  # + keys, metrics, record headers
    ledgers = sorted((run_dir / "client-state").rglob("dp-ledger.json"))
    assert len(ledgers) == 2
    assert not _leftovers(run_dir)


def test_a_run_without_held_out_data_trains_and_saves_the_adapter(
    tmp_path: Path,
) -> None:
    """``data.test_fraction=0``: no central evaluation, the run still completes."""
    run_dir = tmp_path / "run"
    _launch(
        run_dir,
        "model=tiny_llama",
        "data=synthetic_instruct",
        "model.tiny_hidden_size=64",
        "data.num_examples=200",
        "data.test_fraction=0",
        "federation=smoke",
    )
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["eval_loss"] is None and r["eval_perplexity"] is None for r in rows)
    assert all(r["train_loss"] is not None for r in rows[1:])
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"]["eval_loss"] is None
    # the ServerApp never loaded the base model; the saved adapter is the last
    # global state (PEFT loading it: tests/strategies/test_base_facts.py)
    log = (run_dir / "flwr.log").read_text()
    assert "the server holds no base model" in log
    assert "fingerprint from the clients" in log
    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    final = load_file(str(run_dir / "checkpoints" / "round-002" / "global.safetensors"))
    assert set(saved) == set(final)
    assert all(torch.equal(saved[k], final[k]) for k in final)
    assert not _leftovers(run_dir)


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ({"adapter.use_dora": True}, {"use_dora": True, "peft_type": "LORA"}),
        (  # evaluated at the sites in bfloat16: the projections must not travel
            {
                "adapter.peft_type": "vera",
                "federation.fraction_evaluate": 1.0,
                "federation.transport_dtype": "bfloat16",
            },
            {"save_projection": True, "peft_type": "VERA"},
        ),
        (  # trained on the residual base, exported for the original one
            {"adapter.init": "pissa", "model.quantization": "none"},
            {"r": 16, "lora_alpha": 32.0, "init_lora_weights": True},
        ),
        (  # the standard NF4 base; the factors fit its quantisation error
            {"adapter.init": "loftq"},
            {"r": 8, "peft_type": "LORA"},
        ),
    ],
    ids=["qdora", "qvera", "pissa", "loftq"],
)
def test_a_lora_family_federation_exports_an_adapter_peft_loads_to_the_same_loss(
    tmp_path: Path, family: dict[str, object], expected: dict[str, object]
) -> None:
    """QDoRA (A, B and m travel), QVeRA (two vectors per matrix travel, the
    projections are regenerated) and LoftQ on the NF4 tiny Llama, and PiSSA (on
    the full precision one, where its export is exact): the final adapter, loaded by
    ``PeftModel.from_pretrained`` on a fresh original base, gives the server's last
    loss."""
    from peft import PeftModel

    from fedlora.models import load_base_model

    run_dir = tmp_path / "run"
    overrides = {
        "model.name": "tiny_llama",
        "model.tiny_hidden_size": 64,
        "data.source": "synthetic_instruct",
        "data.task": "causal_lm",
        "data.num_examples": 200,
        **family,
        "federation.clients": 2,
        "federation.rounds": 2,
        "federation.local_steps": 3,
    }
    _launch(
        run_dir,
        "model=tiny_llama",
        "data=synthetic_instruct",
        *(f"{k}={v}" for k, v in overrides.items() if not k.startswith("model.name")),
    )
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["clients"] for r in rows[1:]] == [2, 2]  # no site refused round 2
    assert rows[1]["bytes_up"] > 0
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert {k: config[k] for k in expected} == expected
    card = (run_dir / "adapter" / "README.md").read_text()
    for named in (config["base_model_name_or_path"], card):  # the original base
        assert "pissa-" not in named
    summary = json.loads((run_dir / "summary.json").read_text())
    with (run_dir / "run_config.toml").open("rb") as fh:  # the run's own config
        cfg = ExperimentConfig.from_run_config(tomllib.load(fh))
    base = load_base_model(cfg.model, task="causal_lm", num_labels=0, seed=cfg.seed)
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    result = evaluate(
        model,
        heldout_dataset(cfg),
        collator(cfg),
        task="causal_lm",
        batch_size=cfg.train.eval_batch_size,
        device=torch.device("cpu"),
    )
    assert result.loss == pytest.approx(summary["final"]["eval_loss"], rel=1e-6)
    assert result.loss != pytest.approx(summary["initial"]["eval_loss"], rel=1e-6)
    assert not _leftovers(run_dir)
