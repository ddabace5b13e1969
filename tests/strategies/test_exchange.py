"""The ServerApp's send/receive: every reply, arrival order, timeout honoured."""

from __future__ import annotations

import time

from fake_grid import ReplyingGrid
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

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
