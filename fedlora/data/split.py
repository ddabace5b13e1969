"""Held-out split and per-client partitions, deterministic in ``(cfg, seed)``.

The full example set of ``cfg.source`` is permuted with ``seed``; the first
``min(round(n * test_fraction), max_test_examples)`` rows of the permutation are the
held-out set for centralised evaluation and the rest, in permuted order, is split
across clients with a flwr-datasets partitioner. With ``data.test_path`` the
held-out set is that file instead (e.g. a benchmark's official dev split; at most
``max_test_examples`` rows, a seeded sample of a longer file) and every row of the
source trains:

- ``iid``: contiguous shards of the shuffled rows, sizes differ by at most one and
  the first ``n % k`` are the larger, exactly as
  :class:`~flwr_datasets.partitioner.IidPartitioner` cuts them
  (:func:`contiguous_shards`; computed here so that a client process does not
  import flwr-datasets and its plotting stack, about 50 MiB, for an index split);
- ``dirichlet`` (classification only; causal_lm falls back to iid):
  :class:`~flwr_datasets.partitioner.DirichletPartitioner` by ``label`` with
  ``alpha = data.dirichlet_alpha``, ``min_partition_size=1`` (no client is empty) and
  self-balancing (a client above the mean size takes no further labels). A larger
  minimum makes the partitioner resample often and fail for 2 labels over 32 clients,
  so the only guarantee asked of it is non-emptiness.

Every function recomputes nothing it has seen: the full set, the split and the
assignment are cached per process on ``(cfg, seed, ...)`` (``DataConfig`` is a frozen
dataclass), and each call returns a fresh ``select`` copy (:class:`Rows`), so callers
cannot change what the cache holds.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from fedlora.data.files import load_file
from fedlora.data.rows import Rows, as_rows
from fedlora.data.sources import DATA_SOURCES, SCHEMAS, column

if TYPE_CHECKING:
    from fedlora.config import DataConfig


class Split(NamedTuple):
    """Row indices into the full example set (ascending held-out, permuted rest)."""

    heldout: tuple[int, ...]
    rest: tuple[int, ...]


@lru_cache(maxsize=8)
def examples(cfg: DataConfig, seed: int) -> Rows:
    """Every example of ``cfg.source`` in the schema of ``cfg.task`` (cached)."""
    source = DATA_SOURCES.get(cfg.source)
    if cfg.task not in source.tasks:
        raise ValueError(
            f"data.source={cfg.source!r} produces {list(source.tasks)} data, not "
            f"data.task={cfg.task!r}"
        )
    ds = as_rows(source.load(cfg, seed))
    _check_schema(ds, cfg.task, f"data.source={cfg.source!r}")
    return ds


@lru_cache(maxsize=8)
def _override_examples(path: str, cfg: DataConfig) -> Rows:
    return load_file(path, cfg)


def _check_schema(ds: Rows, task: str, origin: str) -> None:
    if list(ds.column_names) != list(SCHEMAS[task]):
        raise ValueError(
            f"{origin} returned columns {ds.column_names}; {task} rows must be "
            f"{list(SCHEMAS[task])}"
        )


@lru_cache(maxsize=8)
def split_indices(cfg: DataConfig, seed: int) -> Split:
    """Seeded held-out / rest split of the full set (see the module docstring)."""
    n = examples(cfg, seed).num_rows
    n_test = (
        0 if cfg.test_path else min(round(n * cfg.test_fraction), cfg.max_test_examples)
    )
    if n - n_test < 1:
        raise ValueError(f"{n} examples leave nothing to train on after the split")
    # [seed, 1]: a stream apart from default_rng(seed), which the Dirichlet draws use.
    perm = np.random.default_rng([seed, 1]).permutation(n)
    return Split(
        heldout=tuple(sorted(int(i) for i in perm[:n_test])),
        rest=tuple(int(i) for i in perm[n_test:]),
    )


def contiguous_shards(rows: tuple[int, ...], k: int) -> tuple[tuple[int, ...], ...]:
    """Split ``rows`` into ``k`` contiguous shards, the first ``len % k`` one longer.

    The cut of ``datasets.Dataset.shard(k, i, contiguous=True)``, which
    flwr-datasets' ``IidPartitioner`` uses: shard ``i`` starts at
    ``(n // k) * i + min(i, n % k)``.
    """
    div, mod = divmod(len(rows), k)
    starts = [div * i + min(i, mod) for i in range(k + 1)]
    return tuple(rows[starts[i] : starts[i + 1]] for i in range(k))


@lru_cache(maxsize=8)
def partition_indices(
    cfg: DataConfig, seed: int, num_partitions: int
) -> tuple[tuple[int, ...], ...]:
    """Full-set row indices of every partition, one tuple per partition id."""
    full, rest = examples(cfg, seed), split_indices(cfg, seed).rest
    if not 1 <= num_partitions <= len(rest):
        raise ValueError(
            f"num_partitions={num_partitions} must be in [1, {len(rest)}] (the "
            "training rows left after the held-out split)"
        )
    if cfg.partitioner != "dirichlet" or cfg.task != "classification":
        return contiguous_shards(rest, num_partitions)
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner

    labels = np.asarray(column(full, "label"))  # (n,)
    partitioner = DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=cfg.dirichlet_alpha,
        min_partition_size=1,
        self_balancing=True,
        seed=seed,
    )
    partitioner.dataset = datasets.Dataset.from_dict(
        {"row": list(rest), "label": labels[list(rest)].tolist()}
    )
    try:
        parts = [
            column(partitioner.load_partition(p), "row") for p in range(num_partitions)
        ]
    except ValueError as err:
        raise ValueError(
            f"Dirichlet partitioning (data.dirichlet_alpha={cfg.dirichlet_alpha}) "
            f"could not give each of {num_partitions} clients at least one example: "
            f"{err} Raise data.dirichlet_alpha, use fewer clients or "
            "data.partitioner=iid"
        ) from err
    return tuple(tuple(int(i) for i in part) for part in parts)


def load_heldout(cfg: DataConfig, *, seed: int) -> Rows:
    """Held-out rows for centralised evaluation.

    Parameters
    ----------
    cfg : DataConfig
        Source, task and split sizes.
    seed : int
        Run seed (synthetic generation and the split).

    Returns
    -------
    Rows
        ``min(round(n * test_fraction), max_test_examples)`` rows in the task schema,
        disjoint from every partition; may be empty when ``test_fraction`` is 0.
        With ``test_path``: that file's rows (a seeded sample of
        ``max_test_examples`` when longer, in file order).
    """
    if cfg.test_path:
        ds = _override_examples(cfg.test_path, cfg)
        _check_schema(ds, cfg.task, f"data.test_path {cfg.test_path}")
        if ds.num_rows > cfg.max_test_examples:
            rng = np.random.default_rng([seed, 2])
            keep = rng.choice(ds.num_rows, cfg.max_test_examples, replace=False)
            ds = ds.select(sorted(int(i) for i in keep))
        return ds
    return examples(cfg, seed).select(split_indices(cfg, seed).heldout)


def load_partition(
    cfg: DataConfig,
    *,
    seed: int,
    partition_id: int,
    num_partitions: int,
    path_override: str = "",
) -> Rows:
    """Training rows of one client.

    Parameters
    ----------
    cfg : DataConfig
        Source, task, split sizes and partitioner.
    seed : int
        Run seed; equal seeds give identical partitions in every process.
    partition_id : int
        This client's partition, in ``[0, num_partitions)``.
    num_partitions : int
        Number of clients the training rows are split across.
    path_override : str (default: "")
        A site's own data file (CSV/TSV/JSONL/Parquet, columns as for
        ``source=local``); when set it is used whole and the other arguments only
        select the columns and task.

    Returns
    -------
    Rows
        The partition's rows in the task schema, never empty.
    """
    if path_override:
        ds = _override_examples(path_override, cfg)
        return ds.select(range(ds.num_rows))
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition_id={partition_id} is outside [0, {num_partitions})"
        )
    rows = partition_indices(cfg, seed, num_partitions)[partition_id]
    return examples(cfg, seed).select(rows)


def num_labels(cfg: DataConfig, *, seed: int) -> int:
    """Classification head size: ``cfg.num_classes``, checked against the labels.

    Raises
    ------
    ValueError
        If ``cfg.task`` is not classification or a label is ``>= cfg.num_classes``.
    """
    if cfg.task != "classification":
        raise ValueError(
            f"data.task={cfg.task!r} has no labels; num_labels is for classification"
        )
    top = max(column(examples(cfg, seed), "label"), default=0)
    if top >= cfg.num_classes:
        raise ValueError(
            f"data.source={cfg.source!r} has label {top} but data.num_classes="
            f"{cfg.num_classes}; raise data.num_classes"
        )
    return cfg.num_classes
