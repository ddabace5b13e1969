"""Tasks in flight at a site, on disk: what is needed to fail them after a crash.

Before the site worker runs a task (``fedlora.client.task_loop``) it writes the
task's token and the message's routing (no content) to
``<state-dir>/site-worker-<hash>.task`` (0600), and removes the file when the task
is done. If the worker dies, its supervisor (``fedlora.client.supernode``) calls
:func:`fail_orphaned_task`: each message left is answered with an error at once,
so the server drops the site for that round instead of waiting for Flower's task
token to expire (~60 s). Also here: the Runtime API client both sides use.
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


def task_file(state_dir: Path, token: str) -> Path:
    """Where a task in flight is recorded (named by a hash of its token)."""
    import hashlib

    digest = hashlib.sha256(token.encode()).hexdigest()[:16]
    return state_dir / TASK_GLOB.replace("*", digest)


def record_task(state_dir: Path, token: str, msg: Any, ctx: Any) -> None:
    """Write what :func:`fail_orphaned_task` needs if this process dies."""
    from flwr.app.message import remove_content_from_message
    from flwr.common.serde import message_to_proto

    routing = message_to_proto(remove_content_from_message(msg))
    record = {
        "token": token,
        "message": routing.SerializeToString().hex(),
        "message_id": msg.metadata.message_id,
        "message_type": msg.metadata.message_type,
        "group_id": msg.metadata.group_id,  # the server round
        "run_id": ctx.run_id,
        "node_id": ctx.node_id,
    }
    path = task_file(state_dir, token)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(record, out)


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
    from flwr.app import Context, Message, RecordDict
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.common.serde import message_from_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    msg = message_from_proto(ProtoMessage.FromString(bytes.fromhex(record["message"])))
    msg.metadata.__dict__["_message_id"] = record["message_id"]
    reply = Message(
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg
    )
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
