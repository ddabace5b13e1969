"""Check a run's local data files before anything starts (the launcher's preflight).

The launcher calls :func:`check_data_files` before it starts Flower, so that a bad
file fails in seconds with one message naming the config key, the file, the row or
column and the fix, instead of a traceback from inside the simulation. Every file
is read exactly as the clients read it (:func:`~fedlora.data.files.read_table` and
:func:`~fedlora.data.files.table_rows`, the code behind ``load_file``); on top of
the loader's own errors this module says where a text file stops being UTF-8 (or
is binary) and when a file whose named columns are missing looks like it has no
header row.

Checked files: ``data.path`` when ``data.source=local``, and ``data.test_path``
(always a local file) when it is set. Hub and synthetic sources need no file.
"""

from __future__ import annotations

import codecs
import csv
import re
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from fedlora.config.flat import ConfigError
from fedlora.data.files import (
    EXTENSIONS,
    HEADERLESS_EXTENSIONS,
    file_columns,
    needed_columns,
    read_table,
    table_rows,
)

if TYPE_CHECKING:
    import pandas as pd

    from fedlora.config import DataConfig

# What each format must look like, quoted when a file cannot be parsed.
FORMATS = {
    ".csv": "CSV (comma-separated; a field with a comma, quote or newline in double "
    "quotes)",
    ".tsv": "TSV (tab-separated, one row per line, fields not quoted)",
    ".jsonl": 'JSON lines (one object per line, e.g. {"text": "...", "label": 0})',
    ".json": "JSON (JSON lines, or one array of objects)",
    ".parquet": "Parquet",
}
TEXT_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".json")
_BLOCK = 1 << 20  # bytes read at a time by the UTF-8 scan
# Leading bytes of what is often passed by mistake for a text file.
MAGIC = {
    b"\x1f\x8b": "a gzip archive; decompress it (gunzip)",
    b"PK\x03\x04": "a zip archive (or an Excel .xlsx); extract or export the table",
    b"PAR1": "a Parquet file; give it a .parquet extension",
    b"\xff\xfe": "UTF-16 text (Excel's 'Unicode text'); re-save it as UTF-8",
    b"\xfe\xff": "UTF-16 text; re-save it as UTF-8",
}
_NUMBER = re.compile(r"[-+]?\d+(\.\d+)?")


class BadByte(NamedTuple):
    """The first byte of a text file that is not UTF-8 text."""

    offset: int  # from 0
    line: int  # from 1
    value: int
    kind: str  # "utf-8" (invalid sequence) or "nul" (a binary file)


def check_data_files(cfg: DataConfig) -> None:
    """Read every local file of ``cfg`` as the clients will; raise on the first problem.

    Parameters
    ----------
    cfg : DataConfig
        Source, paths, columns, header and number of classes.

    Raises
    ------
    ConfigError
        Naming the key and file, the row or column, and the fix.
    """
    for key, path in data_files(cfg):
        check_data_file(key, path, cfg)


def data_files(cfg: DataConfig) -> list[tuple[str, str]]:
    """``(config key, path)`` of the local files a run with ``cfg`` reads."""
    files = [("data.path", cfg.path)] if cfg.source == "local" else []
    if cfg.test_path:
        files.append(("data.test_path", cfg.test_path))
    return files


def check_data_file(key: str, path: str, cfg: DataConfig) -> int:
    """Check one file (see :func:`check_data_files`); return its number of rows.

    Parameters
    ----------
    key : str
        The config key that names the file (``data.path``, ``data.test_path``).
    path : str
        The file, as the clients get it.
    cfg : DataConfig
        Columns, header and number of classes.
    """
    where = f"{key}={path}"
    file = Path(path).expanduser()
    suffix = file.suffix.lower()
    _check_exists(where, file)
    if suffix in TEXT_EXTENSIONS:
        _check_text(where, file)
    frame = _read(where, path, cfg)
    _check_header(where, frame, cfg, suffix)
    if frame.shape[0] == 0:
        raise ConfigError(
            f"{where}: no data rows, only the header {_names(frame)}; give a file "
            "with at least one example per client"
        )
    try:
        rows = table_rows(frame, cfg, where)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return len(next(iter(rows.values())))


def _check_exists(where: str, file: Path) -> None:
    """Require a non-empty regular file with a supported extension."""
    if not file.exists():
        hint = "" if file.is_absolute() else f" (relative to {Path.cwd()})"
        raise ConfigError(
            f"{where}: no such file{hint}; give the path of an existing "
            "CSV/TSV/JSONL/Parquet file"
        )
    if not file.is_file():
        raise ConfigError(f"{where}: not a regular file; give the data file itself")
    if file.suffix.lower() not in EXTENSIONS:
        raise ConfigError(
            f"{where}: unsupported extension {file.suffix.lower()!r}; the format is "
            f"chosen by extension, one of {list(EXTENSIONS)}"
        )
    if file.stat().st_size == 0:
        raise ConfigError(f"{where}: the file is empty (0 bytes)")


def first_bad_byte(file: Path) -> BadByte | None:
    """Find the first byte of ``file`` that is not UTF-8 text or is NUL, if any.

    Reads the file in blocks (constant memory); a multi-byte character split across
    two blocks is decoded whole.
    """
    base, lines, pending = 0, 0, b""
    with file.open("rb") as handle:
        while True:
            chunk = handle.read(_BLOCK)
            data, final = pending + chunk, not chunk
            stop, kind = data.find(b"\x00"), "nul"
            try:
                _, used = codecs.utf_8_decode(data, "strict", final)
            except UnicodeDecodeError as err:
                if stop == -1 or err.start < stop:
                    stop, kind = err.start, "utf-8"
                used = err.start
            if stop != -1:
                line = lines + data.count(b"\n", 0, stop) + 1
                return BadByte(base + stop, line, data[stop], kind)
            lines += data.count(b"\n", 0, used)
            base, pending = base + used, data[used:]
            if final:
                return None


def _check_text(where: str, file: Path) -> None:
    """UTF-8 text without NUL bytes (what pandas is asked to read)."""
    bad = first_bad_byte(file)
    if bad is None:
        return
    with file.open("rb") as handle:
        head = handle.read(4)
    for magic, what in MAGIC.items():
        if head.startswith(magic):
            raise ConfigError(
                f"{where}: not {FORMATS[file.suffix.lower()]}: it starts with the "
                f"bytes {magic!r} of {what}"
            )
    at = f"byte 0x{bad.value:02x} at offset {bad.offset} (line {bad.line})"
    if bad.kind == "nul":
        raise ConfigError(
            f"{where}: not a text file: {at} is a NUL byte, so this is binary data "
            f"(compressed?), not {FORMATS[file.suffix.lower()]}; give the "
            "uncompressed text file"
        )
    raise ConfigError(
        f"{where}: not valid UTF-8: {at}; re-save the file as UTF-8, e.g. "
        f"iconv -f cp1252 -t utf-8 {file.name} > utf8-{file.name} if it is "
        "Windows/Latin-1 text"
    )


def _read(where: str, path: str, cfg: DataConfig) -> pd.DataFrame:
    """Read the table the clients get; parse errors become ConfigError."""
    suffix = Path(path).suffix.lower()
    try:
        return read_table(path, file_columns(cfg))
    except (ValueError, OSError, csv.Error) as err:
        reason = str(err).strip().removeprefix(f"data file {path}: ")
        header = (
            ""
            if cfg.header
            else f" without a header row, data.columns={list(cfg.columns)}"
        )
        raise ConfigError(
            f"{where}: cannot be read as {FORMATS[suffix]}{header}: {reason}; fix "
            f"the file there or export it again as {FORMATS[suffix].split(' (')[0]}"
        ) from err


def _check_header(
    where: str, frame: pd.DataFrame, cfg: DataConfig, suffix: str
) -> None:
    """Require the named columns; say when a missing header row is the likely cause."""
    names = _names(frame)
    if not cfg.header:
        first = [str(v).strip() for v in frame.iloc[0]] if len(frame) else []
        repeated = [v for v in first if v in cfg.columns]
        if repeated:
            raise ConfigError(
                f"{where}: data.header=false but the first row {first} holds the "
                f"column names {repeated}: the file has a header row; drop "
                "data.header=false and data.columns"
            )
        return
    try:
        needed_columns(names, cfg, where)
    except ValueError as err:
        kinds = [_data_kind(name) for name in names]
        if suffix not in HEADERLESS_EXTENSIONS or not any(kinds):
            raise ConfigError(str(err)) from err
        described = ", ".join(kind or "a name" for kind in kinds)
        wanted = {"data.text_column": cfg.text_column}
        if cfg.task == "classification":
            wanted["data.label_column"] = cfg.label_column
        missing = ", ".join(
            f"{name!r} ({key})" for key, name in wanted.items() if name not in names
        )
        keys = " and ".join(wanted)
        raise ConfigError(
            f"{where}: no column {missing}, and the file seems to have no header "
            f"row: its first row {names} looks like data ({described}), not "
            f"column names; set data.header=false "
            f"data.columns=[{','.join(_suggest(kinds, cfg))}] (one name per column, "
            f"in file order), or, if that row is the header, set {keys} to its "
            "columns"
        ) from err


def _names(frame: pd.DataFrame) -> list[str]:
    return [str(c) for c in frame.columns]


def _data_kind(value: str) -> str | None:
    """Say what a header cell holds when it looks like data: a number or a sentence."""
    text = value.strip()
    if _NUMBER.fullmatch(text):
        return "a number"
    if len(text.split()) >= 3:
        return "a sentence"
    return None


def _suggest(kinds: list[str | None], cfg: DataConfig) -> list[str]:
    """Column names for a headerless file from what its first row holds."""
    names = [f"col{i + 1}" for i in range(len(kinds))]
    wanted = [(cfg.text_column, "a sentence")]
    if cfg.task == "classification":
        wanted.append((cfg.label_column, "a number"))
    free = list(range(len(kinds)))
    for name, kind in wanted:
        match = [i for i in free if kinds[i] == kind] or free
        if match:
            names[match[0]] = name
            free.remove(match[0])
    return names
