"""Tabular data from a local file or the Hugging Face hub, mapped to the row schemas.

Local files are read with pandas by extension (``.csv``, ``.tsv``, ``.jsonl``,
``.json``, ``.parquet``); a CSV/TSV file without a header row is read with
``data.header=false`` and ``data.columns`` naming its columns in file order. Hub
datasets are read with ``datasets.load_dataset``. Both go through the same column
handling (rows are counted from 1 in file order, the header not counted):

- classification: ``data.text_column`` and ``data.label_column``. Integer labels must
  lie in ``[0, num_classes)``; string labels map to ids in sorted order of the distinct
  values (digit strings are read as integers).
- causal_lm: the format is detected from the columns, first match wins:
  ``messages`` (a chat: a list of ``{"role", "content"}`` ending with the assistant's
  response; needs ``data.prompt_format=chat``), ``instruction,output`` (+ optional
  ``input``, Alpaca), ``prompt,completion``, then ``data.text_column`` as plain text
  (empty prompt, the whole text is the completion). Prompts are written in
  ``data.prompt_format`` (see :mod:`fedlora.data.sources`). With ``data.instruction``
  a labelled file (``data.text_column``, ``data.label_column``) becomes questions:
  the prompt is the instruction with the text as its input, the completion the
  label's name in ``data.label_names``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.data.rows import Rows
from fedlora.data.sources import instruction_prompt, plain_prompt, split_conversation

if TYPE_CHECKING:
    import pandas as pd

    from fedlora.config import DataConfig

EXTENSIONS = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
# Formats whose header row is optional (data.header); the others name their columns.
HEADERLESS_EXTENSIONS = (".csv", ".tsv")


def read_table(path: str, names: Sequence[str] = ()) -> pd.DataFrame:
    """Read a CSV/TSV/JSONL/JSON/Parquet file, chosen by extension, as strings as-is.

    Empty CSV/TSV cells stay empty strings (not NaN); TSV is read without quoting, as
    GLUE-style files are written; ``.json`` may hold JSON lines or one array.

    Parameters
    ----------
    path : str
        The file (``~`` is expanded).
    names : Sequence[str] (default: ())
        Column names of a CSV/TSV file without a header row, in file order (its
        first row is then data); empty: the first row is the header.

    Raises
    ------
    ValueError
        Unsupported extension, ``names`` for a format that names its own columns,
        rows with more fields than the header (or ``names``) has columns, or a
        pandas/pyarrow parse error.
    FileNotFoundError
        If there is no such file.
    """
    import pandas as pd

    file = Path(path).expanduser()
    suffix = file.suffix.lower()
    if suffix not in EXTENSIONS:
        raise ValueError(
            f"data file {path}: unsupported extension {suffix!r}; use one of "
            f"{list(EXTENSIONS)}"
        )
    if names and suffix not in HEADERLESS_EXTENSIONS:
        raise ValueError(
            f"data file {path}: data.header=false is for CSV/TSV files; {suffix} "
            "files name their own columns (drop data.header and data.columns)"
        )
    if not file.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if suffix == ".parquet":
        return pd.read_parquet(file)
    if suffix in HEADERLESS_EXTENSIONS:
        tsv = suffix == ".tsv"
        frame = pd.read_csv(
            file,
            sep="\t" if tsv else ",",
            quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL,
            keep_default_na=False,
            header=None if names else "infer",
            names=list(names) if names else None,
        )
        _check_field_counts(frame, path, bool(names))
        return frame
    # dtype=False keeps JSON values as written (no "1" -> 1, no date parsing).
    lines = suffix == ".jsonl" or not _starts_with_bracket(file)
    return pd.read_json(file, lines=lines, dtype=False)


def _check_field_counts(frame: pd.DataFrame, path: str, headerless: bool) -> None:
    """Refuse rows with more fields than columns (pandas makes them the index)."""
    import pandas as pd

    if isinstance(frame.index, pd.RangeIndex):
        return
    named = "data.columns names" if headerless else "the header row has"
    raise ValueError(
        f"data file {path}: rows have {frame.index.nlevels + frame.shape[1]} fields "
        f"but {named} {frame.shape[1]} columns {[str(c) for c in frame.columns]}; "
        "quote fields that contain the separator, or name every column"
    )


def _starts_with_bracket(file: Path) -> bool:
    with file.open(encoding="utf-8") as handle:
        return handle.read(4096).lstrip().startswith("[")


def needed_columns(columns: list[str], cfg: DataConfig, origin: str) -> list[str]:
    """Columns of ``columns`` that ``cfg.task`` reads; raise naming what is missing.

    Parameters
    ----------
    columns : list[str]
        Columns the data has.
    cfg : DataConfig
        Task and column names.
    origin : str
        File path or dataset id, quoted in errors.
    """
    if cfg.task == "classification" or cfg.instruction:
        for key, col in (
            ("text_column", cfg.text_column),
            ("label_column", cfg.label_column),
        ):
            if col not in columns:
                raise ValueError(
                    f"{origin}: column {col!r} (data.{key}) is missing; the columns "
                    f"are {columns}; set data.{key}=<one of them>"
                )
        return [cfg.text_column, cfg.label_column]
    if "messages" in columns:
        if cfg.prompt_format != "chat":
            raise ValueError(
                f"{origin}: a messages column is a chat; it needs "
                f"data.prompt_format=chat (a model with a chat template), not "
                f"{cfg.prompt_format!r}"
            )
        return ["messages"]
    if {"instruction", "output"} <= set(columns):
        return [c for c in ("instruction", "input", "output") if c in columns]
    if {"prompt", "completion"} <= set(columns):
        return ["prompt", "completion"]
    if cfg.text_column in columns:
        return [cfg.text_column]
    raise ValueError(
        f"{origin}: causal_lm data needs columns messages, instruction,output "
        f"(+input), prompt,completion or {cfg.text_column!r} (data.text_column); "
        f"the columns are {columns}; rename them or set data.text_column=<one of them>"
    )


def normalise(frame: pd.DataFrame, cfg: DataConfig, origin: str) -> Rows:
    """Map a table onto the row schema of ``cfg.task`` (see the module docstring).

    Parameters
    ----------
    frame : pandas.DataFrame
        The raw table, one example per row.
    cfg : DataConfig
        Task, column names and number of classes.
    origin : str
        File path or dataset id, quoted in errors.

    Returns
    -------
    Rows
        ``{"text", "label"}`` or ``{"prompt", "completion"}`` rows, in file order.
    """
    return Rows.from_dict(table_rows(frame, cfg, origin))


def table_rows(
    frame: pd.DataFrame, cfg: DataConfig, origin: str
) -> dict[str, list[Any]]:
    """Build the columns of :func:`normalise`'s rows as lists.

    Parameters
    ----------
    frame : pandas.DataFrame
        The raw table, one example per row.
    cfg : DataConfig
        Task, column names and number of classes.
    origin : str
        File path or dataset id, quoted in errors.

    Returns
    -------
    dict[str, list]
        ``{"text": [...], "label": [...]}`` or ``{"prompt": [...], "completion":
        [...]}``, in file order.

    Raises
    ------
    ValueError
        A column is missing or the labels are unusable, naming column, row and fix.
    """
    columns = needed_columns([str(c) for c in frame.columns], cfg, origin)
    if cfg.task == "classification":
        texts = _strings(frame[cfg.text_column])
        raw = frame[cfg.label_column]
        labels = label_ids(
            raw.astype(object).where(raw.notna(), None).tolist(),  # NaN/NA -> None
            cfg.num_classes,
            f"{origin}: column {cfg.label_column!r}",
        )
        return {"text": texts, "label": labels}
    fmt = cfg.prompt_format
    if cfg.instruction:  # a labelled file asked as questions, answered by name
        raw = frame[cfg.label_column]
        values = raw.astype(object).where(raw.notna(), None).tolist()
        names = list(cfg.label_names)
        if all(v in names for v in values):  # labels written as the answers
            ids = [names.index(v) for v in values]
        else:
            where = f"{origin}: column {cfg.label_column!r} (data.label_names)"
            ids = label_ids(values, len(names), where)
        prompts = [
            instruction_prompt(cfg.instruction, text, fmt)
            for text in _strings(frame[cfg.text_column])
        ]
        return {"prompt": prompts, "completion": [cfg.label_names[i] for i in ids]}
    if columns[0] == "messages":
        pairs = [
            split_conversation(v, f"{origin}: row {row}")
            for row, v in enumerate(frame["messages"].tolist(), start=1)
        ]
        prompts, completions = [p for p, _ in pairs], [c for _, c in pairs]
    elif columns[0] == "instruction":
        inputs = _strings(frame["input"]) if "input" in columns else [""] * len(frame)
        prompts = [
            instruction_prompt(i, x, fmt)
            for i, x in zip(_strings(frame["instruction"]), inputs, strict=True)
        ]
        completions = _strings(frame["output"])
    elif columns[0] == "prompt":
        prompts = [plain_prompt(p, fmt) for p in _strings(frame["prompt"])]
        completions = _strings(frame["completion"])
    else:
        completions = _strings(frame[cfg.text_column])
        prompts = [""] * len(completions)
    return {"prompt": prompts, "completion": completions}


def _strings(column: pd.Series) -> list[str]:
    """Column values as str; missing values (None/NaN) become ``""``."""
    return [str(v) for v in column.fillna("").tolist()]


def label_ids(values: list[Any], num_classes: int, where: str) -> list[int]:
    """Turn raw labels into class ids in ``[0, num_classes)``.

    Parameters
    ----------
    values : list
        One raw label per row: ints (bools, integral floats) or strings.
    num_classes : int
        Size of the classification head (``data.num_classes``).
    where : str
        File and column, quoted in errors.

    Returns
    -------
    list[int]
        Class ids; strings map to their index among the sorted distinct strings.

    Raises
    ------
    ValueError
        Naming the first offending row (from 1, in file order) and the fix.
    """
    empty = [i for i, v in enumerate(values) if v is None or v == ""]
    if empty:
        raise ValueError(
            f"{where}: some rows have no label ({_rows(empty)}); fill them in or drop "
            "those rows"
        )
    if all(isinstance(v, str) for v in values):
        if all(v.strip().lstrip("-").isdigit() for v in values):
            values = [int(v) for v in values]
        else:
            names = sorted(set(values))
            if len(names) > num_classes:
                raise ValueError(
                    f"{where}: {len(names)} distinct string labels {names[:10]} but "
                    f"data.num_classes={num_classes}; raise data.num_classes"
                )
            index = {name: i for i, name in enumerate(names)}
            return [index[v] for v in values]
    odd = [i for i, v in enumerate(values) if isinstance(v, str) or float(v) != int(v)]
    if odd:
        raise ValueError(
            f"{where}: labels mix strings and numbers or are not integers ("
            f"{_rows(odd)}, value {values[odd[0]]!r}); use integer class ids in "
            f"[0, {num_classes}) or class names (strings) throughout"
        )
    ids = [int(v) for v in values]
    outside = [i for i, v in enumerate(ids) if not 0 <= v < num_classes]
    if outside:
        bad = sorted({ids[i] for i in outside})
        raise ValueError(
            f"{where}: labels {bad[:10]} are outside [0, {num_classes}) ("
            f"{_rows(outside)}); raise data.num_classes or relabel the data"
        )
    return ids


def _rows(indices: list[int]) -> str:
    """Name rows from 1: ``"data row 3"``, ``"data rows 3, 7, ... (12 rows)"``."""
    shown = ", ".join(str(i + 1) for i in indices[:5])
    if len(indices) == 1:
        return f"data row {shown}"
    more = ", ..." if len(indices) > 5 else ""
    return f"data rows {shown}{more} ({len(indices)} rows)"


def file_columns(cfg: DataConfig) -> tuple[str, ...]:
    """``names`` for :func:`read_table`: ``data.columns`` of a headerless file."""
    return () if cfg.header else cfg.columns


def load_file(path: str, cfg: DataConfig) -> Rows:
    """Normalised rows of a local file (the whole file, in file order)."""
    return normalise(read_table(path, file_columns(cfg)), cfg, f"data file {path}")


def load_local(cfg: DataConfig, seed: int) -> Rows:
    """Source ``local``: the file at ``cfg.path`` (``seed`` is unused)."""
    return load_file(cfg.path, cfg)


def load_hub(cfg: DataConfig, seed: int) -> Rows:
    """Source ``hf``: ``load_dataset(cfg.path, cfg.subset, split=cfg.split)``."""
    import datasets

    raw = datasets.load_dataset(cfg.path, cfg.subset or None, split=cfg.split)
    origin = f"dataset {cfg.path!r} (split {cfg.split!r})"
    if not isinstance(raw, datasets.Dataset):
        raise ValueError(f"{origin}: expected one split, got {type(raw).__name__}")
    keep = needed_columns(list(raw.column_names), cfg, origin)
    return normalise(raw.select_columns(keep).to_pandas(), cfg, origin)  # copied
