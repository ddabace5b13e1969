"""`flwr run .` at the repository root runs the same app from Flower's own CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from simulations.processes import marked_processes, terminate

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
MARKER = "FEDLORA_TEST_FLWR_RUN"


def test_flwr_run_dot_uses_the_pyproject_app(tmp_path: Path) -> None:
    """The local SuperLink that `flwr run` starts is stopped by PID afterwards."""
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent)) or "flwr"
    ray_tmp = Path(tempfile.mkdtemp(prefix="fl-ray-", dir="/tmp"))
    marker = uuid.uuid4().hex
    env = dict(
        os.environ,
        FLWR_HOME=str(tmp_path / "flwr_home"),
        RAY_TMPDIR=str(ray_tmp),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        HF_HUB_OFFLINE="1",
        MPLCONFIGDIR=str(tmp_path / "mpl"),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        **{MARKER: marker},
    )
    run_dir = tmp_path / "run"
    overrides = (
        f"output_dir='{run_dir}' federation.rounds=1 federation.local_steps=2 "
        "data.num_examples=400 model.quantization='none'"
    )
    cmd = [
        flwr,
        "run",
        ".",
        "--stream",
        "--run-config",
        overrides,
        "--federation-config",
        "num-supernodes=2 client-resources-num-cpus=1",
    ]
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        summary = json.loads((run_dir / "summary.json").read_text())
    finally:
        survivors = terminate(marked_processes(MARKER, marker))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not survivors
    assert summary["config"]["model"]["name"] == "minilm"  # the pyproject default
    assert summary["final"]["round"] == 1
    assert not marked_processes(MARKER, marker)
