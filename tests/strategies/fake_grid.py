"""A test Grid that answers every pushed message at once, in this process."""

from __future__ import annotations

from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Message


class ReplyingGrid:
    """Push/pull like Flower's grids; subclasses define :meth:`reply`.

    ``push_messages`` gives each message an id (as the SuperLink does) and
    computes its reply; ``pull_messages`` hands back the replies to those ids.
    """

    def __init__(self) -> None:
        self._replies: list[Message] = []

    def reply(self, msg: Message) -> Message:
        """The reply to one message (created with ``reply_to=msg``)."""
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid4().hex
            self._replies.append(self.reply(msg))
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        wanted = set(message_ids)
        out = [r for r in self._replies if r.metadata.reply_to_message_id in wanted]
        self._replies = [r for r in self._replies if r not in out]
        return out
