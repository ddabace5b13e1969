"""Run a Flower app on a private local SuperLink with Flower's simulation runtime.

`LocalSimulation` starts its own ``flower-superlink --simulation`` on a free port
with a private ``FLWR_HOME`` and ``RAY_TMPDIR``, submits apps with ``flwr run`` and,
when the ``with`` block ends for any reason, stops every process it started: found
by process tree, by a per-instance environment marker and by the Ray temp dir.

Ports (flwr 1.41): the SuperLink serves the Runtime, Control and Fleet APIs and
``/health`` on one HTTP port (``--port``, free port chosen here). Its legacy gRPC
Control (9093) and Fleet (9092) servers only start when ``FLWR_INTERNAL_GRPC_*`` is
``1`` (removed from the environment; Fleet never starts in simulation mode) and the
gRPC health server only with ``--health-server-address`` (not passed). Ray's private
head (``simulations.ray_head``, started here in parallel with the SuperLink, which
``flwr-simulation`` attaches to) binds its GCS to a free port on 127.0.0.1, and its
other ports (raylet, object manager, agents, workers) are OS-assigned, so they
cannot collide. Its dashboard is minimal (no 8265 UI).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import psutil

from simulations.flwr_cli import (
    flower_env,
    import_flower_cli,
    log_errors,
    stage_app,
)
from simulations.processes import (
    is_alive,
    marked_processes,
    process_trees,
    signal_all,
    terminate,
)
from simulations.ray_head import PrivateRayHead
from simulations.run_logs import (
    AT_LAST_LINE,
    RunLog,
    control_client,
    final_status,
    stream_logs,
)
from simulations.superlink import CONNECTION_NAME, start_superlink

MARKER_ENV = "FEDLORA_SIMULATION_ID"
_RAY_TMPDIR_MAX_LEN = 32  # Ray adds ~68 chars for its plasma socket; limit is 107.
_RUN_ID_RE = re.compile(r"Successfully started run (\d+)")


def _raise_system_exit(signum: int, _frame: FrameType | None) -> None:
    """Turn SIGTERM into ``SystemExit`` so that ``__exit__`` still cleans up."""
    raise SystemExit(128 + signum)


class LocalSimulation:
    """Own a private local Flower SuperLink (simulation runtime) and its processes.

    Parameters
    ----------
    work_dir : Path
        Holds ``flwr_home/``, ``superlink.log``, ``superlink.stdout.log`` and, if
        the path is short enough for Ray's socket names, ``ray/``.
    env : Mapping[str, str] | None
        Extra environment variables for every process we start (SuperLink,
        SuperExec, ``flwr-simulation``, Ray workers, ``flwr`` CLI calls).
    log : Callable[[str], Any]
        Sink for status messages and streamed run output (default ``print``).
    startup_timeout : float
        Seconds to wait for the SuperLink ``/health`` endpoint.
    ray_address : str
        Run the clients on this existing Ray cluster (``host:port`` of its head,
        or ``auto``), passed to Ray as ``RAY_ADDRESS``: the simulation's driver
        attaches to it, and no Ray process is started, or stopped, here. Empty: a
        private, lean Ray head (:mod:`simulations.ray_head`) started with the
        SuperLink and stopped with it.
    live_client_logs : bool
        With a private head, stream the ClientApp actors' output into the run's
        log as it happens (Ray's log monitor, ~80 MiB); otherwise their non-empty
        logs are copied to ``work_dir/client_logs/`` when the simulation stops.
    """

    def __init__(
        self,
        *,
        work_dir: Path,
        env: Mapping[str, str] | None = None,
        log: Callable[[str], Any] = print,
        startup_timeout: float = 60.0,
        ray_address: str = "",
        live_client_logs: bool = False,
    ) -> None:
        self.work_dir = Path(work_dir).resolve()
        self.flwr_home = self.work_dir / "flwr_home"
        self.superlink_log = self.work_dir / "superlink.log"
        self.superlink_stdout = self.work_dir / "superlink.stdout.log"
        self.port = 0
        self.ray_tmpdir: Path | None = None
        self.ray_address = ray_address
        self._live_client_logs = live_client_logs
        self._ray_head: PrivateRayHead | None = None
        self._extra_env = dict(env or {})
        self._log = log
        self._startup_timeout = startup_timeout
        self._sim_id = uuid.uuid4().hex
        self._env: dict[str, str] = {}
        self._superlink: subprocess.Popen[bytes] | None = None
        self._run_proc: subprocess.Popen[str] | None = None
        self._prev_sigterm: Any = None
        self._sigterm_installed = False

    @property
    def address(self) -> str:
        """``host:port`` of the SuperLink HTTP API (Runtime, Control and Fleet)."""
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> LocalSimulation:
        """Start the SuperLink and wait until it is healthy."""
        if threading.current_thread() is threading.main_thread():
            self._prev_sigterm = signal.signal(signal.SIGTERM, _raise_system_exit)
            self._sigterm_installed = True
        try:
            self._prepare()
            threading.Thread(target=import_flower_cli, daemon=True).start()
            if self._ray_head is not None:  # starts while the SuperLink starts
                env = {k: v for k, v in self._env.items() if k != "RAY_ADDRESS"}
                self._ray_head.start(self._exe("ray"), {**self._popen_kw(), "env": env})
            self._start_superlink()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop every process we started and remove the Ray temp dir."""
        try:
            self.stop()
        finally:
            if self._sigterm_installed:
                signal.signal(signal.SIGTERM, self._prev_sigterm or signal.SIG_DFL)
                self._sigterm_installed = False

    def _prepare(self) -> None:
        """Create the private directories and the shared environment."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.work_dir / "mpl").mkdir(exist_ok=True)
        ray_dir = self.work_dir / "ray"
        if self.ray_address:
            pass  # the cluster's own temp dirs; nothing of Ray's is ours
        elif len(str(ray_dir)) <= _RAY_TMPDIR_MAX_LEN:
            ray_dir.mkdir(exist_ok=True)
            self.ray_tmpdir = ray_dir
        else:
            self.ray_tmpdir = Path(tempfile.mkdtemp(prefix="fedlora-ray-", dir="/tmp"))
        if self.ray_tmpdir is not None:
            self._ray_head = PrivateRayHead(
                self.ray_tmpdir, self.work_dir / "ray-head.log", self._live_client_logs
            )
        self._env = self._build_env()

    def _build_env(self) -> dict[str, str]:
        """Return the environment shared by every process we start."""
        head = self._ray_head
        return flower_env(
            extra=self._extra_env,
            flwr_home=self.flwr_home,
            work_dir=self.work_dir,
            ray_address=head.address if head is not None else self.ray_address,
            ray_tmpdir=self.ray_tmpdir,
            marker=(MARKER_ENV, self._sim_id),
        )

    def _popen_kw(self) -> dict[str, Any]:
        """Popen options for our processes: own session, so Ctrl-C reaches us only."""
        return {
            "env": self._env,
            "cwd": self.work_dir,
            "stdin": subprocess.DEVNULL,
            "stderr": subprocess.STDOUT,
            "start_new_session": True,
        }

    def _exe(self, name: str) -> str:
        """Resolve a Flower console script on our ``PATH``."""
        path = shutil.which(name, path=self._env["PATH"])
        if path is None:
            raise RuntimeError(f"`{name}` not found on PATH; is flwr installed?")
        return path

    def _start_superlink(self) -> None:
        """Launch ``flower-superlink`` on a free port (retried if it dies at once)."""
        self._superlink, self.port, secs = start_superlink(
            self._exe("flower-superlink"),
            self.flwr_home,
            self.superlink_log,
            self.superlink_stdout,
            self._popen_kw(),
            self._startup_timeout,
        )
        self._log(f"[fedlora] SuperLink ready on {self.address} in {secs:.1f}s")

    def run(
        self,
        app_dir: Path,
        *,
        run_config: Path,
        num_supernodes: int,
        cpus_per_client: int = 1,
        gpus_per_client: float = 0.0,
        log_file: Path | None = None,
        last_line: str | None = None,
    ) -> int:
        """Run a Flower app to completion: ``flwr run``, then follow its log.

        Parameters
        ----------
        app_dir : Path
            Directory with the app's ``pyproject.toml``; built into a FAB (<10 MB).
        run_config : Path
            ``.toml`` file of run-config overrides; every key must be declared in
            the app's ``[tool.flwr.app.config]``.
        num_supernodes : int
            Number of simulated SuperNodes.
        cpus_per_client : int
            Ray CPUs reserved per ClientApp actor.
        gpus_per_client : float
            Ray GPUs reserved per ClientApp actor.
        log_file : Path | None
            Also write the streamed output (ANSI codes stripped) to this file.
        last_line : str | None
            Text of the app's own last log line, once its results are written:
            the run is complete there, and its processes are killed rather than
            left to Flower's teardown (about 3 s: a 1 s queue poll per worker
            thread, Ray's shutdown, a fixed 1 s sleep to flush the log).

        Returns
        -------
        int
            The ``flwr run`` exit code (always 0: failures raise).

        Raises
        ------
        RuntimeError
            If the run did not start or did not end as ``finished:completed``.
        """
        if self._superlink is None or self._superlink.poll() is not None:
            raise RuntimeError("SuperLink not running; use LocalSimulation in `with`.")
        run_config = Path(run_config).resolve()
        if run_config.suffix != ".toml" or not run_config.is_file():
            raise ValueError(f"run_config must be an existing .toml file: {run_config}")
        fed = (
            f"num-supernodes={int(num_supernodes)} client-resources-num-cpus="
            f"{int(cpus_per_client)} client-resources-num-gpus={float(gpus_per_client)}"
        )
        # a copy of the app's FAB files: Flower would walk the in-repo .venv
        staged = stage_app(Path(app_dir), self.work_dir / "app")
        cmd = [self._exe("flwr"), "run", str(staged), CONNECTION_NAME]
        cmd += ["--run-config", str(run_config), "--federation-config", fed]
        offset = self.superlink_log.stat().st_size if self.superlink_log.exists() else 0
        try:
            code, run_id, tail, (status, details) = self._follow(
                cmd, log_file, last_line
            )
        except BaseException:  # Ctrl-C, SIGTERM, ...: stop everything, re-raise
            self.stop()
            raise
        if (status, details) == AT_LAST_LINE:  # nothing left to wait for
            self.stop(grace_s=0.0)
        if code != 0 or status != "finished:completed":
            raise RuntimeError(
                f"Flower run {run_id or '(none)'} failed: flwr exit code {code}, "
                f"status {status!r}: {details}\n--- last output ---\n"
                + "\n".join(tail)
                + "\n--- SuperLink errors ---\n"
                + log_errors(self.superlink_log, offset)
            )
        return code

    def _follow(
        self, cmd: list[str], log_file: Path | None, last_line: str | None
    ) -> tuple[int, str, list[str], tuple[str, str]]:
        """Submit with ``cmd`` (``flwr run``), then tee the run's log until it ends.

        Returns the exit code of ``flwr run``, the run id, the last 40 lines and
        the run's final ``(status, details)`` (``("none", "")`` if it did not
        start). The log and the status come from the SuperLink's Control API in
        this process (:mod:`simulations.run_logs`).
        """
        run_id = ""
        with RunLog(self._log, Path(log_file) if log_file else None) as out:
            self._run_proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                text=True,
                errors="replace",
                bufsize=1,
                **self._popen_kw(),
            )
            assert self._run_proc.stdout is not None
            for raw in self._run_proc.stdout:
                out.emit(raw.rstrip("\n"))
                if match := _RUN_ID_RE.search(RunLog.ANSI.sub("", raw)):
                    run_id = match.group(1)
            code = self._run_proc.wait()
            if code != 0 or not run_id:
                return code, run_id, list(out.tail), ("none", "")
            if self._ray_head is not None:
                # submitted while the head may still be starting: the ServerApp's
                # ray.init waits for its GCS; a head that failed is reported here
                self._ray_head.wait_ready()
            client = control_client(self.address)
            try:
                if stream_logs(client, int(run_id), out.emit, until=last_line):
                    return code, run_id, list(out.tail), AT_LAST_LINE
                return code, run_id, list(out.tail), final_status(client, int(run_id))
            finally:
                client.close()

    def owned_processes(self) -> list[psutil.Process]:
        """Return live processes we started (trees, env marker, Ray temp dir)."""
        head = self._ray_head.popen() if self._ray_head is not None else None
        popens = (self._superlink, self._run_proc, head)
        found = process_trees(p.pid for p in popens if p and p.poll() is None)
        ray_dir = f"{self.ray_tmpdir}/" if self.ray_tmpdir else None
        for proc in marked_processes(
            MARKER_ENV, self._sim_id, cmdline_part=ray_dir, descendants=True
        ):
            found.setdefault(proc.pid, proc)
        found.pop(os.getpid(), None)
        return [p for p in found.values() if is_alive(p)]

    def stop(self, grace_s: float = 3.0) -> None:
        """Stop all owned processes (SIGTERM, then SIGKILL), clean up; idempotent.

        A second Ctrl-C (or SIGTERM) while stopping is deferred, not lost: cleanup
        finishes first, then the signal is delivered.
        """
        if threading.current_thread() is not threading.main_thread():
            self._stop(grace_s)
            return
        pending: list[int] = []
        handlers = {
            sig: signal.signal(sig, lambda signum, _f: pending.append(signum))
            for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            self._stop(grace_s)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            for signum in pending:
                signal.raise_signal(signum)

    def _stop(self, grace_s: float) -> None:
        """Signal every owned process, reap our children, remove the Ray dir."""
        if self._ray_head is not None:
            self._ray_head.keep_worker_logs(self.work_dir / "client_logs")
            signal_all(
                self._ray_head.daemons(self.owned_processes()), signal.SIGKILL, 5.0
            )
        for _ in range(3):  # rescan: a dying parent may still have spawned children
            procs = self.owned_processes()
            if not procs:
                break
            terminate(procs, grace_s)
        head = self._ray_head.popen() if self._ray_head is not None else None
        for popen in (self._superlink, self._run_proc, head):
            if popen is not None:
                if popen.poll() is None:
                    popen.kill()
                popen.wait()
                if popen.stdout is not None:
                    popen.stdout.close()
        if leftovers := self.owned_processes():
            pids = [p.pid for p in leftovers]
            self._log(f"[fedlora] WARNING: could not stop processes {pids}")
        self._superlink = self._run_proc = None
        if self.ray_tmpdir is not None:
            shutil.rmtree(self.ray_tmpdir, ignore_errors=True)
