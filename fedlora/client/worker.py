"""The site worker: one long-lived process per site that keeps the model warm.

A deployed SuperNode starts a fresh ClientApp process per message; that process
would re-import torch, reload and re-quantise the base model and re-read the data
every round. With ``site-worker=true`` in the node-config the ClientApp forwards
each message here instead (``fedlora.client.worker_link``), and this process runs
the same handlers (``fedlora.client.handlers``) with everything cached between
rounds: base model, tokenizer, tokenized data, the DP ledger.

Rules that keep it safe:

- **One run's state at a time.** Messages are handled one after another (a lock);
  a message of another run first drops every cache of the process, so a model,
  dataset or fingerprint of one run is never used for another, and a changed base
  model on disk is read afresh by the next run. The model is loaded once per run.
- **Only the site's account.** The socket is created mode 0600 in the state
  directory, and every connection's peer uid (``SO_PEERCRED``) must equal ours.
- **Failures stay in their message.** A handler that raises returns the error to
  the ClientApp (Flower replies with an error, the server drops the site for that
  round); a worker that dies mid-message closes the socket, the ClientApp fails
  that message, and the next message starts a new worker.

Operators start and stop it with::

    python -m fedlora.client.worker serve --state-dir /var/lib/fedlora
    python -m fedlora.client.worker status --state-dir /var/lib/fedlora
    python -m fedlora.client.worker stop --state-dir /var/lib/fedlora

(the ClientApp also starts it on demand, with the same command).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import socket
import struct
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from fedlora.client import worker_link as link
from fedlora.client.task_loop import quiet_logging

log = logging.getLogger("fedlora.worker")


def package_caches() -> list[Any]:
    """Every ``functools`` cache defined in a loaded ``fedlora`` module."""
    found: dict[int, Any] = {}
    for name, module in list(sys.modules.items()):
        if name != "fedlora" and not name.startswith("fedlora."):
            continue
        for value in vars(module).values():
            owner = getattr(value, "__module__", "") or ""
            if callable(getattr(value, "cache_clear", None)) and owner.startswith(
                "fedlora"
            ):
                found[id(value)] = value
    return list(found.values())


def reset_process_state() -> None:
    """Drop every per-process cache: models, tokenizers, data, fingerprints, keys.

    Called when a message of a new run arrives; afterwards nothing of the previous
    run can be reused. Every ``functools`` cache of the package is cleared, so a
    cache added later is covered too (a test checks them all).
    """
    for cached in package_caches():
        cached.cache_clear()
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


class Worker:
    """Serves ping/stop/handle requests on the site's socket."""

    def __init__(self, state_dir: Path, idle_exit: float) -> None:
        self.state_dir = state_dir
        self.idle_exit = idle_exit
        self.run_id: int | None = None
        self.messages = 0
        self.model_loads = 0  # base models built, all runs
        self.run_model_loads = 0  # base models built in the current run
        self.last_active = time.monotonic()
        self.busy = threading.Lock()
        self.stopping = threading.Event()

    def status(self) -> dict[str, Any]:
        """Pid, current run, messages handled and base models built."""
        return {
            "ok": True,
            "pid": os.getpid(),
            "run_id": self.run_id,
            "busy": self.busy.locked(),
            "messages": self.messages,
            "model_loads": self.model_loads,
            "run_model_loads": self.run_model_loads,
        }

    def run(self, kind: str, msg: Any, ctx: Any) -> tuple[Any, dict[str, Any]]:
        """Run handler ``kind`` on a Flower Message and Context (updated in place).

        Returns the reply Message and a header: the status plus ``seconds`` (the
        handler) and ``built`` (base models it loaded). A message of another run
        first drops every cache, so nothing of one run serves another.
        """
        from flwr.supercore.task_identity import TaskIdentity

        from fedlora import cache
        from fedlora.client import handlers

        # what Flower sets in the ClientApp process that received the message
        TaskIdentity.run_id, TaskIdentity.node_id = ctx.run_id, ctx.node_id
        TaskIdentity.task_id = msg.metadata.dst_task_id or 0
        if ctx.run_id != self.run_id:
            if self.run_id is not None:
                log.info("run %s -> %s: dropping run state", self.run_id, ctx.run_id)
            reset_process_state()
            self.run_id, self.run_model_loads = ctx.run_id, 0
        fn = handlers.handler_for(kind)
        before = cache.model_builds()
        start = time.perf_counter()
        reply = fn(msg, ctx)
        seconds = time.perf_counter() - start
        built = cache.model_builds() - before
        self.model_loads += built
        self.run_model_loads += built
        self.messages += 1
        return reply, {**self.status(), "seconds": seconds, "built": built}

    def handle(self, kind: str, message: bytes, context: bytes) -> list[bytes]:
        """Run handler ``kind`` on the serialised inputs; serialised reply frames."""
        from flwr.common import serde
        from flwr.proto.message_pb2 import Context as ProtoContext
        from flwr.proto.message_pb2 import Message as ProtoMessage

        msg = serde.message_from_proto(ProtoMessage.FromString(message))
        ctx = serde.context_from_proto(ProtoContext.FromString(context))
        reply, head = self.run(kind, msg, ctx)
        return [
            json.dumps(head).encode(),
            serde.recorddict_to_proto(reply.content).SerializeToString(),
            serde.recorddict_to_proto(ctx.state).SerializeToString(),
        ]

    def serve_connection(self, conn: socket.socket) -> None:
        """Answer one request (ping, stop, or a message under the busy lock)."""
        with conn:
            if not _same_user(conn):
                log.warning("refused a connection from another user")
                return
            head_raw, message, context = link.recv_frames(conn, 3)
            head = json.loads(head_raw)
            op = head.get("op")
            if op == "ping":
                link.send_frames(conn, json.dumps(self.status()).encode(), b"", b"")
                return
            if op == "stop":
                self.stopping.set()
                link.send_frames(conn, json.dumps(self.status()).encode(), b"", b"")
                return
            if head.get("code") != link.code_hash():
                log.info("a ClientApp runs other code: exiting to be replaced")
                self.stopping.set()
                reply = {"ok": False, "restart": True, "error": "other code"}
                link.send_frames(conn, json.dumps(reply).encode(), b"", b"")
                return
            with self.busy:
                kind = str(head.get("kind"))
                try:
                    frames = self.handle(kind, message, context)
                except Exception as err:  # noqa: BLE001 - relayed to the ClientApp
                    log.error("%s message failed:\n%s", kind, traceback.format_exc())
                    error = {"ok": False, "error": f"{type(err).__name__}: {err}"}
                    frames = [json.dumps(error).encode(), b"", b""]
                self.last_active = time.monotonic()
            link.send_frames(conn, *frames)

    def serve(self, listener: socket.socket) -> None:
        """Accept connections until stopped or idle for ``idle_exit`` seconds."""
        listener.settimeout(1.0)
        while not self.stopping.is_set():
            idle = time.monotonic() - self.last_active
            if self.idle_exit and idle > self.idle_exit and not self.busy.locked():
                log.info("idle for %.0f s: exiting", idle)
                break
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            threading.Thread(target=self._guarded, args=(conn,), daemon=True).start()
        with self.busy:  # let a running message finish and reply
            pass

    def _guarded(self, conn: socket.socket) -> None:
        try:
            self.serve_connection(conn)
        except (OSError, ValueError) as err:
            log.warning("connection dropped: %s", err, exc_info=True)


def _same_user(conn: socket.socket) -> bool:
    """Whether the peer process runs as our uid (Linux ``SO_PEERCRED``)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return True  # other platforms: the 0600 socket file alone guards it
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    _pid, uid, _gid = struct.unpack("3i", creds)
    return bool(uid == os.getuid())


def bind(state_dir: Path) -> socket.socket:
    """Listen on ``state_dir``'s socket (mode 0600); refuse if a worker answers."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = link.socket_path(state_dir)
    if link.ping(str(state_dir)) is not None:
        raise SystemExit(f"a site worker already serves {path}")
    path.unlink(missing_ok=True)  # a stale socket of a worker that died
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        with link.short_address(path) as address:
            listener.bind(address)
    finally:
        os.umask(old)
    listener.listen(16)
    return listener


def main(argv: list[str] | None = None) -> int:
    """Command line: ``serve``, ``status`` or ``stop`` the worker of a state-dir."""
    parser = argparse.ArgumentParser(
        prog="python -m fedlora.client.worker", description=__doc__.split("\n")[0]
    )
    parser.add_argument("command", choices=["serve", "status", "stop"])
    parser.add_argument("--state-dir", required=True, help="the site's state-dir")
    parser.add_argument(
        "--idle-exit",
        type=float,
        default=0.0,
        help="serve: exit after this many idle seconds (0 = never)",
    )
    parser.add_argument(
        "--runtime-api-address",
        default="",
        help="serve: also run this SuperNode's ClientApp tasks in-process (the "
        "SuperNode started with --isolation process); host:port of its Runtime API",
    )
    parser.add_argument(
        "--runtime-root-certificates",
        default="",
        help="serve: CA file of a TLS Runtime API (default: plain HTTP on the host)",
    )
    parser.add_argument(
        "--task-poll",
        type=float,
        default=0.2,
        help="serve: seconds between asks for a task (Runtime API mode)",
    )
    parser.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="serve: the pid of the SuperNode that started this worker as its "
        "child; the worker exits when it is gone (its parent changes)",
    )
    args = parser.parse_args(argv)
    state_dir = Path(args.state_dir).resolve()
    if args.command == "status":
        status = link.ping(str(state_dir))
        print(json.dumps(status) if status else f"no site worker at {state_dir}")
        return 0 if status else 1
    if args.command == "stop":
        stopped = link.stop(str(state_dir))
        print("stopped" if stopped else f"no site worker at {state_dir}")
        return 0 if stopped else 1
    quiet_logging()
    # torch & co first: the socket appears only when the worker can answer, so a
    # ClientApp waiting for it never mistakes a slow start for a dead worker.
    import fedlora.client.handlers  # noqa: F401

    listener = bind(state_dir)
    log.info("pid %d serving %s", os.getpid(), link.socket_path(state_dir))
    worker = Worker(state_dir, args.idle_exit)
    if args.runtime_api_address:
        from fedlora.client import task_loop

        certs = args.runtime_root_certificates
        loop = task_loop.TaskLoop(
            worker,
            args.runtime_api_address,
            poll=args.task_poll,
            root_certificates=Path(certs).read_bytes() if certs else None,
            parent_pid=args.parent_pid,
        )
        task_loop.start(loop)
        log.info("running the tasks of the SuperNode at %s", args.runtime_api_address)
    try:
        worker.serve(listener)
    finally:
        listener.close()
        link.socket_path(state_dir).unlink(missing_ok=True)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
