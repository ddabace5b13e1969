"""Small helpers around Flower's CLI, logs and environment used by the launcher."""

from __future__ import annotations

import os
import socket
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import cast

_LEGACY_GRPC_ENV = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")


def flower_env(
    *,
    extra: Mapping[str, str],
    flwr_home: Path,
    work_dir: Path,
    ray_address: str,
    ray_tmpdir: Path | None,
    marker: tuple[str, str],
) -> dict[str, str]:
    """Return the environment of every process a local SuperLink run starts.

    With ``ray_address`` the run attaches to that Ray cluster (``RAY_ADDRESS``);
    without, Ray starts a private instance in ``ray_tmpdir`` (``RAY_TMPDIR``), and a
    ``RAY_ADDRESS`` of the caller's shell is dropped so that it cannot redirect the
    run. ``marker`` is the ``(name, value)`` variable that finds our processes.
    """
    env = {k: v for k, v in os.environ.items() if k not in _LEGACY_GRPC_ENV}
    env.update(extra)
    no_proxy = ",".join(filter(None, [env.get("NO_PROXY"), "127.0.0.1,localhost"]))
    bin_dir = str(Path(sys.executable).parent)  # flower-superexec, flwr-simulation
    env.update(
        {
            "PATH": os.pathsep.join([bin_dir, env.get("PATH", "")]),
            "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            # the SuperExec asks for a new run every 1 s by default; a local run
            # starts 0.4 s sooner on average; 5 polls a second cost the SuperLink little
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
            "MPLCONFIGDIR": str(work_dir / "mpl"),
            "HF_HUB_OFFLINE": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
            marker[0]: marker[1],
        }
    )
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    else:
        env["RAY_TMPDIR"] = str(ray_tmpdir)
        env.pop("RAY_ADDRESS", None)
    # OpenMP threads sleep instead of spinning: with another process on a core,
    # the ServerApp's 2-thread evaluation took 10-21 s instead of 2-3.5 s.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def log_errors(path: Path, offset: int) -> str:
    """Return a log file's ERROR lines written after byte ``offset``.

    An undeclared run-config key makes ``flwr run`` print only "Invalid run
    configuration"; the key's name is in the SuperLink log.
    """
    if not path.is_file():
        return ""
    with path.open("rb") as fh:
        fh.seek(offset)
        text = fh.read().decode("utf-8", errors="replace")
    return "\n".join(ln for ln in text.splitlines() if "ERROR" in ln)[-4000:]


def find_free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is currently free on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def file_tail(path: Path, lines: int = 30) -> str:
    """Return the last ``lines`` lines of a text file (empty if missing)."""
    if not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def publishable_files(app_dir: Path) -> dict[str, Path]:
    """Return the files ``flwr run <app_dir>`` puts in its FAB, quickly.

    Flower 1.41 (``flwr.cli.utils.collect_files``) lists every file under the app
    directory before it filters them, ``.venv`` included: with the venv the README
    creates inside the checkout that is ~60,000 files and ~6 s per ``flwr run``.
    Here a directory is skipped when Flower's publish rules or the app's
    ``.gitignore`` exclude everything in it; Flower's own filter then decides, so
    the FAB is the same (a test compares it with Flower's build of the checkout).
    """
    from flwr.cli.utils import (
        build_pathspec,
        filter_paths_for_publish,
        load_gitignore_patterns,
    )
    from flwr.supercore.constant import APP_PUBLISH_EXCLUDE_PATTERNS

    root = app_dir.resolve()
    ignore = root / ".gitignore"
    patterns = load_gitignore_patterns(ignore.read_bytes() if ignore.is_file() else b"")
    with _flower_pathspec_quiet():
        skip = [build_pathspec(patterns), build_pathspec(APP_PUBLISH_EXCLUDE_PATTERNS)]
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        rel = here.relative_to(root).as_posix()
        prefix = "" if rel == "." else f"{rel}/"
        probe = "__fedlora_probe__"  # a file name no pattern names on its own
        dirnames[:] = [
            d
            for d in dirnames
            if not (here / d).is_symlink()
            and not any(spec.match_file(f"{prefix}{d}/{probe}") for spec in skip)
        ]
        for name in filenames:
            path = here / name
            if not path.is_symlink() and path.resolve().is_relative_to(root):
                files[f"{prefix}{name}"] = path
    with _flower_pathspec_quiet():
        return cast(dict[str, Path], filter_paths_for_publish(files))


@contextmanager
def _flower_pathspec_quiet() -> Iterator[None]:
    """Silence one deprecation inside Flower 1.41's ``build_pathspec``.

    Flower asks pathspec for its old pattern name 'gitwildmatch', and pathspec
    warns on every call. The ``flwr`` CLI hits the same warning, which Python
    hides there; run in-process, it repeats. Only this message is silenced.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="GitWildMatchPattern", category=DeprecationWarning
        )
        yield


def stage_app(app_dir: Path, dest: Path) -> Path:
    """Copy the app's publishable files to ``dest`` (emptied first); return it.

    ``flwr run dest`` then builds the same FAB as ``flwr run app_dir``, in
    milliseconds instead of seconds (:func:`publishable_files`).
    """
    import shutil

    if dest.exists():
        shutil.rmtree(dest)
    for rel, src in publishable_files(app_dir).items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    return dest


def import_flower_cli() -> None:
    """Import the Flower modules that staging and following a run use.

    Run in a thread while the SuperLink starts: the launcher only waits then, and
    these imports cost it about a second of CPU just before ``flwr run``.
    """
    import flwr.cli.utils  # noqa: F401
    import flwr.supercore.control  # noqa: F401
