"""The server's view of the base model: central evaluation, or only its facts.

Two implementations of one interface (:class:`ServerModel`), chosen by
:func:`server_model`:

- :class:`CentralEvaluator` holds the LoRA-wrapped base model in the ServerApp
  process and evaluates every global adapter on the held-out split;
- :class:`BaseFactsOnly` is used when the server does not evaluate (no held-out
  split, or a strategy whose server cannot read the merged adapter): it holds the
  base model's fingerprint, the initial adapter and the PEFT directory files,
  computed once by the simulated clients or, in a deployment, a child process
  (``strategies.server.base_facts``), and never loads the model or imports
  transformers and peft.

Both write the same checkpoint directories (``PeftModel.from_pretrained`` loads
them) and send the same fingerprint.
"""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path
from typing import Any, Protocol

from flwr.app import ConfigRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedlora import protocol as proto
from fedlora.base_facts import BaseFacts
from fedlora.cache import (
    collator,
    heldout_dataset,
    initial_pissa_factors,
    model_bundle,
)
from fedlora.config.flat import flatten_config
from fedlora.fingerprint import base_fingerprint
from fedlora.generation import with_generation
from fedlora.lora.pissa import export_for_original_base
from fedlora.lora.residual import Residual, set_residual, write_residual_adapter
from fedlora.lora.state import StateDict, load_adapter_state
from fedlora.train import EvalResult, evaluate
from strategies.config import ExperimentConfig
from strategies.server.base_facts import (
    ask_clients,
    base_facts_in_child,
    clients_answer,
    facts_from_clients,
    held_out_split,
    save_adapter_dir,
)


class CentralEvaluator:
    """Evaluates global adapters on the held-out split and saves them as PEFT dirs.

    With an empty held-out split (``data.test_fraction=0``) there is no central
    evaluation: ``has_data`` is False and the ``eval_*`` fields stay empty.
    """

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.bundle = model_bundle(cfg)
        self.data = heldout_dataset(cfg)
        self.collate = collator(cfg)
        self.fingerprint = base_fingerprint(self.bundle.model)

    @property
    def has_data(self) -> bool:
        """Whether there is a held-out split to evaluate on."""
        return len(self.data) > 0

    def fields(
        self, state: StateDict, residual: Residual | None = None
    ) -> dict[str, Any]:
        """``eval_*`` fields of a metrics row (None without held-out data)."""
        if not self.has_data:
            return eval_fields(None)
        return eval_fields(self(state, residual))

    def config(self) -> ConfigRecord:
        """Per-round message config: the base model's fingerprint for the sites."""
        return ConfigRecord({proto.BASE_FINGERPRINT: self.fingerprint})

    def initial_state(self) -> StateDict:
        """Return the freshly initialised adapter (A random from the seed, B zero)."""
        return {k: v.clone() for k, v in self.bundle.initial.items()}

    def __call__(
        self, state: StateDict, residual: Residual | None = None
    ) -> EvalResult:
        """Load ``state`` (+ FLoRA residual) and evaluate on the held-out split."""
        set_residual(self.bundle.model, residual or {})
        load_adapter_state(self.bundle.model, state)
        result = evaluate(
            self.bundle.model,
            self.data,
            self.collate,
            task=self.cfg.data.task,
            batch_size=self.cfg.train.eval_batch_size,
            device=self.bundle.device,
        )
        return with_generation(
            result, self.bundle.model, self.data, self.cfg, self.bundle.device
        )

    def save(
        self, state: StateDict, path: Any, residual: Residual | None = None
    ) -> None:
        """Write ``state`` as a standard PEFT adapter directory.

        With a FLoRA residual the saved LoRA is the residual itself (the adapter
        is the restarted one, B = 0), loadable with ``PeftModel.from_pretrained``.
        """
        load_adapter_state(self.bundle.model, state)
        self.bundle.model.save_pretrained(str(path))
        if residual:
            write_residual_adapter(path, residual)
        if self.cfg.adapter.init == "pissa":  # trained on the residual base
            initial = initial_pissa_factors(self.cfg)
            export_for_original_base(path, self.cfg.model, self.cfg.adapter, initial)


class ServerModel(Protocol):
    """What the round loop asks of the base model (see the module docstring)."""

    @property
    def has_data(self) -> bool:
        """Whether global adapters are evaluated on a held-out split."""
        ...

    def fields(
        self, state: StateDict, residual: Residual | None = None
    ) -> dict[str, Any]:
        """``eval_*`` fields of a metrics row."""
        ...

    def config(self) -> ConfigRecord:
        """Per-round message config (the base model's fingerprint)."""
        ...

    def initial_state(self) -> StateDict:
        """Return the freshly initialised global adapter."""
        ...

    def save(
        self, state: StateDict, path: Any, residual: Residual | None = None
    ) -> None:
        """Write ``state`` as a PEFT adapter directory at ``path``."""
        ...


def evaluates_centrally(cfg: ExperimentConfig, server_can_evaluate: bool) -> bool:
    """Whether the server evaluates each global adapter on a held-out split.

    False when the strategy's server cannot read the merged adapter (SHE-LoRA) or
    the configuration has no held-out split (``data.test_fraction=0`` without
    ``data.test_path``). A split that turns out empty for a tiny data set keeps the
    model (``CentralEvaluator.has_data`` is then False).
    """
    return server_can_evaluate and held_out_split(cfg)


class BaseFactsOnly:
    """A server without central evaluation: base facts, no model (module docstring)."""

    def __init__(self, facts: BaseFacts, cfg: ExperimentConfig) -> None:
        self.facts = facts
        self.cfg = cfg

    @classmethod
    def compute(cls, cfg: ExperimentConfig, grid: Grid | None = None) -> BaseFactsOnly:
        """Facts from the clients of a simulation's ``grid``, else (None) a child's.

        In a simulation the clients load this model for round 1 anyway; a
        deployment's server does not take its reference fingerprint from a site
        (``server_model`` passes its grid only in a simulation).
        """
        start = time.perf_counter()
        if grid is not None:  # a simulation's (``server_model``)
            timeout = cfg.federation.round_timeout
            facts, source = facts_from_clients(grid, cfg, timeout), "the clients"
        else:
            facts = base_facts_in_child(flatten_config(cfg))
            source = "a child process"
        log(
            INFO,
            "fedlora: no central evaluation; the server holds no base model (initial "
            "adapter and fingerprint from %s, %.1f s)",
            source,
            time.perf_counter() - start,
        )
        return cls(facts, cfg)

    @property
    def has_data(self) -> bool:
        """Never: this server does not evaluate."""
        return False

    def fields(
        self, state: StateDict, residual: Residual | None = None
    ) -> dict[str, Any]:
        """All ``eval_*`` fields None."""
        return eval_fields(None)

    def config(self) -> ConfigRecord:
        """Per-round message config: the base model's fingerprint for the sites."""
        return ConfigRecord({proto.BASE_FINGERPRINT: self.facts.fingerprint})

    def initial_state(self) -> StateDict:
        """Return a copy of the child's initial adapter (A from the seed, B zero)."""
        return {k: v.clone() for k, v in self.facts.initial.items()}

    def save(
        self, state: StateDict, path: Any, residual: Residual | None = None
    ) -> None:
        """Write ``state`` (+ FLoRA residual) as a PEFT adapter directory."""
        save_adapter_dir(Path(path), self.facts, state)
        if residual:
            write_residual_adapter(path, residual)
        initial = self.facts.initial
        export_for_original_base(path, self.cfg.model, self.cfg.adapter, initial)


def server_model(
    cfg: ExperimentConfig, server_can_evaluate: bool, grid: Grid | None = None
) -> CentralEvaluator | BaseFactsOnly:
    """Return the model-holding evaluator if the server evaluates, else facts.

    ``grid``: the run's grid. On a simulation's the clients compute the facts
    or, if the server evaluates, load their model while it loads its own (and
    must agree with its fingerprint).
    """
    simulated = grid is not None and in_simulation(grid)
    if not evaluates_centrally(cfg, server_can_evaluate):
        return BaseFactsOnly.compute(cfg, grid if simulated else None)
    if grid is None or not simulated:
        return CentralEvaluator(cfg)
    asked = ask_clients(grid, cfg)  # the clients load their model meanwhile
    evaluator = CentralEvaluator(cfg)
    timeout = cfg.federation.round_timeout
    clients_answer(grid, asked, timeout, own=evaluator.fingerprint)
    return evaluator


def in_simulation(grid: Grid) -> bool:
    """Whether ``grid`` is a simulation's (Flower's in-memory grid)."""
    from flwr.superlink.grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


EVAL_FIELDS = (
    "eval_loss", "eval_accuracy", "eval_perplexity", "eval_exact_match", "eval_rouge_l"
)  # fmt: skip


def eval_fields(result: EvalResult | None) -> dict[str, Any]:
    """Return the ``eval_*`` fields of a metrics row (None without a result)."""
    if result is None:
        return dict.fromkeys(EVAL_FIELDS)
    return {
        "eval_loss": result.loss,
        "eval_accuracy": result.accuracy,
        "eval_perplexity": result.perplexity,
        "eval_exact_match": result.exact_match,
        "eval_rouge_l": result.rouge_l,
    }
