"""Shared fixtures: offline environment, isolated caches, tiny model configs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests never touch a hub; set before transformers/datasets are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session", autouse=True)
def _fedlora_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Generated base models (tiny_llama) go to a per-session temp dir."""
    path = tmp_path_factory.mktemp("fedlora-cache")
    old = os.environ.get("FEDLORA_CACHE")
    os.environ["FEDLORA_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("FEDLORA_CACHE", None)
    else:
        os.environ["FEDLORA_CACHE"] = old


@pytest.fixture
def flower_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let tests build Flower Messages outside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
