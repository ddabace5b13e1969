"""The deployment commands of the README guide, and a local harness that runs them.

The functions below *are* the guide: the README shows their output for its example
values (a test checks that), and ``LocalDeployment`` runs exactly these commands on
127.0.0.1 (TLS, SuperNode authentication, one process per site) for the
integration test and for trying a deployment on one machine. Every process it
starts carries an environment marker and is stopped by PID when the ``with`` block
ends.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from types import TracebackType

from fedlora.certs import create_certificates, create_site_keys
from simulations.flwr_cli import find_free_port, stage_app
from simulations.processes import kill_tree, marked_processes, terminate

CONNECTION = "fedsites"
MARKER_ENV = "FEDLORA_DEPLOYMENT_ID"
CONNECTED_MARK = b"SuperNode ID:"  # Flower logs it once the SuperLink activated it


def superlink_cmd(certs: str, port: int, database: str, host: str) -> list[str]:
    """Server: TLS SuperLink that only accepts registered SuperNodes."""
    return [
        "flower-superlink",
        "--host", host,
        "--port", str(port),
        "--ssl-ca-certfile", f"{certs}/ca.crt",
        "--ssl-certfile", f"{certs}/server.pem",
        "--ssl-keyfile", f"{certs}/server.key",
        "--database", database,
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip


def connection_toml(address: str, ca_cert: str) -> str:
    """Operator's ``$FLWR_HOME/config.toml``: the named TLS connection."""
    return (
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\n'
        f'root-certificates = "{ca_cert}"\n'
    )


def register_cmd(public_key: str) -> list[str]:
    """Operator: allow one site's key pair to join."""
    return ["flwr", "supernode", "register", public_key, CONNECTION]


def supernode_cmd(
    superlink: str, ca_cert: str, private_key: str, node_config: str, port: int
) -> list[str]:
    """Site: a SuperNode with its own key, CA and node-config."""
    return [
        "flower-supernode",
        "--superlink", superlink,
        "--root-certificates", ca_cert,
        "--auth-supernode-private-key", private_key,
        "--node-config", node_config,
        "--port", str(port),
    ]  # fmt: skip


def site_supernode_cmd(
    superlink: str, ca_cert: str, private_key: str, node_config: str, port: int
) -> list[str]:
    """Site: the same SuperNode, with the site worker running its ClientApp tasks."""
    flower = supernode_cmd(superlink, ca_cert, private_key, node_config, port)
    return ["python", "-m", "fedlora.client.supernode", *flower[1:]]


def _logged_since(log: Path, offset: int, mark: bytes) -> bool:
    """Whether ``log`` holds ``mark`` after byte ``offset`` (this attempt's lines)."""
    try:
        with log.open("rb") as f:
            f.seek(offset)
            return mark in f.read()
    except OSError:
        return False


def run_cmd(app_dir: str, run_config: str) -> list[str]:
    """Operator: submit the fedlora app with a run-config file and follow it."""
    return ["flwr", "run", app_dir, CONNECTION, "--run-config", run_config, "--stream"]


class LocalDeployment:
    """SuperLink + SuperNodes on 127.0.0.1 with development certificates."""

    def __init__(self, work_dir: Path, sites: int) -> None:
        self.work_dir = work_dir.resolve()
        self.certs = self.work_dir / "certs"
        self.flwr_home = self.work_dir / "flwr_home"
        self.sites = sites
        self.port = 0
        self.marker = uuid.uuid4().hex
        self.site_procs: dict[int, subprocess.Popen[bytes]] = {}
        self.superlink: subprocess.Popen[bytes] | None = None
        bin_dir = str(Path(sys.executable).parent)
        self.env = dict(
            os.environ,
            FLWR_HOME=str(self.flwr_home),
            PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
            **{MARKER_ENV: self.marker},
        )
        # OpenMP threads sleep rather than spin when idle (as in the launcher).
        self.env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        # Flower's SuperExec looks for a message to run every 1 s by default; a
        # site polls its own SuperNode, so 0.1 s costs nothing (README guide).
        self.env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
        # The sites share this machine's cores (real sites have their own): each
        # gets its share of OpenMP threads, like the launcher's client actors; the
        # server keeps all of them for its evaluation.
        threads = str(max(1, (os.cpu_count() or 1) // sites))
        self.site_env = {"OMP_NUM_THREADS": threads, **self.env}

    @property
    def address(self) -> str:
        """``host:port`` of the SuperLink."""
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> LocalDeployment:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        create_certificates(self.certs)
        for i in range(self.sites):
            create_site_keys(self.certs, f"site-{i}")
        self.port = find_free_port()
        (self.flwr_home / "config.toml").write_text(
            connection_toml(self.address, str(self.certs / "ca.crt"))
        )
        self.start_superlink()
        return self

    def start_superlink(self) -> None:
        """Start the SuperLink (again, after :meth:`kill_server`: same database)."""
        cmd = superlink_cmd(
            str(self.certs), self.port, str(self.work_dir / "state.db"), "127.0.0.1"
        )
        self.superlink = self._spawn(cmd, self.work_dir / "superlink.log")
        self._wait_healthy()

    def kill_server(self) -> None:
        """SIGKILL the SuperLink and its ServerApp process: a server crash."""
        if self.superlink is not None:
            kill_tree(self.superlink.pid)
            self.superlink.wait(timeout=30)

    def kill_site(self, site: int) -> None:
        """SIGKILL ``site``'s SuperNode and its child processes.

        Its ClientApps, and its site worker when that runs the tasks; not a worker
        a ClientApp started (that one is detached).
        """
        proc = self.site_procs.pop(site)
        kill_tree(proc.pid)
        proc.wait(timeout=30)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _spawn(
        self, cmd: list[str], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            return subprocess.Popen(
                cmd,
                env=env or self.env,
                cwd=self.work_dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_healthy(self, timeout: float = 60.0) -> None:
        ctx = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                url = f"https://{self.address}/health"
                with urllib.request.urlopen(url, context=ctx, timeout=1):
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(
            f"SuperLink not healthy on {self.address}; see superlink.log"
        )

    def register(self, site: int) -> subprocess.CompletedProcess[str]:
        """Register ``site``'s public key (``flwr supernode register``)."""
        return subprocess.run(
            register_cmd(str(self.certs / f"site-{site}.pub")),
            env=self.env,
            cwd=self.work_dir,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )

    def start_site(
        self, site: int, node_config: str, in_worker: bool = False
    ) -> subprocess.Popen[bytes]:
        """Start ``site``'s SuperNode with its own key pair and node-config.

        ``in_worker``: through ``fedlora.client.supernode`` (the site worker runs
        the ClientApp tasks; the node-config needs ``state-dir``).
        """
        make = site_supernode_cmd if in_worker else supernode_cmd
        cmd = make(
            self.address,
            str(self.certs / "ca.crt"),
            str(self.certs / f"site-{site}.key"),
            node_config,
            find_free_port(),
        )
        if in_worker:
            cmd[0] = sys.executable
        proc = self._spawn(cmd, self.work_dir / f"site-{site}.log", self.site_env)
        self.site_procs[site] = proc
        return proc

    def restart_site(
        self,
        site: int,
        node_config: str,
        timeout: float = 240.0,
        in_worker: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start ``site`` again until the SuperLink accepts it, as a service would.

        After a crash the SuperLink refuses the same key ("Failed to activate
        SuperNode", exit 305) until it has missed the old session's heartbeats
        (up to 2 x 30 s); a service manager restarts it, and so does this. An
        attempt counts as connected only once its log says ``SuperNode ID``
        (Flower logs it after the activation): a slow machine may take longer
        than any fixed wait to be refused.
        """
        log = self.work_dir / f"site-{site}.log"
        deadline = time.monotonic() + timeout
        while True:
            offset = log.stat().st_size if log.exists() else 0
            proc = self.start_site(site, node_config, in_worker)
            while proc.poll() is None:
                if _logged_since(log, offset, CONNECTED_MARK):
                    return proc
                if time.monotonic() > deadline:  # the with block stops it
                    raise RuntimeError(
                        f"site {site} did not connect within {timeout:.0f} s; see {log}"
                    )
                time.sleep(0.2)
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"site {site} was refused until the timeout (exit "
                    f"{proc.returncode}); see {log}"
                )
            time.sleep(3)

    def run(
        self, app_dir: Path, run_config: Path, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """``flwr run`` the app on this deployment and wait for the end."""
        return subprocess.run(
            run_cmd(str(self.staged(app_dir)), str(run_config)),
            env=self.env,
            cwd=self.work_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def staged(self, app_dir: Path) -> Path:
        """Copy the app's FAB files (``flwr_cli.stage_app``): a fast ``flwr run``."""
        return stage_app(app_dir, self.work_dir / "app")

    def submit(self, app_dir: Path, run_config: Path) -> subprocess.Popen[str]:
        """``flwr run`` in the background (a test may kill it with the server)."""
        return subprocess.Popen(
            run_cmd(str(self.staged(app_dir)), str(run_config)),
            env=self.env,
            cwd=self.work_dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )

    def stop(self) -> None:
        """Stop every process this deployment started (marker or tree)."""
        terminate(marked_processes(MARKER_ENV, self.marker))

    def leftovers(self) -> list[int]:
        """PIDs still marked as ours (empty after ``stop``)."""
        return [p.pid for p in marked_processes(MARKER_ENV, self.marker)]
