"""The local SuperLink of a simulation: its connection entry and its health check.

``LocalSimulation`` starts ``flower-superlink --simulation`` on a free port with a
private ``FLWR_HOME``; the ``flwr`` CLI finds it through the connection written
here, and the run waits until its ``/health`` endpoint answers.
"""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from simulations.flwr_cli import file_tail, find_free_port

CONNECTION_NAME = "fedlora-local"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def write_connection(flwr_home: Path, address: str) -> None:
    """Make ``address`` the default, insecure SuperLink of ``flwr_home``."""
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION_NAME}"\n\n'
        f'[superlink.{CONNECTION_NAME}]\naddress = "{address}"\n'
        "insecure = true\n",
        encoding="utf-8",
    )


def superlink_command(exe: str, port: int, log_file: Path) -> list[str]:
    """``flower-superlink`` in simulation mode on 127.0.0.1:``port``."""
    return [
        exe,
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-file",
        str(log_file),
        "--disable-runtime-dependency-installation",
    ]


def wait_healthy(
    proc: subprocess.Popen[bytes],
    address: str,
    *,
    timeout: float,
    stdout_log: Path,
    log_file: Path,
    last_attempt: bool,
) -> bool:
    """Poll ``/health``; return False if ``proc`` died early and may be retried.

    Raises
    ------
    RuntimeError
        If ``proc`` died on the last attempt, or was not healthy within
        ``timeout`` seconds; the message carries the tail of its output.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            if not last_attempt:
                return False
            raise RuntimeError(
                f"flower-superlink exited with code {proc.returncode} at startup:"
                f"\n{file_tail(stdout_log)}\n(see {stdout_log})"
            )
        try:
            with _NO_PROXY.open(f"http://{address}/health", timeout=1) as res:
                if res.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(
        f"flower-superlink not healthy on {address} after {timeout:.1f}s:\n"
        f"{file_tail(stdout_log)}\n(see {stdout_log} and {log_file})"
    )


def start_superlink(
    exe: str,
    flwr_home: Path,
    log_file: Path,
    stdout_log: Path,
    popen_kw: Mapping[str, Any],
    timeout: float,
    attempts: int = 3,
) -> tuple[subprocess.Popen[bytes], int, float]:
    """Launch ``flower-superlink`` on a free port; retry if it dies at startup.

    Returns the process, its port and the seconds it took to become healthy.
    """
    for attempt in range(1, attempts + 1):
        started = time.monotonic()
        port = find_free_port()
        address = f"127.0.0.1:{port}"
        write_connection(flwr_home, address)
        cmd = superlink_command(exe, port, log_file)
        with stdout_log.open("ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, **popen_kw)
        try:
            healthy = wait_healthy(
                proc,
                address,
                timeout=timeout,
                stdout_log=stdout_log,
                log_file=log_file,
                last_attempt=attempt == attempts,
            )
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if healthy:
            return proc, port, time.monotonic() - started
    raise RuntimeError(f"flower-superlink did not start in {attempts} attempts")
