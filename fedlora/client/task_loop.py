"""The site worker as its SuperNode's executor: ClientApp tasks run in-process.

Flower's SuperNode hands every message to an executor (``flower-superexec``), which
starts a fresh ``flwr-clientapp`` process per message: import Flower and torch,
pull the message, run the ClientApp, push the reply, exit. Started with
``--isolation process``, a SuperNode leaves execution to an outside process that
asks its Runtime API for tasks. The site worker is that process here: it acquires
each ClientApp task, pulls its Message, Context and FAB through the same Runtime
API calls ``flwr-clientapp`` makes, runs the handler in the worker (model, data and
ledger kept warm), and pushes the reply and the new context. Nothing starts per
message.

Rules:

- **The site runs the fedlora it installed.** A task whose FAB ships other fedlora
  sources than the worker's is refused with an error naming both hashes (a site
  does not execute code a server sends without its operator's consent).
- **A crash fails its message at once.** Before a task runs its token and the
  message's routing (no content) go to ``site-worker-<hash>.task`` (0600) in the
  state directory; whoever restarts a crashed worker (``fedlora.client.supernode``)
  replies with an error for that message (``fedlora.client.task_records``), so the
  server drops the site for the round without waiting for the token to expire.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
import traceback
import zipfile
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.supercore.runtime import RuntimeHttpClient

    from fedlora.client.worker import Worker

from fedlora.client.task_records import record_task, runtime_client, task_file

log = logging.getLogger("fedlora.worker")

CLIENT_APP_TASK = "flwr-clientapp"  # flwr.supercore.constant.TaskType.CLIENT_APP


class FabRefused(RuntimeError):
    """The run's FAB ships other fedlora code than this site runs."""


def fab_code_hash(content: bytes) -> str | None:
    """Hash of the ``fedlora/**.py`` sources inside a FAB (zip) as ``code_hash``.

    ``None`` when the FAB ships no fedlora package (another app).
    """
    with zipfile.ZipFile(io.BytesIO(content)) as fab:
        sources = {
            name[len("fedlora/") :]: fab.read(name)
            for name in fab.namelist()
            if name.startswith("fedlora/") and name.endswith(".py")
        }
    if not sources:
        return None
    from fedlora.client.worker_link import sources_hash

    return sources_hash(sources)


def check_fab(content: bytes) -> None:
    """Refuse a FAB whose fedlora sources differ from the worker's own."""
    from fedlora.client.worker_link import code_hash

    shipped, ours = fab_code_hash(content), code_hash()
    if shipped != ours:
        raise FabRefused(
            f"this site's worker runs fedlora sources {ours[:12]}, the run's app "
            f"ships {shipped[:12] if shipped else 'no fedlora package'}; the site "
            "runs only the code it installed: install the run's fedlora version "
            "at the site and restart its SuperNode"
        )


def _heartbeat_fn(client: RuntimeHttpClient) -> Any:
    """Task heartbeat that never signals the process (Flower's raises SIGINT)."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    def beat() -> bool:
        try:
            client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.HTTPError:
            return False
        return True

    return beat


def quiet_logging() -> None:
    """Fedlora's own INFO lines; others' warnings; Flower's logger prints itself.

    The root handler at INFO would repeat every httpx request (one per task poll)
    and every line of Flower's logger, which has its own console handler.
    """
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    logging.getLogger("fedlora").setLevel(logging.INFO)
    logging.getLogger("flwr").propagate = False


def message_kind(message_type: str) -> str:
    """``train``/``evaluate``/``query`` of a Flower message type (``train.x`` too)."""
    return message_type.split(".", 1)[0]


def pull_task_input(client: RuntimeHttpClient, backoff: float = 0.05) -> Any:
    """Message, Context, Run and FAB of the task, as ``flwr-clientapp`` pulls them.

    The same Runtime API calls as Flower's ``run_clientapp.pull_task_input``, with
    a short first retry (``backoff`` s instead of 1 s, doubling up to 1 s) for the
    message's objects: this process asks for them the moment the task exists,
    often while the SuperNode is still fetching them from the SuperLink, and
    Flower's 1 s, 2 s backoff then cost ~3 s per message.
    """
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import (
        pull_and_inflate_object_from_tree,
    )
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode sent a task without its message")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        initial_backoff=backoff,
        backoff_cap=1.0,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # not in its bytes
    return message, context, run_from_proto(res.run), fab_from_proto(res.fab)


class TaskLoop:
    """Acquire ClientApp tasks from a SuperNode and run them in the worker."""

    def __init__(
        self,
        worker: Worker,
        address: str,
        poll: float = 0.2,
        root_certificates: bytes | None = None,
        parent_pid: int | None = None,
    ) -> None:
        self.worker = worker
        self.address = address
        self.poll = poll
        self.root_certificates = root_certificates
        self.parent_pid = parent_pid
        self.accepted_fabs: set[str] = set()  # FAB hashes whose code matched

    def acquire(self, client: RuntimeHttpClient) -> str | None:
        """Claim the next ClientApp task; its token, or ``None`` if none waits."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest

        res = client.AcquireTask(
            AcquireTaskRequest(supported_task_types=[CLIENT_APP_TASK])
        )
        if res.HasField("task") and res.token:
            return str(res.token)
        return None

    def run(self) -> None:
        """Serve tasks until the worker stops or the parent SuperNode is gone."""
        import httpx

        client = runtime_client(self.address, None, self.root_certificates)
        unreachable = False
        try:
            while not self.worker.stopping.is_set():
                if self.parent_pid is not None and os.getppid() != self.parent_pid:
                    log.info("SuperNode (pid %d) is gone: exiting", self.parent_pid)
                    self.worker.stopping.set()
                    break
                try:
                    token = self.acquire(client)
                except httpx.HTTPError as err:
                    if not unreachable:
                        log.warning("no SuperNode at %s: %s", self.address, err)
                    unreachable = True
                    time.sleep(1.0)
                    continue
                unreachable = False
                if token is None:
                    time.sleep(self.poll)
                    continue
                # a thread per task: a task whose arrays never arrive (its run was
                # stopped) must not hold up the next run's; handlers still run one
                # at a time (the worker's busy lock)
                threading.Thread(
                    target=self.execute, args=(token,), name="task", daemon=True
                ).start()
        finally:
            client.close()

    def execute(self, token: str) -> None:
        """Pull one task's input, run its handler, push reply and context."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        from fedlora.client.app import (
            pack_reply,
            unpack_request,
            with_timings,
            with_worker_metrics,
        )

        client = runtime_client(self.address, token, self.root_certificates)
        beat = HeartbeatSender(_heartbeat_fn(client))
        beat.start()
        msg = ctx = reply = None
        status, details = SubStatus.FAILED, "the site worker failed"
        times = {"start": time.perf_counter()}
        kind = "?"
        try:
            msg, ctx, _run, fab = pull_task_input(client)
            record_task(self.worker.state_dir, token, msg, ctx)
            if fab.hash_str not in self.accepted_fabs:  # once per run's app
                check_fab(fab.content)
                self.accepted_fabs.add(fab.hash_str)
            kind = message_kind(msg.metadata.message_type)
            times["pulled"] = start = time.perf_counter()
            packed = unpack_request(msg)
            with self.worker.busy:
                reply, head = self.worker.run(kind, msg, ctx)
                self.worker.last_active = time.monotonic()
            with_worker_metrics(reply.content, head)
            reply = with_timings(kind, reply, 0.0, time.perf_counter() - start)
            reply = pack_reply(reply, packed)
            times["ran"] = time.perf_counter()
            status, details = SubStatus.COMPLETED, ""
        except Exception as err:  # noqa: BLE001 - the server gets it as an error reply
            log.error("task failed:\n%s", traceback.format_exc())
            details = f"{type(err).__name__}: {err}"
            if msg is not None:
                code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
                reply = Message(Error(code=code, reason=details), reply_to=msg)
        finally:
            try:
                if reply is not None and ctx is not None:
                    push_message(client, reply, ctx)
            except Exception:  # noqa: BLE001 - logged; the token then expires
                log.error("could not push the reply:\n%s", traceback.format_exc())
                status = SubStatus.FAILED
            push_task_output(client, ctx, status, details)
            task_file(self.worker.state_dir, token).unlink(missing_ok=True)
            beat.stop()
            client.close()
            log.info("%s task %s: %s", kind, status, _durations(times))


def _durations(times: dict[str, float]) -> str:
    """``pull 0.12 s, run 3.40 s, push 0.08 s`` from the marks a task reached."""
    end = time.perf_counter()
    pulled = times.get("pulled", end)
    ran = times.get("ran", pulled)
    return (
        f"pull {pulled - times['start']:.2f} s, run {ran - pulled:.2f} s, "
        f"push {end - ran:.2f} s"
    )


def start(loop: TaskLoop) -> threading.Thread:
    """Run ``loop`` in a daemon thread; if it ever fails, the worker exits.

    A worker whose task loop died would answer its socket but run no task; exiting
    lets the supervisor (``fedlora.client.supernode``) start a healthy one.
    """

    def guarded() -> None:
        try:
            loop.run()
        except Exception:  # noqa: BLE001 - logged, then the process is replaced
            log.error("task loop failed; exiting:\n%s", traceback.format_exc())
            loop.worker.stopping.set()

    thread = threading.Thread(target=guarded, name="task-loop", daemon=True)
    thread.start()
    return thread
