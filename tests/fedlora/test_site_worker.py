"""The site worker: same replies as in-process handling, one model load per run,
a killed worker fails only its message, a new run never reuses the old state."""

from __future__ import annotations

import importlib
import os
import pkgutil
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from tiny_configs import tiny_config

import fedlora
from fedlora import protocol as proto
from fedlora.cache import model_bundle
from fedlora.client import worker_link
from fedlora.client.app import app as client_app
from fedlora.client.worker import package_caches, reset_process_state
from fedlora.config.flat import flatten_config
from fedlora.lora.state import adapter_state, from_record, to_record

CFG = tiny_config(
    "classification",
    {"federation.clients": 2, "federation.local_steps": 3, "train.batch_size": 8},
)


def _wire(content: RecordDict) -> RecordDict:
    return recorddict_from_proto(recorddict_to_proto(content))


def train_message(state: dict[str, torch.Tensor], rnd: int) -> Message:
    config = ConfigRecord({proto.SERVER_ROUND: rnd})
    content = RecordDict({proto.ARRAYS: to_record(state), proto.CONFIG: config})
    return Message(_wire(content), dst_node_id=7, message_type="train")


def context(
    node_config: dict[str, object], run_id: int = 1, steps: int | None = None
) -> Context:
    run_config = flatten_config(CFG)
    if steps is not None:
        run_config["federation.local_steps"] = steps
    return Context(
        run_id=run_id,
        node_id=7,
        node_config={"partition-id": 0, "num-partitions": 2, **node_config},
        state=RecordDict(),
        run_config=run_config,
    )


def test_frames_round_trip_over_a_socket() -> None:
    left, right = socket.socketpair()
    with left, right:
        worker_link.send_frames(left, b"", b"x" * 100_000, b"head")
        assert worker_link.recv_frames(right, 3) == [b"", b"x" * 100_000, b"head"]
        left.close()
        with pytest.raises(ConnectionError):
            worker_link.recv_frames(right, 1)


def test_reset_clears_every_cache_of_the_package() -> None:
    """A new lru_cache anywhere in fedlora must be dropped between runs too."""
    for info in pkgutil.walk_packages(fedlora.__path__, "fedlora."):
        importlib.import_module(info.name)
    model_bundle(CFG)  # fill the model, tokenizer and data caches
    caches = package_caches()
    names = {c.__module__ + "." + c.__name__ for c in caches}
    assert {"fedlora.cache._bundle", "fedlora.models.load_tokenizer"} <= names
    assert any(c.cache_info().currsize for c in caches)
    reset_process_state()
    assert [c for c in caches if c.cache_info().currsize] == []


@pytest.mark.slow
def test_worker_serves_rounds_like_the_clientapp_itself(
    tmp_path: Path, flower_task_identity: None
) -> None:
    state_dir = tmp_path / ("deep-" + "d" * 60) / "site"  # beyond AF_UNIX's limit
    initial = adapter_state(model_bundle(CFG).model)
    via = context({"site-worker": True, "state-dir": str(state_dir)})
    try:
        replies = [client_app(train_message(initial, r), via) for r in (1, 2, 3)]
        status = worker_link.ping(str(state_dir))
        assert status is not None and status["run_model_loads"] == 1
        mode = os.stat(worker_link.socket_path(state_dir)).st_mode & 0o777
        assert mode == 0o600  # only the site's account
        # the same message handled in this process gives the same tensors
        local = client_app(train_message(initial, 3), context({}))
        got = from_record(replies[-1].content.array_records[proto.ARRAYS])
        want = from_record(local.content.array_records[proto.ARRAYS])
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in got)
        loads = [
            r.content.metric_records[proto.METRICS][proto.WORKER_MODEL_LOADS]
            for r in replies
        ]
        assert loads == [1, 0, 0]  # the base model is loaded once for the run

        # killed mid-message: that message fails, the next one starts a new worker
        errors: list[BaseException] = []
        # long enough that the worker is surely still busy when it is killed
        # (3 steps take ~50 ms: a poll could miss them)
        endless = context(dict(via.node_config), steps=100_000)

        def doomed() -> None:
            try:
                client_app(train_message(initial, 4), endless)
            except BaseException as err:  # noqa: BLE001 - inspected below
                errors.append(err)

        thread = threading.Thread(target=doomed)
        thread.start()
        deadline = time.monotonic() + 60
        while not (worker_link.ping(str(state_dir)) or {}).get("busy"):
            assert time.monotonic() < deadline, "the worker never got the message"
            time.sleep(0.05)
        os.kill(int(status["pid"]), signal.SIGKILL)
        thread.join(timeout=60)
        assert errors and "stopped while handling a train message" in str(errors[0])
        again = client_app(train_message(initial, 4), via)
        status2 = worker_link.ping(str(state_dir))
        assert status2 is not None and status2["pid"] != status["pid"]
        assert proto.ARRAYS in again.content.array_records

        # another run: its state is rebuilt, never reused
        client_app(train_message(initial, 1), context(dict(via.node_config), 2))
        status3 = worker_link.ping(str(state_dir))
        assert status3 is not None and status3["run_id"] == 2
        assert status3["run_model_loads"] == 1 and status3["model_loads"] == 2

        # a ClientApp of other code (a new app version): the worker leaves
        other = {"op": "handle", "kind": "train", "code": "another version"}
        head, _ = worker_link.request(str(state_dir), other, b"", b"")
        assert head["restart"] is True
        worker_link._wait_gone(str(state_dir), int(status3["pid"]))
    finally:
        worker_link.stop(str(state_dir))
