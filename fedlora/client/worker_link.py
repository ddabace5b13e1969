"""The per-message ClientApp's side of the site worker: a Unix socket, framed bytes.

A deployed SuperNode starts a fresh ClientApp process for every message. With
``site-worker=true`` that process only forwards the message to the site's
long-lived worker (``fedlora.client.worker``) and relays the reply, so it imports
neither torch nor transformers. This module is stdlib + Flower's serde only.

Channel: ``<state-dir>/site-worker.sock``, created with mode 0600 by the worker, which
also checks the peer's uid (``SO_PEERCRED``): only the site's own account can use it.
Wire format: every frame is an 8-byte big-endian length and that many bytes; a
request is three frames (JSON header, the Flower ``Message`` protobuf, the
``Context`` protobuf), a reply three frames (JSON header, the reply content
``RecordDict`` protobuf, the updated ``context.state`` ``RecordDict`` protobuf).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SOCKET_NAME = "site-worker.sock"
LOG_NAME = "site-worker.log"
LOCK_NAME = "site-worker.lock"
START_TIMEOUT = 180.0  # seconds for a fresh worker to answer (imports torch)
_HEADER = struct.Struct(">Q")
_MAX_FRAME = 1 << 34  # 16 GiB: larger is a corrupt stream, not a message


class WorkerUnavailable(RuntimeError):
    """The site worker could not be reached or started."""


class WorkerFailed(RuntimeError):
    """The site worker died mid-message, or its handler raised."""


def socket_path(state_dir: str | os.PathLike[str]) -> Path:
    """Return the worker's socket path in the site's state directory."""
    return Path(state_dir).resolve() / SOCKET_NAME


@contextlib.contextmanager
def short_address(path: Path) -> Iterator[str]:
    """Yield an address for ``path`` within AF_UNIX's ~107-byte limit.

    Long paths (deep state directories) are reached through the directory's file
    descriptor, ``/proc/self/fd/<n>/<name>`` on Linux; short ones as they are.
    """
    if len(os.fsencode(path)) < 100 or not Path("/proc/self/fd").is_dir():
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def send_frames(sock: socket.socket, *frames: bytes) -> None:
    """Write each frame as its 8-byte length followed by its bytes."""
    for frame in frames:
        sock.sendall(_HEADER.pack(len(frame)))
        if frame:  # nothing after an empty frame's length: the peer may be gone
            sock.sendall(frame)


def recv_frames(sock: socket.socket, count: int) -> list[bytes]:
    """Read ``count`` frames; ``ConnectionError`` if the peer closes early."""
    return [_recv_frame(sock) for _ in range(count)]


def _recv_frame(sock: socket.socket) -> bytes:
    (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if size > _MAX_FRAME:
        raise ConnectionError(f"frame of {size} bytes: corrupt stream")
    return _recv_exact(sock, size)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the peer closed the connection mid-frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def connect(path: Path, timeout: float | None = None) -> socket.socket:
    """Open a connection to the worker at ``path`` (raises ``OSError`` if none)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with short_address(path) as address:
            sock.connect(address)
    except OSError:
        sock.close()
        raise
    return sock


def request(
    state_dir: str, header: dict[str, Any], *blobs: bytes, timeout: float | None = None
) -> tuple[dict[str, Any], list[bytes]]:
    """Send one request, return the reply header and its two blobs."""
    with connect(socket_path(state_dir), timeout) as sock:
        send_frames(sock, json.dumps(header).encode(), *blobs)
        head, *rest = recv_frames(sock, 3)
    return json.loads(head), rest


def ping(state_dir: str, timeout: float = 5.0) -> dict[str, Any] | None:
    """Return the worker's status (pid, run, loads), or ``None`` if none answers."""
    try:
        head, _ = request(state_dir, {"op": "ping"}, b"", b"", timeout=timeout)
    except (OSError, ValueError):
        return None
    return head


def stop(state_dir: str, timeout: float = 30.0) -> bool:
    """Ask the worker to exit after its current message; ``False`` if none ran."""
    try:
        request(state_dir, {"op": "stop"}, b"", b"", timeout=timeout)
    except (OSError, ValueError):
        return False
    return True


def worker_cmd(state_dir: str, idle_exit: float) -> list[str]:
    """Return the command that starts a site worker (by hand or on demand)."""
    return [
        sys.executable, "-m", "fedlora.client.worker", "serve",
        "--state-dir", state_dir, "--idle-exit", f"{idle_exit:g}",
    ]  # fmt: skip


def ensure_running(state_dir: str, idle_exit: float = 3600.0) -> dict[str, Any]:
    """Return the worker's status, starting it first when none answers.

    A lock file makes concurrent ClientApp processes start at most one worker;
    the started worker is detached (own session) and logs to ``site-worker.log``.
    """
    status = ping(state_dir)
    if status is not None:
        return status
    directory = Path(state_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with (directory / LOCK_NAME).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        status = ping(state_dir)
        if status is not None:
            return status
        with (directory / LOG_NAME).open("ab") as log:
            proc = subprocess.Popen(
                worker_cmd(str(directory.resolve()), idle_exit),
                env=_same_code_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            status = ping(state_dir, timeout=START_TIMEOUT)
            if status is not None:
                return status
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    raise WorkerUnavailable(
        f"the site worker in {state_dir} did not start (see {directory / LOG_NAME}); "
        f"start it by hand with: {' '.join(worker_cmd(state_dir, idle_exit))}"
    )


def _wait_gone(state_dir: str, pid: int, timeout: float = 60.0) -> None:
    """Wait until the worker ``pid`` has exited (its socket is then free)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:  # our own child (this process started it): reap it
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            pass
        try:
            os.kill(pid, 0)
        except OSError:
            return
        time.sleep(0.1)
    raise WorkerUnavailable(f"the site worker (pid {pid}) in {state_dir} won't stop")


_CODE_HASH: list[str] = []  # computed once: a process's code does not change


def code_hash() -> str:
    """SHA-256 over this ``fedlora`` package's sources (paths and bytes).

    The ClientApp sends it with every message; a worker running other code (a run
    shipped a new app version) exits and is replaced, and an operator-started
    worker of the same version is kept, wherever its copy of the code lives.
    """
    if not _CODE_HASH:
        package = Path(code_root()) / "fedlora"
        files = {p.relative_to(package).as_posix(): p for p in package.rglob("*.py")}
        _CODE_HASH.append(sources_hash({k: v.read_bytes() for k, v in files.items()}))
    return _CODE_HASH[0]


def sources_hash(sources: dict[str, bytes]) -> str:
    """SHA-256 over ``{path inside fedlora/: bytes}``, in path order."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(sources):
        digest.update(name.encode() + b"\0")
        digest.update(sources[name])
    return digest.hexdigest()


def code_root() -> str:
    """Directory this ``fedlora`` package was imported from (the FAB's, deployed)."""
    return str(Path(__file__).resolve().parents[2])  # <root>/fedlora/client/this


def _same_code_env() -> dict[str, str]:
    """Environment in which ``python -m fedlora...`` imports this very package.

    A deployed ClientApp runs the code of the run's FAB (unpacked under the
    SuperNode's Flower home), which may differ from the fedlora installed in the
    environment; the worker must run the same code as the ClientApp it serves.
    """
    paths = [code_root(), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def handle(
    kind: str, message: bytes, context: bytes, state_dir: str
) -> tuple[dict[str, Any], bytes, bytes]:
    """Have the worker run handler ``kind`` on a serialised Message and Context.

    Returns the reply header (timings), the reply content and the new context
    state, both as ``RecordDict`` protobuf bytes. Raises ``WorkerFailed`` when the
    handler raised in the worker or the worker died before replying.
    """
    header = {"op": "handle", "kind": kind, "code": code_hash()}
    status = ensure_running(state_dir)
    try:
        head, (content, state) = request(state_dir, header, message, context)
        if head.get("restart"):  # it runs another app version's code: replace it
            stop(state_dir)
            _wait_gone(state_dir, int(status.get("pid", 0)))
            status = ensure_running(state_dir)
            head, (content, state) = request(state_dir, header, message, context)
    except (OSError, ValueError) as err:
        raise WorkerFailed(
            f"the site worker (pid {status.get('pid')}) stopped while handling a "
            f"{kind} message ({err}); this message fails, the next one starts a new "
            f"worker. Its log: {Path(state_dir) / LOG_NAME}"
        ) from err
    if not head.get("ok"):
        raise WorkerFailed(f"site worker: {head.get('error', 'unknown error')}")
    return head, content, state
