"""The ClientApp's handlers: thin glue between Messages and ``fedlora.client.round``.

They run in the per-message ClientApp process, or, with ``site-worker=true`` in the
node-config, inside the site's long-lived worker (``fedlora.client.worker``), which
keeps the model, data and ledger between rounds (``fedlora.client.app`` decides).

Replies carry only the trained adapter tensors (ArrayRecord ``arrays``) and a
MetricRecord ``metrics`` with ``num-examples`` (the FedAvg weight), ``train-loss``,
timings and byte counts (``fedlora.protocol``). Errors propagate: Flower turns an
exception into an error reply, and the server drops that client for the round and
logs why. The cross-cutting parts are hooks around the round: SHE-LoRA opens the
message and seals the reply (``fedlora.client.she``), DP-SGD loads and keeps the
client's privacy ledger (``fedlora.client.private_round``); each is a no-op when
its feature is off.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import Tensor

from fedlora import protocol as proto
from fedlora.base_facts import compute_base_facts, facts_to_content
from fedlora.client import private_round as private
from fedlora.client import she
from fedlora.client.round import (
    column_scores_for_site,
    evaluate_round,
    for_site,
    site_rank,
    train_round,
)
from fedlora.client.site import SiteConfig
from fedlora.client.site_checks import check_site
from fedlora.config import ClientConfig
from fedlora.lora.state import factor_pairs, from_record, to_record


def _residual(msg: Message) -> dict[str, tuple[Tensor, Tensor]]:
    """FLoRA's merged update sent beside the adapter (empty for other strategies)."""
    record = msg.content.array_records.get(proto.RESIDUAL)
    return factor_pairs(from_record(record)) if record is not None else {}


def train(msg: Message, context: Context) -> Message:
    """Train the received global adapter on local data; reply with trained tensors."""
    cfg = ClientConfig.from_run_config(context.run_config)
    site = SiteConfig.from_node_config(context.node_config)
    arrays_in = msg.content.array_records[proto.ARRAYS]
    config = msg.content.config_records[proto.CONFIG]
    server_round = int(str(config[proto.SERVER_ROUND]))
    frozen = str(config.get(proto.FROZEN_FINGERPRINT, ""))
    check_site(cfg, site, context, str(config.get(proto.BASE_FINGERPRINT, "")))
    global_state, sealed = she.open_message(
        msg, for_site(cfg, site), site, context.run_config
    )
    ledger = private.open_ledger(cfg, site, context)
    outcome = train_round(
        cfg, site, server_round, global_state, frozen, ledger, _residual(msg)
    )
    private.keep_ledger(ledger, cfg, site, context)
    state_out, records, she_metrics = she.seal(
        sealed, outcome.state, config, for_site(cfg, site), outcome.num_examples
    )
    arrays_out = to_record(state_out, cfg.federation.transport_dtype)
    values = proto.train_metrics(
        num_examples=outcome.num_examples,
        loss=outcome.result.loss,
        steps=outcome.result.steps,
        seconds=outcome.result.seconds,
        bytes_down=arrays_in.count_bytes(),
        bytes_up=arrays_out.count_bytes(),
        partition_id=site.partition_id,
        privacy=outcome.privacy,
        extra=she_metrics,
    )
    content = RecordDict(
        {proto.ARRAYS: arrays_out, proto.METRICS: MetricRecord(values)}
    )
    for key, record in records.items():
        content[key] = record
    return Message(content, reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global adapter on this client's data."""
    cfg = ClientConfig.from_run_config(context.run_config)
    site = SiteConfig.from_node_config(context.node_config)
    config = msg.content.config_records[proto.CONFIG]
    check_site(cfg, site, context, str(config.get(proto.BASE_FINGERPRINT, "")))
    state, _ = she.open_message(msg, for_site(cfg, site), site, context.run_config)
    frozen = str(config.get(proto.FROZEN_FINGERPRINT, ""))
    result = evaluate_round(cfg, site, state, _residual(msg), frozen)
    values = proto.evaluate_metrics(
        num_examples=result.num_examples,
        loss=result.loss,
        accuracy=result.accuracy,
        perplexity=result.perplexity,
        exact_match=result.exact_match,
        rouge_l=result.rouge_l,
    )
    return Message(RecordDict({proto.METRICS: MetricRecord(values)}), reply_to=msg)


def query(msg: Message, context: Context) -> Message:
    """Answer the server's questions (rank, HE budget, scores, base facts)."""
    cfg = ClientConfig.from_run_config(context.run_config)
    site = SiteConfig.from_node_config(context.node_config)
    kind = str(msg.content.config_records[proto.CONFIG].get(proto.QUERY, ""))
    if kind == proto.QUERY_BASE_FACTS:
        return Message(base_facts(cfg, site), reply_to=msg)
    budget = she.budget_of(site, context.run_config)
    if kind == proto.QUERY_SITE:
        info = MetricRecord(
            {
                proto.RANK: site_rank(cfg, site),
                proto.HE_BUDGET: budget,
                proto.PARTITION_ID: site.partition_id,
            }
        )
        return Message(RecordDict({proto.SITE: info}), reply_to=msg)
    if kind == proto.QUERY_SHE_SENSITIVITY:
        scores = ConfigRecord()
        for name, (pos, sc) in column_scores_for_site(cfg, site, budget).items():
            scores[f"{proto.SCORE_POSITIONS}{name}"] = pos
            scores[f"{proto.SCORE_VALUES}{name}"] = sc
        return Message(RecordDict({proto.SHE_SCORES: scores}), reply_to=msg)
    raise ValueError(
        f"unknown query {kind!r}; this client answers {proto.QUERY_SITE}, "
        f"{proto.QUERY_SHE_SENSITIVITY}, {proto.QUERY_BASE_FACTS}"
    )


def base_facts(cfg: ClientConfig, site: SiteConfig) -> RecordDict:
    """Return the run's base facts (``fedlora.base_facts``) for a simulated server.

    They are those of the run's own config (global rank, no site overrides). A
    site that trains that very model keeps it cached for its first round; one
    whose rank or model path differs builds it for this reply alone.
    """
    own = for_site(cfg, site)
    cached = (own.model, own.adapter) == (cfg.model, cfg.adapter)
    return facts_to_content(compute_base_facts(cfg, cached=cached))


def handler_for(kind: str) -> Callable[[Message, Context], Message]:
    """Return the handler of a message kind: train, evaluate, else query."""
    return {"train": train, "evaluate": evaluate}.get(kind, query)
