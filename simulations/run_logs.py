"""Follow a run on the local SuperLink from the launcher: its log and its status.

``flwr run --stream`` keeps a second Flower CLI process (about 100 MiB) alive for
the whole run only to print the run's log, and ``flwr ls`` then costs another
process start (about 1.3 s) to read how the run ended. Both are calls to the
SuperLink's Control API; the launcher, which imports ``flwr`` anyway to stage the
app, makes them itself with the same HTTP client and interceptors as Flower's CLI
(an insecure local SuperLink needs no account token).

The SuperLink ends the log stream once the run is finished and its whole log has
been sent (``flwr.superlink.servicer.control.control_handlers._stream_logs``).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from flwr.supercore.control import ControlHttpClient


def control_client(address: str) -> ControlHttpClient:
    """Return a Control API client of the insecure SuperLink at ``host:port``."""
    import logging

    from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors.http.runtime_version import (
        RuntimeVersionHttpInterceptor,
    )

    # httpx logs every request at INFO, and Hydra's logging shows INFO on the
    # console: one line per log chunk of the run
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return ControlHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=[
            CliClientHttpInterceptor(),
            RuntimeVersionHttpInterceptor(component_name="flwr CLI"),
        ],
    )


class RunLog:
    """Where a run's lines go; a context manager that closes ``log_file``.

    Each line goes to ``echo`` (the console), to the last 40 (quoted in errors)
    and, without ANSI colour codes, to ``log_file``.
    """

    ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

    def __init__(self, echo: Callable[[str], object], log_file: Path | None) -> None:
        self._echo = echo
        self.tail: deque[str] = deque(maxlen=40)
        self._sink: TextIO | None = None
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            self._sink = log_file.open("w", encoding="utf-8")

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sink is not None:
            self._sink.close()

    def emit(self, line: str) -> None:
        """Pass one line on to the console, the tail and the file."""
        self._echo(line)
        plain = self.ANSI.sub("", line)
        self.tail.append(plain)
        if self._sink is not None:
            self._sink.write(plain + "\n")
            self._sink.flush()


class LineSplitter:
    """Turn text chunks into whole lines (a chunk may end inside a line)."""

    def __init__(self, on_line: Callable[[str], None]) -> None:
        self._on_line = on_line
        self._partial = ""

    def feed(self, chunk: str) -> None:
        """Pass on every line completed by ``chunk``; keep the rest."""
        *lines, self._partial = (self._partial + chunk).split("\n")
        for line in lines:
            self._on_line(line.rstrip("\r"))

    def close(self) -> None:
        """Pass on a last line that had no newline."""
        if self._partial:
            self._on_line(self._partial.rstrip("\r"))
            self._partial = ""


# ``(status, details)`` of a run left at the app's last line (:func:`stream_logs`)
AT_LAST_LINE = ("finished:completed", "the app logged its last line")


class _LastLine(Exception):
    """Raised by the line callback to leave the log stream at the app's last line."""


def stream_logs(
    client: ControlHttpClient,
    run_id: int,
    on_line: Callable[[str], None],
    until: str | None = None,
) -> bool:
    """Call ``on_line`` for each line of the run's log until the run finished.

    With ``until``, stop after the first line that contains it (the app's own
    last line) and return True; return False when the stream ended first.
    """
    from flwr.proto.control_pb2 import StreamLogsRequest

    seen = [False]

    def each(line: str) -> None:
        on_line(line)
        if until is not None and until in line:
            seen[0] = True
            raise _LastLine

    lines = LineSplitter(each)
    request = StreamLogsRequest(run_id=run_id, after_timestamp=0.0)
    try:
        for res in client.StreamLogs(request):
            lines.feed(res.log_output)
    except _LastLine:
        pass
    finally:
        if not seen[0]:  # the stream ended: a last line without its newline
            with contextlib.suppress(_LastLine):
                lines.close()
    return seen[0]


def final_status(
    client: ControlHttpClient, run_id: int, wait_s: float = 30.0
) -> tuple[str, str]:
    """Return ``(status, details)`` once the run is finished (or after ``wait_s``).

    ``status`` reads as ``flwr ls`` prints it, e.g. ``finished:completed`` or
    ``finished:failed``; only it tells a crashed ServerApp from a completed one.
    """
    from flwr.proto.control_pb2 import ListRunsRequest

    deadline = time.monotonic() + wait_s
    while True:
        runs = client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict
        if run_id not in runs:
            status, details = "unknown", f"run {run_id} not listed by the SuperLink"
        else:
            state = runs[run_id].status
            status, details = f"{state.status}:{state.sub_status}", state.details
        if status.startswith("finished") or time.monotonic() > deadline:
            return status, details
        time.sleep(0.5)
