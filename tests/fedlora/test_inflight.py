"""Messages a site pulled and did not answer: recorded by the site command's
SuperNode, answered with an error by the restarted site. Runs Flower's own
SuperNode loop functions (``_pull_and_store_message``, ``_push_messages``) on its
own in-memory state; only the network (``receive``, ``send``) is replaced. The
deployed path, SIGKILL included, is ``tests/simulations/test_deployment_faults.py``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supernode import start_client_internal as sci
from flwr.supernode.nodestate import NodeStateFactory

from fedlora.client import supernode, task_records

NODE = 4242
pytestmark = pytest.mark.usefixtures("flower_task_identity")  # to build messages


def pulled_message(run_id: int = 17, round_: int = 2) -> Message:
    """A train message as the SuperNode receives it (routing set by the SuperLink)."""
    content = RecordDict({"config": ConfigRecord({"server-round": round_})})
    msg = Message(content, dst_node_id=NODE, message_type="train", group_id="2")
    msg.metadata.__dict__["_run_id"] = run_id
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


@pytest.fixture
def loop(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """Flower's loop functions, patched for ``tmp_path``; restored afterwards."""
    for name in ("_pull_and_store_message", "_push_messages"):
        monkeypatch.setattr(sci, name, getattr(sci, name))
    supernode.patch_inflight(tmp_path)
    stores = ObjectStoreFactory()
    state = NodeStateFactory(stores).state()
    state.set_node_id(NODE)
    return state, stores.store()


def pull(state: Any, store: Any, receive: Any) -> int | None:
    def unused(*_: Any) -> Any:
        raise AssertionError("not reached in these tests")

    return sci._pull_and_store_message(  # type: ignore[no-any-return]
        state=state, object_store=store, node_config={}, receive=receive,
        get_run=unused, get_fab=unused, pull_object=unused,
        confirm_message_received=unused, trusted_entities=None,
    )  # fmt: skip


def push(state: Any, store: Any) -> list[Message]:
    sent: list[Message] = []

    def send(message: Message, _tree: Any, _runtime: float) -> tuple[set[str], str]:
        sent.append(message)
        return set(), "session"  # the SuperLink has every object already

    sci._push_messages(state=state, object_store=store, send=send, push_object=None)
    return sent


def test_a_record_is_private_and_holds_routing_only(tmp_path: Path) -> None:
    msg = pulled_message()
    task_records.record_pulled(tmp_path, msg)
    (path,) = tmp_path.glob(task_records.PULLED_GLOB)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert "server-round" not in path.read_text()  # no content on disk
    task_records.forget_pulled(tmp_path, msg.metadata.message_id)
    assert not list(tmp_path.glob(task_records.PULLED_GLOB))


def test_a_restarted_site_answers_what_its_previous_process_left(
    loop: Any, tmp_path: Path
) -> None:
    state, store = loop
    asked = pulled_message()
    task_records.record_pulled(tmp_path, asked)
    (tmp_path / "site-worker-0123456789abcdef.task").write_text("{}")  # stale token
    # first pull of the new process: the leftover is answered, nothing is pulled
    got = pull(state, store, receive=lambda: pytest.fail("pulled before answering"))
    assert got == 17
    (reply,) = push(state, store)
    assert reply.metadata.reply_to_message_id == asked.metadata.message_id
    assert reply.metadata.src_node_id == NODE and reply.metadata.run_id == 17
    assert reply.metadata.group_id == "2"
    assert reply.has_error() and "stopped while handling" in reply.error.reason
    assert not list(tmp_path.iterdir())  # both kinds of record are gone
    assert not state.get_messages_legacy()  # Flower's state is clean again
    # later pulls are Flower's own: nothing there, nothing recorded
    assert pull(state, store, receive=lambda: None) is None
    assert push_nothing_pending(state)


def push_nothing_pending(state: Any) -> bool:
    return not state.get_messages_legacy(is_reply=True)


def test_records_of_another_node_are_dropped_not_answered(
    loop: Any, tmp_path: Path
) -> None:
    state, store = loop
    other = pulled_message()
    other.metadata.__dict__["_dst_node_id"] = NODE + 1
    task_records.record_pulled(tmp_path, other)
    assert pull(state, store, receive=lambda: None) is None
    assert not list(tmp_path.iterdir())
    assert push_nothing_pending(state)


def test_a_pulled_message_is_recorded_until_its_reply_is_sent(
    loop: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state, store = loop
    asked = pulled_message()
    seen: list[list[Path]] = []

    def flower_pull(*, state: Any, receive: Any, **_: Any) -> int:
        message, _tree = receive()
        seen.append(list(tmp_path.glob(task_records.PULLED_GLOB)))
        state.store_message(message)
        state.get_messages_legacy(is_reply=False)  # the ClientApp took it
        return int(message.metadata.run_id)

    # the real pull needs a SuperLink; its recording wrapper is what is tested
    monkeypatch.setattr(sci, "_pull_and_store_message", flower_pull)
    supernode.patch_inflight(tmp_path)
    assert pull(state, store, receive=lambda: (asked, None)) == 17
    assert len(seen[0]) == 1  # recorded when received
    answer = Message(RecordDict(), reply_to=asked)
    sci._insert_message(answer, state, store)
    (sent,) = push(state, store)
    assert sent.metadata.reply_to_message_id == asked.metadata.message_id
    assert not list(tmp_path.glob(task_records.PULLED_GLOB))  # forgotten once sent


def test_a_message_the_pull_dropped_is_forgotten(
    loop: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state, store = loop

    def dropping_pull(*, receive: Any, **_: Any) -> None:
        receive()  # e.g. its arrays never arrived, or the run stopped

    monkeypatch.setattr(sci, "_pull_and_store_message", dropping_pull)
    supernode.patch_inflight(tmp_path)
    assert pull(state, store, receive=lambda: (pulled_message(), None)) is None
    assert not list(tmp_path.glob(task_records.PULLED_GLOB))
