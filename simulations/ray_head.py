"""A private Ray head for one local simulation, started lean and early.

Flower's simulation backend calls ``ray.init()`` inside the ServerApp process when
the run starts. On one machine that costs twice:

- **memory**: ``ray.init`` always starts Ray's autoscaler monitor and its log
  monitor, two Python daemons of about 80 MiB each that a one-machine run does not
  need (no autoscaling; the log monitor only copies the actors' output into the
  driver's log);
- **time**: the whole Ray start (GCS, raylet, API server, agents: about 4 s of two
  busy cores) happens on the critical path, after Flower's own start-up.

So the launcher starts the head itself with ``ray start --head`` the moment the run
begins, in parallel with the SuperLink, without the monitor and the log monitor,
and the ServerApp attaches to it through ``RAY_ADDRESS`` like to any existing
cluster. ``ray start`` also starts a Ray Client server (another ~90 MiB, on port
10001, which parallel runs would fight over) whenever Ray Client's dependencies are
installed, and its command line cannot turn that off; Ray's own start hook
(``RAY_START_HOOK``, called with the parameters before the node starts) does:
:func:`lean_head`. ``ray start`` returns once the head runs (no ``--block``: that
would keep a ~90 MiB CLI process for the whole run); the daemons inherit the
launcher's environment marker, so ``LocalSimulation.stop`` finds and stops them.

Without the log monitor, what the ClientApp actors print stays in Ray's session
logs; :meth:`PrivateRayHead.keep_worker_logs` copies the non-empty ones into the run
directory before the Ray temp dir is removed. ``live_logs=True`` (the launcher's
``launcher.verbose=true``) keeps the log monitor, so the actors' lines stream with
the rest as before.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil

from simulations.flwr_cli import file_tail, find_free_port

READY_LINE = "Ray runtime started."
START_HOOK = "simulations.ray_head.lean_head"


def lean_head(ray_params: Any, head: bool) -> None:
    """``RAY_START_HOOK`` of the private head: no Ray Client server.

    ``ray_params`` is the ``ray._private.parameter.RayParams`` that ``ray start``
    built from its options (``None`` here means "not started").
    """
    if head:
        ray_params.ray_client_server_port = None


class PrivateRayHead:
    """A lean Ray head on 127.0.0.1 (the module docstring says what it leaves out).

    Parameters
    ----------
    temp_dir : Path
        Ray's temp dir (sessions, sockets, logs); short, since Ray's socket paths
        must fit in 107 characters.
    log_path : Path
        Where ``ray start`` writes its own output.
    live_logs : bool
        Start Ray's log monitor, which streams the actors' output to the driver.
    """

    def __init__(self, temp_dir: Path, log_path: Path, live_logs: bool) -> None:
        self.temp_dir = temp_dir
        self.log_path = log_path
        self.live_logs = live_logs
        self.port = find_free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """``host:port`` of the head's GCS, for ``RAY_ADDRESS``."""
        return f"127.0.0.1:{self.port}"

    def command(self, ray_exe: str) -> list[str]:
        """Return the ``ray start`` command line (see the module docstring)."""
        log_monitor = "true" if self.live_logs else "false"
        return [
            ray_exe,
            "start",
            "--head",
            f"--port={self.port}",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={self.temp_dir}",
            "--include-dashboard=false",
            # ray start's workers bind 10002, 10003, ... by default, so the
            # drivers of two runs at once (a parallel sweep) both took 10002 and
            # one crashed; 0 gives OS-assigned ports, as ray.init does
            "--min-worker-port=0",
            "--max-worker-port=0",
            "--no-monitor",
            f"--include-log-monitor={log_monitor}",
            "--disable-usage-stats",
        ]

    def start(self, ray_exe: str, popen_kw: dict[str, Any]) -> None:
        """Launch ``ray start``; returns at once (:meth:`wait_ready` waits for it).

        ``popen_kw["env"]`` is the environment of the head's daemons (and so of
        the Ray workers): the launcher's, with our start hook added.
        """
        kw = dict(popen_kw)
        kw["env"] = {**kw.get("env", {}), "RAY_START_HOOK": START_HOOK}
        with self.log_path.open("wb") as out:  # this head's output only
            self._proc = subprocess.Popen(self.command(ray_exe), stdout=out, **kw)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until ``ray start`` reports the head running.

        Raises
        ------
        RuntimeError
            If the head exited, or did not come up within ``timeout`` seconds; the
            message carries the tail of its output.
        """
        if self._proc is None:
            raise RuntimeError("the Ray head was not started")
        deadline = time.monotonic() + timeout
        while (code := self._proc.poll()) is None:  # ray start returns once it runs
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the private Ray head did not start within {timeout:.0f}s:\n"
                    f"{file_tail(self.log_path)}\n(see {self.log_path})"
                )
            time.sleep(0.1)
        if code != 0 or READY_LINE not in self._output():
            raise RuntimeError(
                f"`ray start --head` exited with code {code} without starting:\n"
                f"{file_tail(self.log_path)}\n(see {self.log_path})"
            )

    def _output(self) -> str:
        if not self.log_path.is_file():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def keep_worker_logs(self, dest: Path) -> list[Path]:
        """Copy the Ray workers' non-empty ``.out``/``.err`` files to ``dest``.

        These hold what the ClientApp actors printed (warnings, tracebacks), which
        without the log monitor reach no other log. Returns the copies.
        """
        kept = []
        for log in sorted(self.temp_dir.glob("session_*/logs/worker-*")):
            if log.suffix in (".out", ".err") and log.stat().st_size > 0:
                dest.mkdir(parents=True, exist_ok=True)
                kept.append(Path(shutil.copy2(log, dest / log.name)))
        return kept

    def daemons(self, procs: list[psutil.Process]) -> list[psutil.Process]:
        """Return the head's processes among ``procs``.

        Those are the ones naming its temp dir (GCS, raylet, API server) and Ray's
        renamed ones (``ray::...``: agents, actors).

        The GCS, the raylet and the runtime-env agent outlive SIGTERM by seconds;
        this cluster holds nothing to save once the run ended or was interrupted
        (the worker logs are copied first), so the caller kills these at once.
        """
        mark = str(self.temp_dir)
        found = []
        for proc in procs:
            try:
                cmd = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            if mark in cmd or cmd.startswith("ray::"):
                found.append(proc)
        return found

    def popen(self) -> subprocess.Popen[bytes] | None:
        """Return the ``ray start`` process (None before :meth:`start`).

        It exits once the head runs.
        """
        return self._proc
