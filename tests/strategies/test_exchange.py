"""The ServerApp's send/receive: every reply, arrival order, timeout honoured."""

from __future__ import annotations

import time

import numpy as np
from fake_grid import ReplyingGrid
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.superlink.grid.http_grid import HttpGrid

from fedlora.client.app import pack_reply, unpack_request
from strategies.server.exchange import send_and_receive


class SlowGrid(ReplyingGrid):
    """Reply ``i`` becomes visible on pull number ``delays[i]`` (0 = never)."""

    def __init__(self, delays: list[int]) -> None:
        super().__init__()
        self.delays = delays
        self.pulls = 0
        self.pushed = 0

    def reply(self, msg: Message) -> Message:
        index = self.pushed
        self.pushed += 1
        metrics = MetricRecord({"index": index})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        self.pulls += 1
        ready = [
            r
            for r in self._replies
            if 0 < self.delays[int(r.content["metrics"]["index"])] <= self.pulls
        ]
        wanted = set(message_ids)
        out = [r for r in ready if r.metadata.reply_to_message_id in wanted]
        self._replies = [r for r in self._replies if r not in out]
        return out


def _messages(n: int) -> list[Message]:
    content = RecordDict({"config": ConfigRecord({"x": 1})})
    return [Message(content, dst_node_id=i + 1, message_type="train") for i in range(n)]


def index(msg: Message) -> int:
    return int(msg.content["metrics"]["index"])  # type: ignore[index, arg-type]


def test_collects_every_reply_in_arrival_order(flower_task_identity: None) -> None:
    grid = SlowGrid([3, 1, 2])
    start = time.monotonic()
    replies = send_and_receive(grid, _messages(3), timeout=30, poll=0.01)
    assert [index(r) for r in replies] == [1, 2, 0]
    assert grid.pulls == 3  # stops as soon as the last reply is in
    assert time.monotonic() - start < 5


def test_a_missing_reply_ends_at_the_timeout(flower_task_identity: None) -> None:
    grid = SlowGrid([1, 0])
    start = time.monotonic()
    replies = send_and_receive(grid, _messages(2), timeout=0.3, poll=0.05)
    elapsed = time.monotonic() - start
    assert [index(r) for r in replies] == [0]
    assert 0.3 <= elapsed < 3


class DeployedGrid(ReplyingGrid, HttpGrid):
    """A deployment's grid (an ``HttpGrid``) whose site answers like a ClientApp:
    it unpacks the request, checks it, and replies packed when it came packed."""

    def __init__(self) -> None:  # no SuperLink: HttpGrid.__init__ is not run
        ReplyingGrid.__init__(self)
        self.seen: list[bool] = []

    def reply(self, msg: Message) -> Message:
        packed = unpack_request(msg)
        self.seen.append(packed)
        arrays = msg.content.array_records["arrays"]
        doubled = ArrayRecord({k: Array(a.numpy() * 2) for k, a in arrays.items()})
        reply = Message(RecordDict({"arrays": doubled}), reply_to=msg)
        return pack_reply(reply, packed)


def test_a_deployment_sends_and_receives_arrays_packed(
    flower_task_identity: None,
) -> None:
    arrays = ArrayRecord(
        {f"t{i}": Array(np.full((i + 1, 2), float(i), np.float32)) for i in range(5)}
    )
    messages = [
        Message(RecordDict({"arrays": arrays}), dst_node_id=n, message_type="train")
        for n in (1, 2)
    ]
    grid = DeployedGrid()
    replies = send_and_receive(grid, messages, timeout=30, poll=0.01, round_=4)
    assert grid.seen == [True, True]  # one object on the wire per ArrayRecord
    assert [m.metadata.group_id for m in messages] == ["4", "4"]
    for reply in replies:  # and the strategy sees plain arrays again
        got = reply.content.array_records["arrays"]
        assert list(got.keys()) == list(arrays.keys())
        for key, array in arrays.items():
            assert np.array_equal(got[key].numpy(), array.numpy() * 2)
    from flwr.superlink.grid import http_grid

    assert http_grid.pull_objects.keywords["initial_backoff"] == 0.05


def test_a_simulation_sends_arrays_as_they_are(flower_task_identity: None) -> None:
    class SimGrid(ReplyingGrid):
        seen: list[bool] = []

        def reply(self, msg: Message) -> Message:
            self.seen.append(unpack_request(msg))
            return Message(RecordDict(), reply_to=msg)

    arrays = ArrayRecord({"a": Array(np.ones(2)), "b": Array(np.zeros(3))})
    msg = Message(RecordDict({"arrays": arrays}), dst_node_id=1, message_type="train")
    grid = SimGrid()
    send_and_receive(grid, [msg], timeout=30, poll=0.01)
    assert grid.seen == [False]
