"""Find and stop the processes a launcher started (Flower daemons, Ray workers).

Ray re-parents its actors to PID 1 and rewrites their command lines
(``ray::ClientAppActor``), so neither the process tree nor a command-line search
finds them all; an environment variable set on every process we start does.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable

import psutil


def is_alive(proc: psutil.Process) -> bool:
    """Whether ``proc`` still runs (zombies count as dead)."""
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def signal_all(
    procs: list[psutil.Process], sig: int, wait_s: float
) -> list[psutil.Process]:
    """Send ``sig`` to every process, wait up to ``wait_s``; return survivors."""
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.Error:
            pass
    deadline = time.monotonic() + wait_s
    alive = [p for p in procs if is_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if is_alive(p)]
    return alive


def terminate(
    procs: list[psutil.Process], grace_s: float = 3.0
) -> list[psutil.Process]:
    """SIGTERM, then SIGKILL whatever survived ``grace_s``; returns the survivors."""
    return signal_all(signal_all(procs, signal.SIGTERM, grace_s), signal.SIGKILL, 5.0)


def marked_processes(
    env_key: str,
    value: str,
    *,
    cmdline_part: str | None = None,
    descendants: bool = False,
) -> list[psutil.Process]:
    """Return live processes marked by ``env_key=value`` in their environment.

    A process whose command line contains ``cmdline_part`` also counts, and with
    ``descendants`` so does every child of a found one (Ray starts its agents
    with an environment of their own); this process is never included.
    """
    found = []
    for proc in psutil.process_iter(["cmdline", "environ"], ad_value=None):
        if proc.pid == os.getpid():
            continue
        env = proc.info["environ"] or {}
        cmdline = " ".join(proc.info["cmdline"] or [])
        if env.get(env_key) == value or (cmdline_part and cmdline_part in cmdline):
            if is_alive(proc):
                found.append(proc)
    if descendants:
        pids = {p.pid for p in found}
        for proc in list(found):
            try:
                children = proc.children(recursive=True)
            except psutil.Error:
                continue
            for child in children:
                if child.pid not in pids and child.pid != os.getpid():
                    pids.add(child.pid)
                    found.append(child)
    return found


def process_trees(pids: Iterable[int]) -> dict[int, psutil.Process]:
    """Return each live process in ``pids`` and its descendants, by pid."""
    found: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            found.update({p.pid: p for p in [root, *root.children(recursive=True)]})
        except psutil.Error:
            pass
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every descendant (a crash: nothing gets to clean up)."""
    try:
        root = psutil.Process(pid)
        victims = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    signal_all(victims, signal.SIGKILL, 5.0)
