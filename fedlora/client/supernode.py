"""``flower-supernode`` with the site worker as its executor: one command per site.

    python -m fedlora.client.supernode [--fleet-poll 1.0] <flower-supernode args>

takes every ``flower-supernode`` argument (the node-config must name a
``state-dir``) and runs Flower's SuperNode in this process with three changes:

- ``--isolation process``: the SuperNode starts no ``flower-superexec``, so no
  process is started per message;
- a **supervised site worker** (``python -m fedlora.client.worker serve
  --runtime-api-address ...``) runs every ClientApp task in-process with the base
  model, data and DP ledger kept warm (``fedlora.client.task_loop``). If it dies
  the message it was handling is answered with an error at once (the server drops
  the site for that round) and a new worker serves the next one. It exits with
  the SuperNode;
- shorter waits (:func:`patch_fleet_poll`): an idle SuperNode asks the SuperLink
  for messages every ``--fleet-poll`` seconds instead of Flower 1.41's fixed 3 s
  (``time.sleep(3)`` in ``flwr.supernode.start_client_internal``, where a message
  waited 1.5 s on average), and sooner right after it handled one (0.05 s, then
  doubling: :class:`QuickIdle`); it looks at its own state for a reply every 0.1 s,
  not 0.5 s; and it retries a message's arrays after 0.05 s, not 1 s. Each poll
  is a request the SuperLink authenticates and serves from its database, so the
  SuperLink's load grows with sites / poll: on one 2-core machine with 3 sites a
  0.25 s poll slowed the server's own evaluation by 0.7 s a round against 1 s;
- every message pulled is recorded in the state-dir until its reply is sent
  (:func:`patch_inflight`): a site killed after a pull and restarted answers it
  with an error, so the server does not wait out its round timeout.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

log = logging.getLogger("fedlora.supernode")

DEFAULT_FLEET_POLL = 1.0  # the trade-off: README, "Deployed round time"
FIRST_OBJECT_RETRY = 0.05  # seconds; Flower's is 1 s, then 2 s, 4 s
_RESTART_BACKOFF = (1.0, 30.0)  # first and longest wait before a restart


class QuickIdle(types.SimpleNamespace):
    """A ``time`` module for the SuperNode loop: its two kinds of wait, shortened.

    Flower sleeps 3 s when the SuperLink had no message (a network poll) and 0.5 s
    between looks at its own in-memory state for a reply or an object (local and
    cheap: now ``LOCAL_WAIT`` seconds).

    The network poll backs off: right after the SuperNode handled a message (any
    local wait marks one) it asks again after ``BURST`` seconds, then doubles the
    wait up to ``poll``. A round's next message (evaluate after train, the next
    round after evaluate) follows the last reply within about a second, so it is
    seen within a fraction of its delay instead of half a ``poll`` on average,
    while an idle site still asks only every ``poll`` seconds (each ask is a
    request the SuperLink authenticates and serves from its database).
    """

    LOCAL_WAIT = 0.1
    IDLE = 3.0  # Flower 1.41's idle sleep; a test checks the source still has it
    BURST = 0.05  # first network poll after a message was handled
    poll: float  # the longest network poll (seconds)
    next_poll: float  # the next idle wait (seconds)

    def __init__(self, poll: float) -> None:
        super().__init__(poll=poll, next_poll=poll)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        """Sleep the backed-off poll for the idle wait, ``LOCAL_WAIT`` for others."""
        if seconds >= self.IDLE:
            wait = self.next_poll
            self.next_poll = min(self.poll, 2.0 * wait)
            time.sleep(wait)
        else:
            self.next_poll = min(self.BURST, self.poll)
            time.sleep(min(seconds, self.LOCAL_WAIT))


def patch_fleet_poll(poll: float) -> None:
    """Shorten the SuperNode's waits (Flower 1.41, module docstring).

    ``time`` in ``flwr.supernode.start_client_internal`` becomes a
    :class:`QuickIdle`, and its ``pull_objects`` starts retrying a message's
    arrays after ``FIRST_OBJECT_RETRY`` seconds: the SuperNode sees a message
    before the server has pushed its arrays, and every message paid ~1.7 s.
    Idempotent.
    """
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supernode import start_client_internal as sci

    pull = getattr(sci, "pull_objects", None)
    original = getattr(pull, "func", pull)
    if not isinstance(getattr(sci, "time", None), types.ModuleType | QuickIdle) or (
        original is not inflatable_utils.pull_objects
    ):
        raise RuntimeError(
            "flwr.supernode.start_client_internal no longer uses the time module "
            "and pull_objects; this Flower version is not supported by "
            "fedlora.client.supernode"
        )
    setattr(sci, "time", QuickIdle(poll))  # noqa: B010 - not exported
    quick = functools.partial(
        original, initial_backoff=FIRST_OBJECT_RETRY, backoff_cap=1.0
    )
    setattr(sci, "pull_objects", quick)  # noqa: B010


def patch_inflight(state_dir: Path) -> None:
    """Record each message pulled until answered; answer a dead process's leftovers.

    Wraps ``_pull_and_store_message`` and ``_push_messages`` of
    ``flwr.supernode.start_client_internal`` (its loop calls both with keywords):
    a message is recorded when ``receive`` returns it and forgotten once its
    reply was handed to ``send`` (or the pull dropped it). The first pull of this
    process first inserts error replies to the records a previous process left
    (``task_records.leftover_replies``) the way Flower inserts its own FAB errors,
    and the loop's push stage sends them. Idempotent.
    """
    from flwr.supernode import start_client_internal as sci

    from fedlora.client import task_records

    pull = sci._pull_and_store_message  # noqa: SLF001 - see the docstring
    push = sci._push_messages  # noqa: SLF001
    insert = sci._insert_message  # noqa: SLF001
    if getattr(pull, "fedlora_inflight", False):
        return
    first = [True]

    def pulling(*, state: Any, object_store: Any, receive: Any, **kw: Any) -> Any:
        if first:
            first.clear()
            replies = task_records.leftover_replies(state_dir, state.get_node_id())
            for asked, reply in replies:
                # as if pulled and handled here (Flower's bookkeeping for a reply;
                # the state is empty at the first pull, so only these are marked)
                state.store_message(asked)
                state.get_messages_legacy(is_reply=False)
                state.record_message_processing_start(asked.metadata.message_id)
                state.record_message_processing_end(asked.metadata.message_id)
                insert(reply, state, object_store)
            if replies:
                log.warning(
                    "answering %d message(s) the previous process of this site "
                    "left unanswered with an error",
                    len(replies),
                )
                return replies[0][1].metadata.run_id
        pulled: list[str] = []

        def recording() -> Any:
            got = receive()
            if got is not None:
                task_records.record_pulled(state_dir, got[0])
                pulled.append(got[0].metadata.message_id)
            return got

        run_id = pull(state=state, object_store=object_store, receive=recording, **kw)
        if run_id is None:  # dropped (run over, objects lost): nothing to answer
            for message_id in pulled:
                task_records.forget_pulled(state_dir, message_id)
        return run_id

    def pushing(*, send: Any, **kw: Any) -> Any:
        sent: list[str] = []

        def sending(message: Any, *args: Any) -> Any:
            sent.append(message.metadata.reply_to_message_id)
            return send(message, *args)

        try:
            return push(send=sending, **kw)
        finally:
            for message_id in sent:
                task_records.forget_pulled(state_dir, message_id)

    pulling.fedlora_inflight = True  # type: ignore[attr-defined]
    setattr(sci, "_pull_and_store_message", pulling)  # noqa: B010
    setattr(sci, "_push_messages", pushing)  # noqa: B010


def _flower_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--node-config", default="")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9094)
    parser.add_argument("--isolation", default="process")
    parser.add_argument("--ssl-ca-certfile", default="")
    return parser


def worker_command(
    state_dir: str, address: str, ca_file: str, parent_pid: int
) -> list[str]:
    """Return the supervised worker's command (tasks in-process, exits with parent)."""
    cmd = [
        sys.executable, "-m", "fedlora.client.worker", "serve",
        "--state-dir", state_dir,
        "--runtime-api-address", address,
        "--parent-pid", str(parent_pid),
    ]  # fmt: skip
    if ca_file:
        cmd += ["--runtime-root-certificates", ca_file]
    return cmd


def supervise(cmd: list[str], state_dir: Path, address: str, ca_file: str) -> None:
    """Run the worker; when it exits, fail its orphaned task and start another."""
    from fedlora.client import task_records
    from fedlora.client.worker_link import LOG_NAME

    wait = _RESTART_BACKOFF[0]
    certs = Path(ca_file).read_bytes() if ca_file else None
    while True:
        started = time.monotonic()
        with (state_dir / LOG_NAME).open("ab") as out:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        code = proc.wait()
        reason = (
            f"the site worker (pid {proc.pid}) exited with {code} while handling "
            "this message; a new worker serves the next one"
        )
        if task_records.fail_orphaned_task(state_dir, address, reason, certs):
            log.warning("worker died mid-message (exit %s): error replied", code)
        else:
            log.warning("site worker exited with %s: restarting it", code)
        # a worker that dies at once (bad install, port taken) is retried slower
        quick = time.monotonic() - started < 30.0
        wait = min(wait * 2, _RESTART_BACKOFF[1]) if quick else _RESTART_BACKOFF[0]
        time.sleep(wait)


def main(argv: list[str] | None = None) -> None:
    """Parse our options, start the supervised worker, run Flower's SuperNode."""
    from flwr.common.config import parse_config_args

    from fedlora.client.site import SiteConfig
    from fedlora.client.task_loop import quiet_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    ours = argparse.ArgumentParser(
        prog="python -m fedlora.client.supernode",
        description=__doc__.split("\n")[0],
        epilog="Every other argument goes to flower-supernode.",
    )
    ours.add_argument(
        "--fleet-poll",
        type=float,
        default=DEFAULT_FLEET_POLL,
        help="seconds between asks to the SuperLink for a message when idle "
        f"(default {DEFAULT_FLEET_POLL}; Flower's own is 3)",
    )
    args, flower_args = ours.parse_known_args(argv)
    if not 0.01 <= args.fleet_poll <= 3.0:
        ours.error(f"--fleet-poll must be in [0.01, 3] seconds, got {args.fleet_poll}")
    options, _ = _flower_options().parse_known_args(flower_args)
    if options.isolation != "process":
        ours.error(
            f"--isolation {options.isolation}: this command runs the ClientApp in "
            "its site worker (isolation process); use flower-supernode for others"
        )
    given = [options.node_config] if options.node_config else None
    node_config = parse_config_args(given)
    site = SiteConfig.from_node_config(node_config or {})
    if not site.state_dir:
        ours.error(
            "the node-config needs state-dir=<directory>: the site worker keeps its "
            "socket, log and ledger there"
        )
    state_dir = Path(site.state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    host = "127.0.0.1" if options.host in ("0.0.0.0", "::", "") else options.host
    address = f"{host}:{options.port}"
    quiet_logging()
    cmd = worker_command(str(state_dir), address, options.ssl_ca_certfile, os.getpid())
    threading.Thread(
        target=supervise,
        args=(cmd, state_dir, address, options.ssl_ca_certfile),
        name="site-worker-supervisor",
        daemon=True,
    ).start()
    patch_fleet_poll(args.fleet_poll)
    patch_inflight(state_dir)
    if "--isolation" not in flower_args:
        flower_args += ["--isolation", "process"]
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":
    main()
