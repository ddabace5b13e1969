"""What replying clients report about themselves, read by the strategies.

Scalar metrics (:func:`metric`), where their time went (:func:`client_times`) and
where each reply was computed (:func:`client_nodes`), all from the records
``fedlora.client.app`` adds to a train reply.
"""

from __future__ import annotations

from flwr.app import Message, MetricRecord

from fedlora import protocol as proto


def metric(record: MetricRecord, key: str, default: float = float("nan")) -> float:
    """Scalar metric ``key`` as float (``default`` if absent or not a scalar)."""
    value = record.get(key)
    return float(value) if isinstance(value, (int, float)) else default


def client_times(metrics: list[MetricRecord]) -> dict[str, float]:
    """Where the replying clients' time went (``fedlora.client.app``'s metrics).

    Slowest client's process start-up and handler time (loading included), and
    how many base models the site workers built this round (0 once warm).
    """

    def most(key: str) -> float:
        return max((metric(m, key, 0.0) for m in metrics), default=0.0)

    return {
        "client_startup_seconds_max": most(proto.STARTUP_SECONDS),
        "client_handler_seconds_max": most(proto.HANDLER_SECONDS),
        "client_model_loads": sum(
            metric(m, proto.WORKER_MODEL_LOADS, 0.0) for m in metrics
        ),
    }


def client_nodes(replies: list[Message]) -> dict[str, str]:
    """Partition id -> the Ray node (first 12 hex digits) or host that ran it.

    From each reply's ``placement`` record (``fedlora.client.app.placement``):
    on a Ray cluster this shows which node trained which client.
    """
    nodes = {}
    for reply in replies:
        where = reply.content.config_records.get(proto.PLACEMENT)
        metrics = reply.content.metric_records.get(proto.METRICS)
        if where is None or metrics is None or proto.PARTITION_ID not in metrics:
            continue
        ray_node = str(where.get(proto.PLACEMENT_RAY_NODE, ""))
        nodes[str(int(metric(metrics, proto.PARTITION_ID)))] = ray_node[:12] or str(
            where.get(proto.PLACEMENT_HOST, "")
        )
    return dict(sorted(nodes.items(), key=lambda kv: int(kv[0])))
