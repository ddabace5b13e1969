"""Flower ClientApp: thin glue between Messages and ``fedlora.client``.

Replies carry only the trained adapter tensors (ArrayRecord ``arrays``) and a
MetricRecord ``metrics`` with ``num-examples`` (the FedAvg weight), ``train-loss``,
timings and byte counts. Errors propagate: Flower turns an exception into an error
reply, and the server drops that client for the round and logs why.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.adapters import from_record, to_record
from fedlora.client import evaluate_round, train_round
from fedlora.config import ClientConfig
from fedlora.site import SiteConfig

app = ClientApp()
# context.state key of the DP ledger (accountant history) of this node.
LEDGER_RECORD = "fedlora-dp"


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global adapter on local data; reply with trained tensors."""
    cfg = ClientConfig.from_run_config(context.run_config)
    site = SiteConfig.from_node_config(context.node_config)
    arrays_in = msg.content.array_records["arrays"]
    config = msg.content.config_records["config"]
    server_round = int(str(config["server-round"]))
    frozen = str(config.get("frozen-fingerprint", ""))
    ledger, ledger_file = None, None
    if cfg.privacy.mode == "dp":
        from fedlora.private import ledger_path, load_ledger

        ledger_file = ledger_path(
            cfg, site, str(context.run_config.get("output_dir", ""))
        )
        stored = context.state.config_records.get(LEDGER_RECORD)
        ledger = load_ledger(cfg, ledger_file, str(stored["ledger"]) if stored else "")
    outcome = train_round(
        cfg, site, server_round, from_record(arrays_in), frozen, ledger
    )
    if ledger is not None and ledger_file is not None:
        ledger.save(ledger_file)
        context.state[LEDGER_RECORD] = ConfigRecord({"ledger": ledger.to_json()})
    arrays_out = to_record(outcome.state)
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
    metrics = MetricRecord(values)
    return Message(RecordDict({"arrays": arrays_out, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global adapter on this client's data."""
    cfg = ClientConfig.from_run_config(context.run_config)
    site = SiteConfig.from_node_config(context.node_config)
    result = evaluate_round(cfg, site, from_record(msg.content.array_records["arrays"]))
    values: dict[str, int | float | list[int] | list[float]] = {
        "num-examples": result.num_examples,
        "eval-loss": result.loss,
    }
    if result.accuracy is not None:
        values["eval-accuracy"] = result.accuracy
    if result.perplexity is not None:
        values["eval-perplexity"] = result.perplexity
    return Message(RecordDict({"metrics": MetricRecord(values)}), reply_to=msg)
