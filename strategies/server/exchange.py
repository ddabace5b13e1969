"""Send a round's messages and collect the replies, polling every quarter second.

Flower 1.41's ``Grid.send_and_receive`` on a deployment (``GrpcGrid``/``HttpGrid``)
sleeps 3 s between two pulls of the replies, so a round whose last reply arrives
just after a pull waits up to 3 s more (the simulation's in-memory grid polls
every 0.1 s). Measured on 127.0.0.1 with site workers this polling was a large
share of a round (``benchmarks/site_worker.py``). This helper pushes and pulls
through the same public ``Grid`` calls with a 0.25 s pause: a pull is one small
request to the SuperLink.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

POLL_SECONDS = 0.25


def send_and_receive(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float | None,
    poll: float = POLL_SECONDS,
) -> list[Message]:
    """Push ``messages``; return the replies that arrive within ``timeout`` seconds.

    Like ``Grid.send_and_receive``: ``timeout=None`` waits for every reply; replies
    (error replies included) come back in arrival order.
    """
    pending = set(grid.push_messages(messages))
    end = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending or (end is not None and time.monotonic() >= end):
            break
        time.sleep(poll)
    return replies
