"""Tasks in flight at a site, on disk: what is needed to fail them after a crash.

Before the site worker runs a task (``fedlora.client.task_loop``) it writes the
task's token and the message's routing (no content) to
``<state-dir>/site-worker-<hash>.task`` (0600), and removes the file when the task
is done. If the worker dies, its supervisor (``fedlora.client.supernode``) calls
:func:`fail_orphaned_task`: each message left is answered with an error at once,
so the server drops the site for that round instead of waiting for Flower's task
token to expire (~60 s).

The site command's SuperNode also records every message it pulls, in
``<state-dir>/site-message-<hash>.pulled`` (0600, routing only), from the pull
until its reply is sent (:func:`record_pulled`, :func:`forget_pulled`). Flower
delivers a message once: if the whole site dies after the pull (SIGKILL, OOM, a
power cut) and is back before the SuperLink misses its heartbeats, no "Node
Unavailable" reply is made and the server would wait ``federation.round_timeout``
(3600 s by default) for the lost reply. The restarted site answers every record
left with an error instead (:func:`leftover_replies`), so the round goes on
without it and the site trains again from the next round.

Also here: the Runtime API client both sides use.
"""

from __future__ import annotations

import json
import logging
import os
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.supercore.runtime import RuntimeHttpClient

log = logging.getLogger("fedlora.worker")

TASK_GLOB = "site-worker-*.task"  # one file per task in flight
PULLED_GLOB = "site-message-*.pulled"  # one file per message pulled, not answered


def _named(state_dir: Path, glob: str, key: str) -> Path:
    import hashlib

    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return state_dir / glob.replace("*", digest)


def task_file(state_dir: Path, token: str) -> Path:
    """Where a task in flight is recorded (named by a hash of its token)."""
    return _named(state_dir, TASK_GLOB, token)


def _routing(msg: Any) -> dict[str, Any]:
    """Return what an error reply to ``msg`` needs: its metadata, no content."""
    from flwr.app.message import remove_content_from_message
    from flwr.common.serde import message_to_proto

    routing = message_to_proto(remove_content_from_message(msg))
    return {
        "message": routing.SerializeToString().hex(),
        "message_id": msg.metadata.message_id,
        "message_type": msg.metadata.message_type,
        "group_id": msg.metadata.group_id,  # the server round
        "run_id": msg.metadata.run_id,
        "node_id": msg.metadata.dst_node_id,
    }


def _write_private(path: Path, record: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(record, out)


def recorded_message(record: dict[str, Any]) -> Any:
    """Return the recorded message (``_routing``): its metadata, no content."""
    from flwr.common.serde import message_from_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    msg = message_from_proto(ProtoMessage.FromString(bytes.fromhex(record["message"])))
    msg.metadata.__dict__["_message_id"] = record["message_id"]
    return msg


def error_reply(asked: Any, reason: str) -> Any:
    """Return the error Message that answers ``asked`` (a Flower Message)."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode

    return Message(
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=asked
    )


def record_pulled(state_dir: Path, msg: Any) -> None:
    """Note that this site holds ``msg`` (pulled, not answered); see module doc."""
    record = {**_routing(msg), "pid": os.getpid()}
    _write_private(_named(state_dir, PULLED_GLOB, msg.metadata.message_id), record)


def forget_pulled(state_dir: Path, message_id: str) -> None:
    """Drop the record of a message answered (or dropped by the SuperNode)."""
    _named(state_dir, PULLED_GLOB, message_id).unlink(missing_ok=True)


def leftover_replies(state_dir: Path, node_id: int) -> list[tuple[Any, Any]]:
    """Return ``(message, error reply)`` for each message a dead process left.

    Records of another node id (the site's key changed) cannot be answered by
    this node and are dropped with a warning; the worker's task files of that
    process are dropped too (their tokens died with its SuperNode).
    """
    replies = []
    for path in sorted(state_dir.glob(PULLED_GLOB)):
        record = json.loads(path.read_text())
        path.unlink()
        if int(record["node_id"]) != node_id:
            log.warning(
                "message %s was pulled by node %s, this site is node %s: left to "
                "expire", record["message_id"], record["node_id"], node_id,
            )  # fmt: skip
            continue
        reason = (
            f"the site's process (pid {record['pid']}) stopped while handling this "
            "message; the restarted site takes part again from the next message"
        )
        asked = recorded_message(record)
        replies.append((asked, error_reply(asked, reason)))
    for path in state_dir.glob(TASK_GLOB):
        path.unlink()
    return replies


def record_task(state_dir: Path, token: str, msg: Any, ctx: Any) -> None:
    """Write what :func:`fail_orphaned_task` needs if this process dies."""
    record = {**_routing(msg), "token": token, "run_id": ctx.run_id}
    _write_private(task_file(state_dir, token), {**record, "node_id": ctx.node_id})


def fail_orphaned_task(
    state_dir: Path, address: str, reason: str, root_certificates: bytes | None = None
) -> bool:
    """Reply with an error for each task a dead worker left; ``True`` if any.

    Called by the worker's supervisor after a crash: the server then drops the
    site for this round at once instead of after the task token expires.
    """
    failed = False
    for path in sorted(state_dir.glob(TASK_GLOB)):
        record = json.loads(path.read_text())
        path.unlink()
        failed |= _fail_task(record, address, reason, root_certificates)
    return failed


def _fail_task(
    record: dict[str, Any], address: str, reason: str, certs: bytes | None
) -> bool:
    from flwr.app import Context, RecordDict
    from flwr.common.constant import SubStatus
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    reply = error_reply(recorded_message(record), reason)
    client = runtime_client(address, record["token"], certs)
    try:
        routing = Context(
            run_id=int(record["run_id"]),
            node_id=int(record["node_id"]),
            node_config={},
            state=RecordDict(),
            run_config={},
        )
        push_message(client, reply, routing)
        push_task_output(client, None, SubStatus.FAILED, reason)
    except Exception:  # noqa: BLE001 - the token may be gone; it then expires
        log.warning("could not fail the orphaned task:\n%s", traceback.format_exc())
        return False
    finally:
        client.close()
    return True


def runtime_client(
    address: str, token: str | None, root_certificates: bytes | None
) -> RuntimeHttpClient:
    """HTTP client of the SuperNode's Runtime API (with a task token, for a task)."""
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    component = "flwr-clientapp" if token else "SuperExec"
    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=root_certificates is None,
        root_certificates=root_certificates,
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )
