"""Send a round's messages and collect the replies, polling every quarter second.

Flower 1.41's ``Grid.send_and_receive`` on a deployment (``GrpcGrid``/``HttpGrid``)
sleeps 3 s between two pulls of the replies, so a round whose last reply arrives
just after a pull waits up to 3 s more (the simulation's in-memory grid polls
every 0.1 s). Measured on 127.0.0.1 with site workers this polling was a large
share of a round (``benchmarks/site_worker.py``). This helper pushes and pulls
through the same public ``Grid`` calls with a 0.25 s pause: a pull is one small
request to the SuperLink.

A reply becomes visible before its arrays are uploaded (the SuperNode pushes the
message, then its objects), and the deployed grid then retries the arrays after
1 s, 2 s, 4 s: measured, 2-3.5 s per round on the tiny job. :func:`quick_retries`
starts those retries at 0.05 s (doubling up to 1 s).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable
from logging import WARNING

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedlora import packing

POLL_SECONDS = 0.25
FIRST_RETRY_SECONDS = 0.05


def quick_retries() -> None:
    """Make the deployed grid retry a reply's missing arrays after 0.05 s, not 1 s.

    Patches ``pull_objects`` as ``flwr.superlink.grid.http_grid`` (Flower 1.41)
    calls it, with a shorter first backoff; the SuperNode side is
    ``fedlora.client.supernode.patch_fleet_poll``. Idempotent.
    """
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.superlink.grid import http_grid

    current = getattr(http_grid, "pull_objects", None)
    original = getattr(current, "func", current)
    if original is not inflatable_utils.pull_objects:
        raise RuntimeError(
            "flwr.superlink.grid.http_grid no longer calls pull_objects; this "
            "Flower version is not supported by strategies.server.exchange"
        )
    http_grid.pull_objects = functools.partial(  # type: ignore[attr-defined]
        original, initial_backoff=FIRST_RETRY_SECONDS, backoff_cap=1.0
    )


def send_and_receive(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float | None,
    poll: float = POLL_SECONDS,
    round_: int | None = None,
) -> list[Message]:
    """Push ``messages``; return the replies that arrive within ``timeout`` seconds.

    Like ``Grid.send_and_receive``: ``timeout=None`` waits for every reply; replies
    (error replies included) come back in arrival order. ``round_`` becomes the
    messages' ``group_id`` where unset: SuperNodes log it, and a site can tell
    which round a message belongs to.
    """
    pending = push(grid, messages, round_)
    return receive(grid, pending, timeout, poll)


def push(
    grid: Grid, messages: Iterable[Message], round_: int | None = None
) -> set[str]:
    """Push ``messages`` (see :func:`send_and_receive`); return their ids."""
    from flwr.superlink.grid.http_grid import HttpGrid

    messages = list(messages)
    if round_ is not None:
        for msg in messages:
            msg.metadata.group_id = msg.metadata.group_id or str(round_)

    if isinstance(grid, HttpGrid):  # a deployment (simulations move no objects)
        quick_retries()
        messages = [_packed(m) for m in messages]
    return set(grid.push_messages(messages))


def receive(
    grid: Grid, pending: set[str], timeout: float | None, poll: float = POLL_SECONDS
) -> list[Message]:
    """Pull the replies to the pushed ``pending`` ids (see :func:`send_and_receive`)."""
    pending = set(pending)
    end = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(_unpacked(m) for m in got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending or (end is not None and time.monotonic() >= end):
            break
        time.sleep(poll)
    return replies


def _packed(msg: Message) -> Message:
    """``msg`` with each ArrayRecord as one transport object (``fedlora.packing``)."""
    if msg.has_content():
        msg.content = packing.pack_content(msg.content)
    return msg


def _unpacked(reply: Message) -> Message:
    """Restore a reply's packed arrays; a malformed one is logged and left packed.

    The strategy's reply check then drops it, with the reason.
    """
    if reply.has_content():
        try:
            reply.content = packing.unpack_content(reply.content)
        except packing.PackingError as err:
            log(WARNING, "fedlora: node %d: %s", reply.metadata.src_node_id, err)
    return reply
