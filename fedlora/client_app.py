"""Flower ClientApp: thin glue between Messages and ``fedlora.client``.

Replies carry only the trained adapter tensors (ArrayRecord ``arrays``) and a
MetricRecord ``metrics`` with ``num-examples`` (the FedAvg weight), ``train-loss``,
timings and byte counts. Errors propagate: Flower turns an exception into an error
reply, and the server drops that client for the round and logs why.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import Tensor

from fedlora.adapters import factor_pairs, from_record, to_record
from fedlora.client import (
    check_base_model,
    column_scores_for_site,
    evaluate_round,
    for_site,
    site_rank,
    train_round,
)
from fedlora.config import ClientConfig
from fedlora.residual import RESIDUAL_RECORD
from fedlora.she import flower as she
from fedlora.site import SiteConfig

app = ClientApp()
# context.state key of the DP ledger (accountant history) of this node.
LEDGER_RECORD = "fedlora-dp"


def _residual(msg: Message) -> dict[str, tuple[Tensor, Tensor]]:
    """FLoRA's merged update sent beside the adapter (empty for other strategies)."""
    record = msg.content.array_records.get(RESIDUAL_RECORD)
    return factor_pairs(from_record(record)) if record is not None else {}


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global adapter on local data; reply with trained tensors."""
    cfg = ClientConfig.from_run_config(context.run_config)
    site = SiteConfig.from_node_config(context.node_config)
    arrays_in = msg.content.array_records["arrays"]
    config = msg.content.config_records["config"]
    server_round = int(str(config["server-round"]))
    frozen = str(config.get("frozen-fingerprint", ""))
    check_base_model(cfg, site, str(config.get("base-fingerprint", "")))
    global_state = from_record(arrays_in)
    she_ctx, she_metrics = None, {}
    if she.is_she(config):
        she_ctx = she.secret_context(site, context.run_config)
        global_state, seconds = she.received_state(
            msg.content, for_site(cfg, site), she_ctx
        )
        she_metrics["he-decrypt-seconds"] = seconds
    ledger, ledger_file = None, None
    if cfg.privacy.mode == "dp":
        from fedlora.private import ledger_path, load_ledger

        ledger_file = ledger_path(
            cfg, site, str(context.run_config.get("output_dir", ""))
        )
        stored = context.state.config_records.get(LEDGER_RECORD)
        ledger = load_ledger(cfg, ledger_file, str(stored["ledger"]) if stored else "")
    outcome = train_round(
        cfg, site, server_round, global_state, frozen, ledger, _residual(msg)
    )
    if ledger is not None and ledger_file is not None:
        ledger.save(ledger_file)
        context.state[LEDGER_RECORD] = ConfigRecord({"ledger": ledger.to_json()})
    records: dict[str, ConfigRecord] = {}
    state_out = outcome.state
    if she_ctx is not None:
        state_out, records, sealed = she.sealed_reply(
            outcome.state, config, for_site(cfg, site), she_ctx, outcome.num_examples
        )
        she_metrics.update(sealed)
    arrays_out = to_record(state_out)
    values: dict[str, int | float | list[int] | list[float]] = {
        "num-examples": outcome.num_examples,
        "train-loss": outcome.result.loss,
        "train-steps": outcome.result.steps,
        "train-seconds": outcome.result.seconds,
        "bytes-down": arrays_in.count_bytes(),
        "bytes-up": arrays_out.count_bytes(),
        "partition-id": site.partition_id,
    }
    if outcome.privacy is not None:
        p = outcome.privacy
        values.update(
            {
                "epsilon": p.epsilon,
                "dp-noise-multiplier": p.noise_multiplier,
                "dp-sample-rate": p.sample_rate,
                "dp-steps": p.steps,
                "dp-delta": p.delta,
                "dp-exhausted": int(p.exhausted),
            }
        )
    values.update(she_metrics)
    content = RecordDict({"arrays": arrays_out, "metrics": MetricRecord(values)})
    for key, record in records.items():
        content[key] = record
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global adapter on this client's data."""
    cfg = ClientConfig.from_run_config(context.run_config)
    site = SiteConfig.from_node_config(context.node_config)
    config = msg.content.config_records["config"]
    check_base_model(cfg, site, str(config.get("base-fingerprint", "")))
    state = from_record(msg.content.array_records["arrays"])
    if she.is_she(config):
        ctx = she.secret_context(site, context.run_config)
        state, _ = she.received_state(msg.content, for_site(cfg, site), ctx)
    result = evaluate_round(cfg, site, state, _residual(msg))
    values: dict[str, int | float | list[int] | list[float]] = {
        "num-examples": result.num_examples,
        "eval-loss": result.loss,
    }
    if result.accuracy is not None:
        values["eval-accuracy"] = result.accuracy
    if result.perplexity is not None:
        values["eval-perplexity"] = result.perplexity
    return Message(RecordDict({"metrics": MetricRecord(values)}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer the server's questions about this site (rank, HE budget, scores)."""
    cfg = ClientConfig.from_run_config(context.run_config)
    site = SiteConfig.from_node_config(context.node_config)
    kind = str(msg.content.config_records["config"].get("fedlora-query", ""))
    budget = she.budget_of(site, context.run_config)
    if kind == "site":
        info = MetricRecord(
            {
                "rank": site_rank(cfg, site),
                "he-budget": budget,
                "partition-id": site.partition_id,
            }
        )
        return Message(RecordDict({"site": info}), reply_to=msg)
    if kind == "she-sensitivity":
        scores = ConfigRecord()
        for name, (pos, sc) in column_scores_for_site(cfg, site, budget).items():
            scores[f"pos:{name}"] = pos
            scores[f"score:{name}"] = sc
        return Message(RecordDict({"she-scores": scores}), reply_to=msg)
    raise ValueError(
        f"unknown query {kind!r}; this client answers site, she-sensitivity"
    )
