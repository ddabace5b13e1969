"""Flower ClientApp: run each message here, or hand it to the site worker.

By default the handlers (``fedlora.client.handlers``) run in this process: in a
simulation that is a Ray actor that lives for the whole run, so the model is loaded
once. A deployed SuperNode, though, starts a fresh ClientApp process per message.
With ``site-worker=true`` (and ``state-dir``) in the node-config, this module only
forwards the message to the site's long-lived worker (``fedlora.client.worker``,
started on demand) and returns its reply, without importing torch.

Every train and evaluate reply gains timing metrics (``fedlora.protocol``):
``startup-seconds`` (process start to this handler, on a process's first message
only, else 0), ``handler-seconds`` (the handler, model and data loading included)
and, through the worker, ``worker-seconds`` and ``worker-model-loads``; and a
``placement`` record: the host and, in a Ray actor, the Ray node that ran it.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora import packing
from fedlora import protocol as proto
from fedlora.client.site import SiteConfig

app = ClientApp()
_FIRST = [True]  # whether this process has not handled a message yet


def _startup_seconds() -> float:
    """Seconds from this process's start to now, on its first message; else 0."""
    if not _FIRST[0]:
        return 0.0
    _FIRST[0] = False
    import psutil

    return max(0.0, time.time() - float(psutil.Process().create_time()))


def _local(kind: str) -> Callable[[Message, Context], Message]:
    from fedlora.client import handlers

    return handlers.handler_for(kind)


def _via_worker(kind: str, msg: Message, context: Context, state_dir: str) -> Message:
    """Forward to the site worker; copy back the reply and the context state."""
    from flwr.common import serde
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    from fedlora.client import worker_link

    head, content, state = worker_link.handle(
        kind,
        serde.message_to_proto(msg).SerializeToString(),
        serde.context_to_proto(context).SerializeToString(),
        state_dir,
    )
    new_state = serde.recorddict_from_proto(ProtoRecordDict.FromString(state))
    for key in list(context.state.keys()):
        del context.state[key]
    for key, record in new_state.items():
        context.state[key] = record
    reply = serde.recorddict_from_proto(ProtoRecordDict.FromString(content))
    return Message(with_worker_metrics(reply, head), reply_to=msg)


def with_worker_metrics(content: RecordDict, head: dict[str, Any]) -> RecordDict:
    """Add the worker's handler seconds and base-model loads to a reply's metrics."""
    metrics = content.metric_records.get(proto.METRICS)
    if metrics is not None:
        metrics[proto.WORKER_SECONDS] = float(head.get("seconds", 0.0))
        metrics[proto.WORKER_MODEL_LOADS] = int(head.get("built", 0))
    return content


def placement() -> ConfigRecord:
    """Where this process runs: its host and, in a Ray actor, the Ray node id.

    Ray is only asked when this process already imported it (a simulation's
    actor); a deployed site never imports it for this.
    """
    ray_node = ""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray_node = str(ray.get_runtime_context().get_node_id())
    return ConfigRecord(
        {proto.PLACEMENT_HOST: socket.gethostname(), proto.PLACEMENT_RAY_NODE: ray_node}
    )


def with_timings(kind: str, reply: Message, startup: float, seconds: float) -> Message:
    """Add timings (``startup-seconds``, ``handler-seconds``) and the placement."""
    if kind != "query" and reply.has_content():
        metrics = reply.content.metric_records.get(proto.METRICS, MetricRecord())
        metrics[proto.STARTUP_SECONDS] = startup
        metrics[proto.HANDLER_SECONDS] = seconds
        reply.content[proto.METRICS] = metrics
        reply.content[proto.PLACEMENT] = placement()
    return reply


def unpack_request(msg: Message) -> bool:
    """Restore a packed request's arrays in place (``fedlora.packing``).

    Returns whether it was packed: the reply is then packed too.
    """
    if not msg.has_content() or not packing.content_is_packed(msg.content):
        return False
    msg.content = packing.unpack_content(msg.content)
    return True


def pack_reply(reply: Message, packed: bool) -> Message:
    """Pack ``reply``'s arrays when the request came packed."""
    if packed and reply.has_content():
        reply.content = packing.pack_content(reply.content)
    return reply


def _dispatch(kind: str, msg: Message, context: Context) -> Message:
    startup = _startup_seconds()
    start = time.perf_counter()
    packed = unpack_request(msg)
    site = SiteConfig.from_node_config(context.node_config)
    if site.worker:
        reply = _via_worker(kind, msg, context, site.state_dir)
    else:
        reply = _local(kind)(msg, context)
    reply = with_timings(kind, reply, startup, time.perf_counter() - start)
    return pack_reply(reply, packed)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global adapter on local data; reply with trained tensors."""
    return _dispatch("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global adapter on this client's data."""
    return _dispatch("evaluate", msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer the server's questions (rank, HE budget, scores, base facts)."""
    return _dispatch("query", msg, context)
