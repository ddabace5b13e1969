"""A federation on an existing Ray cluster (``launcher.ray_address``): a real
two-node cluster on 127.0.0.1 (head and worker, one CPU each, their own temp
dirs), the real launcher attached to it, clients trained on both nodes, the
cluster left running by the run and then stopped: exactly its own processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from simulations.flwr_cli import find_free_port
from simulations.processes import marked_processes, terminate

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
MARKER = "FEDLORA_TEST_RAY_CLUSTER"


@dataclass
class LocalRayCluster:
    """``ray start --block`` nodes on 127.0.0.1, each process marked by env."""

    root: Path
    port: int = field(default_factory=find_free_port)
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    nodes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_node(self, name: str, cpus: int) -> None:
        # Ray's socket paths must stay short: a temp dir of its own under /tmp
        temp = Path(os.path.join("/tmp", f"fl-ray-{self.marker[:8]}-{name}"))
        temp.mkdir()
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--block"]
        cmd += ["--num-cpus", str(cpus), "--temp-dir", str(temp)]
        cmd += ["--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
        if not self.nodes:
            cmd += ["--head", "--port", str(self.port), "--include-dashboard=false"]
        else:
            cmd += ["--address", self.address]
        env = dict(os.environ, **{MARKER: self.marker}, RAY_USAGE_STATS_ENABLED="0")
        with (self.root / f"ray-{name}.log").open("ab") as out:
            self.nodes.append(
                subprocess.Popen(
                    cmd,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            )

    def wait_nodes(self, count: int, timeout: float = 120.0) -> None:
        """Wait until ``count`` raylets of this cluster run."""
        deadline = time.monotonic() + timeout
        while len(self.raylets()) < count:
            assert time.monotonic() < deadline, (self.root / "ray-head.log").read_text()
            for node in self.nodes:
                assert node.poll() is None, "a ray node exited at start"
            time.sleep(0.5)
        time.sleep(3.0)  # the worker node registers with the head

    def raylets(self) -> list[psutil.Process]:
        """The raylet daemons (a worker's command line names its raylet too)."""
        return [p for p in self.processes() if _name(p) == "raylet"]

    def processes(self) -> list[psutil.Process]:
        """The cluster's processes: marked, and their descendants (Ray's agents
        are started with an environment of their own)."""
        return marked_processes(MARKER, self.marker, descendants=True)

    def stop(self) -> None:
        for _ in range(3):
            if not (procs := self.processes()):
                break
            terminate(procs, 5.0)
        for node in self.nodes:
            node.wait(timeout=30)


def _name(proc: psutil.Process) -> str:
    try:
        return str(proc.name())
    except psutil.Error:
        return ""


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


@pytest.fixture
def ray_cluster(tmp_path: Path) -> Iterator[LocalRayCluster]:
    cluster = LocalRayCluster(tmp_path)
    try:
        cluster.start_node("head", cpus=1)
        cluster.start_node("worker", cpus=1)
        cluster.wait_nodes(2)
        yield cluster
    finally:
        cluster.stop()
        left = [_cmdline(p)[:80] for p in cluster.processes()]
        for temp in Path("/tmp").glob(f"fl-ray-{cluster.marker[:8]}-*"):
            subprocess.run(["rm", "-rf", str(temp)], check=False)
    assert not left, left  # every process of the two nodes stopped


def test_a_federation_on_a_two_node_ray_cluster_trains_on_both(
    tmp_path: Path, ray_cluster: LocalRayCluster
) -> None:
    outside = {p.pid for p in psutil.process_iter()} - {
        p.pid for p in ray_cluster.processes()
    }
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "simulations.run", f"hydra.run.dir={run_dir}",
        "model=tiny_llama", "data=synthetic_instruct", "federation=smoke",
        "federation.clients=4", "data.num_examples=200", "train.batch_size=4",
        f"launcher.ray_address={ray_cluster.address}",
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    placed = [row["client_nodes"] for row in rows[1:]]
    assert all(len(p) == 4 for p in placed), placed  # every client replied
    nodes = {node for p in placed for node in p.values()}
    assert len(nodes) == 2, placed  # one Ray node id per machine-node, both used
    # the run attached and left: the cluster still runs, nothing of Ray was
    # started outside it (no private Ray instance), and its temp dirs are its own
    assert all(node.poll() is None for node in ray_cluster.nodes)
    assert len(ray_cluster.raylets()) == 2
    started = {p.pid for p in psutil.process_iter()} - outside
    ours = {q.pid for q in ray_cluster.processes()}
    strays = [
        _cmdline(p)[:100]
        for p in psutil.process_iter()
        if p.pid in started and p.pid not in ours and "ray" in _cmdline(p).lower()
    ]
    assert not strays
    assert not (run_dir / "flwr" / "ray").exists()
