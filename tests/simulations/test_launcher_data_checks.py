"""The real launcher refuses a bad local data file before Flower starts: one line on
stderr naming the file and the fix, a non-zero exit, no traceback, no run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from simulations.experiment import CONF_DIR, from_hydra

ROOT = Path(__file__).resolve().parents[2]


def test_a_headerless_tsv_stops_the_launcher_before_flower(tmp_path: Path) -> None:
    data = tmp_path / "train.tsv"
    data.write_text("a fine and warm film\t1\nit is not good\t0\nmeh\t0\n")
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "simulations.run",
        f"hydra.run.dir={run_dir}",
        "data=local",
        f"data.path={data}",
        # The smallest run, should one start: a generated model, 2 clients, 1 round.
        "model=tiny_llama",
        "federation=smoke",
        "federation.rounds=1",
    ]
    start = time.monotonic()
    # Own process group: should a run start anyway, everything it spawned is stopped.
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the launcher did not stop on the bad data file within 120 s")
    seconds = time.monotonic() - start
    assert proc.returncode == 2, out[-2000:] + err[-2000:]
    assert f"data.path={data}: no column 'text' (data.text_column)" in err
    assert "seems to have no header row" in err
    assert "set data.header=false data.columns=[text,label]" in err
    assert "Traceback" not in out + err
    # Nothing of a run: no run-config, no Flower home or log, no metrics.
    assert not (run_dir / "run_config.toml").exists()
    assert not (run_dir / "flwr").exists() and not (run_dir / "flwr.log").exists()
    assert not list(run_dir.rglob("metrics.jsonl"))
    assert seconds < 60, seconds


def test_relative_data_paths_reach_the_clients_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flower's processes do not share the launcher's working directory."""
    (tmp_path / "d.csv").write_text("text,label\na b,0\nc d,1\n")
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(
            config_name="config",
            overrides=["data=local", "data.path=d.csv", "data.test_path=d.csv"],
        )
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    experiment, _ = from_hydra(container)
    want = str(tmp_path.resolve() / "d.csv")
    assert (experiment.data.path, experiment.data.test_path) == (want, want)
