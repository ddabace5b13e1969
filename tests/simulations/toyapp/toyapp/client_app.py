"""Toy ClientApp: adds 1 to every array and reports a fake loss."""

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Return the received arrays plus one."""
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    updated = ArrayRecord([a + 1.0 for a in arrays])
    pid = int(context.node_config["partition-id"])
    print(f"toy client {pid} trained", flush=True)  # what a client prints: kept
    metrics = MetricRecord({"train_loss": float(pid), "num-examples": 10})
    content = RecordDict({"arrays": updated, "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Report the mean of the received arrays as the evaluation loss."""
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    loss = float(np.mean([a.mean() for a in arrays]))
    metrics = MetricRecord({"eval_loss": loss, "num-examples": 10})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
