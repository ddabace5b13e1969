"""Flower ClientApp: thin glue between Messages and ``fedlora.client``.

Replies carry only the trained adapter tensors (ArrayRecord ``arrays``) and a
MetricRecord ``metrics`` with ``num-examples`` (the FedAvg weight), ``train-loss``,
timings and byte counts. Errors propagate: Flower turns an exception into an error
reply, and the server drops that client for the round and logs why.
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.adapters import from_record, to_record
from fedlora.client import evaluate_round, train_round
from fedlora.config import ClientConfig
from fedlora.site import SiteConfig

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global adapter on local data; reply with trained tensors."""
    cfg = ClientConfig.from_run_config(context.run_config)
    site = SiteConfig.from_node_config(context.node_config)
    arrays_in = msg.content.array_records["arrays"]
    server_round = int(str(msg.content.config_records["config"]["server-round"]))
    outcome = train_round(cfg, site, server_round, from_record(arrays_in))
    arrays_out = to_record(outcome.state)
    metrics = MetricRecord(
        {
            "num-examples": outcome.num_examples,
            "train-loss": outcome.result.loss,
            "train-steps": outcome.result.steps,
            "train-seconds": outcome.result.seconds,
            "bytes-down": arrays_in.count_bytes(),
            "bytes-up": arrays_out.count_bytes(),
        }
    )
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
