"""Typed, validated ``data`` group: the source, its columns, the splits."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import PurePath

from fedlora.config.flat import ConfigError, check_choice, check_range, field_help
from fedlora.data import DATA_SOURCES
from fedlora.data.files import HEADERLESS_EXTENSIONS
from fedlora.data.sources import PROMPT_FORMATS, TASKS

PARTITIONERS = ("iid", "dirichlet")


@dataclass(frozen=True)
class DataConfig:
    """Where the examples come from and how they are split (Hydra group ``data``)."""

    source: str = field(
        default="synthetic",
        metadata=field_help(
            f"One of {', '.join(DATA_SOURCES.names())}: local reads data.path (a "
            "file), hf loads data.path from the hub."
        ),
    )
    task: str = field(
        default="classification", metadata=field_help(f"One of {', '.join(TASKS)}.")
    )
    path: str = field(
        default="", metadata=field_help("File path (source=local) or dataset id (hf).")
    )
    subset: str = field(
        default="", metadata=field_help("Hub dataset configuration name.")
    )
    split: str = field(
        default="train", metadata=field_help("Hub split used for training.")
    )
    text_column: str = field(default="text", metadata=field_help("Input text column."))
    label_column: str = field(
        default="label", metadata=field_help("Label column (classification).")
    )
    header: bool = field(
        default=True,
        metadata=field_help(
            "Local CSV/TSV files (data.path, data.test_path): the first row names the "
            "columns; false: every row is data and data.columns names them."
        ),
    )
    columns: tuple[str, ...] = field(
        default=(),
        metadata=field_help(
            "With data.header=false: the column names in file order, e.g. "
            "[text,label]; empty otherwise."
        ),
    )
    num_examples: int = field(
        default=3200, metadata=field_help("Synthetic sources: examples generated.")
    )
    num_classes: int = field(
        default=4, metadata=field_help("Synthetic classification: number of classes.")
    )
    test_fraction: float = field(
        default=0.2, metadata=field_help("Held-out share for centralised evaluation.")
    )
    test_path: str = field(
        default="",
        metadata=field_help(
            "Held-out file (same format and columns as data.path) instead of a "
            "test_fraction split; every row of the source then trains."
        ),
    )
    max_test_examples: int = field(
        default=1000, metadata=field_help("Cap on held-out examples (evaluation cost).")
    )
    max_length: int = field(default=64, metadata=field_help("Tokens per example."))
    instruction: str = field(
        default="",
        metadata=field_help(
            "Causal LM from a labelled file: the question asked about each "
            "data.text_column (e.g. 'Is the sentiment of this sentence positive or "
            "negative?'); the answer is the label's name in data.label_names."
        ),
    )
    label_names: tuple[str, ...] = field(
        default=(),
        metadata=field_help(
            "With data.instruction: the answer for each class id, in id order "
            "(e.g. [negative,positive])."
        ),
    )
    prompt_format: str = field(
        default="auto",
        metadata=field_help(
            "Causal LM prompts: alpaca (### Instruction / ### Response text), chat "
            "(the model's chat template; needed for messages rows) or auto (chat for "
            "chat presets such as smollm2, else alpaca)."
        ),
    )
    partitioner: str = field(
        default="dirichlet", metadata=field_help("iid or dirichlet (non-IID by label).")
    )
    dirichlet_alpha: float = field(
        default=0.5,
        metadata=field_help("Dirichlet concentration; smaller = more skewed."),
    )

    def __post_init__(self) -> None:
        check_choice("data.source", self.source, DATA_SOURCES.names())
        check_choice("data.task", self.task, TASKS)
        check_choice("data.partitioner", self.partitioner, PARTITIONERS)
        check_choice("data.prompt_format", self.prompt_format, PROMPT_FORMATS)
        self._check_instruction()
        if self.source in ("local", "hf") and not self.path:
            raise ConfigError(
                f"data.path is empty but data.source={self.source!r} needs it "
                "(a CSV/TSV/JSONL/Parquet file for local, a dataset id for hf)"
            )
        self._check_columns()
        check_range("data.num_examples", self.num_examples, low=2)
        check_range("data.num_classes", self.num_classes, low=2)
        if self.source == "synthetic":
            check_range("data.num_classes", self.num_classes, low=2, high=8)
        check_range(
            "data.test_fraction", self.test_fraction, low=0, high=1, high_open=True
        )
        check_range("data.max_test_examples", self.max_test_examples, low=1)
        check_range("data.max_length", self.max_length, low=4)
        check_range("data.dirichlet_alpha", self.dirichlet_alpha, low=0, low_open=True)
        if self.task == "causal_lm" and self.partitioner == "dirichlet":
            warnings.warn(
                "data.partitioner='dirichlet' needs labels; causal_lm data has none, "
                "so the split falls back to iid",
                stacklevel=2,
            )

    def _check_instruction(self) -> None:
        """data.instruction turns text + label rows into question/answer rows."""
        if not self.instruction and not self.label_names:
            return
        if self.task != "causal_lm" or self.source not in ("local", "hf"):
            raise ConfigError(
                "data.instruction/data.label_names ask a question about a labelled "
                "file: they need data.task=causal_lm and data.source=local or hf, "
                f"not task={self.task!r}, source={self.source!r}"
            )
        if not self.instruction.strip() or len(self.label_names) < 2:
            raise ConfigError(
                "data.instruction needs data.label_names (one answer per class id, "
                "at least 2) and vice versa, e.g. data.instruction='Is the sentiment "
                "positive or negative?' data.label_names=[negative,positive]"
            )
        if len(set(self.label_names)) < len(self.label_names) or any(
            not n.strip() for n in self.label_names
        ):
            raise ConfigError(
                f"data.label_names={list(self.label_names)}: names must be non-empty "
                "and distinct"
            )

    def _check_columns(self) -> None:
        """Check data.header/data.columns: names exactly for a headerless CSV/TSV."""
        if self.header:
            if self.columns:
                raise ConfigError(
                    f"data.columns={list(self.columns)} names the columns of a file "
                    "without a header row; set data.header=false too, or drop "
                    "data.columns to read the names from the header"
                )
            return
        if not self.columns:
            raise ConfigError(
                "data.header=false needs data.columns, the column names in file "
                f"order, e.g. data.columns=[{self.text_column},{self.label_column}]"
            )
        if any(not c.strip() for c in self.columns) or len(set(self.columns)) < len(
            self.columns
        ):
            raise ConfigError(
                f"data.columns={list(self.columns)}: names must be non-empty and "
                "distinct (one per column, in file order)"
            )
        local = self.path if self.source == "local" else ""
        for key, path in (("data.path", local), ("data.test_path", self.test_path)):
            suffix = PurePath(path).suffix.lower()
            if path and suffix not in HEADERLESS_EXTENSIONS:
                raise ConfigError(
                    f"data.header=false is for CSV/TSV files, not {key}={path!r} "
                    f"({suffix or 'no extension'} files name their columns); "
                    "drop data.header and data.columns"
                )
        if self.task == "classification" or self.instruction:
            for key, name in (
                ("text_column", self.text_column),
                ("label_column", self.label_column),
            ):
                if name not in self.columns:
                    raise ConfigError(
                        f"data.columns={list(self.columns)} has no {name!r} "
                        f"(data.{key}); add it at its position in the file or set "
                        f"data.{key} to one of data.columns"
                    )
