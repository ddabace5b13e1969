"""Small helpers around Flower's CLI and logs used by the launcher."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path


def run_status(
    flwr: str,
    connection: str,
    run_id: str,
    env: Mapping[str, str],
    cwd: Path,
    wait_s: float = 30.0,
) -> tuple[str, str]:
    """Return ``(status, details)`` of a run once it is finished (or timeout).

    ``flwr run --stream`` exits 0 even when the ServerApp crashed; only
    ``flwr ls --run-id`` tells ``finished:completed`` from ``finished:failed``.
    """
    cmd = [flwr, "ls", connection, "--run-id", run_id, "--format", "json"]
    deadline = time.monotonic() + wait_s
    while True:
        res = subprocess.run(
            cmd,
            env=dict(env),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        try:
            info = json.loads(res.stdout)["runs"][0]
            status, details = str(info["status"]), str(info["status-details"])
        except (ValueError, KeyError, IndexError):
            status, details = "unknown", (res.stdout + res.stderr)[-2000:]
        if status.startswith("finished") or time.monotonic() > deadline:
            return status, details
        time.sleep(0.5)


def log_errors(path: Path, offset: int) -> str:
    """Return a log file's ERROR lines written after byte ``offset``.

    An undeclared run-config key makes ``flwr run`` print only "Invalid run
    configuration"; the key's name is in the SuperLink log.
    """
    if not path.is_file():
        return ""
    with path.open("rb") as fh:
        fh.seek(offset)
        text = fh.read().decode("utf-8", errors="replace")
    return "\n".join(ln for ln in text.splitlines() if "ERROR" in ln)[-4000:]


def find_free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is currently free on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def file_tail(path: Path, lines: int = 30) -> str:
    """Return the last ``lines`` lines of a text file (empty if missing)."""
    if not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])
