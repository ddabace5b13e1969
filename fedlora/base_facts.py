"""What a server that does not evaluate needs from the base model: its *base facts*.

The ServerApp needs the base model for three things besides central evaluation:
the freshly initialised global adapter (A random from the seed, B zero), the base
model's fingerprint that every site checks its own model against, and the files
of a PEFT adapter directory (``adapter_config.json``, model card) to save each
round's adapter in. :func:`compute_base_facts` builds the model exactly as a
client does (``fedlora.cache``) and reads the three off it.

Two processes compute them for a server that holds no model
(``strategies.server.evaluator.BaseFactsOnly``): in a simulation, the simulated
clients themselves, which load this model anyway (a ``QUERY_BASE_FACTS`` query
answered with :func:`facts_to_content`, read back by :func:`facts_from_content`);
in a deployment, a short-lived child of the ServerApp
(``strategies.server.base_facts``), because a site is not the server's authority
on the model it checks the sites against.

This module imports neither transformers nor peft at the top: the ServerApp
imports it to read the facts and never loads the model.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedlora import protocol as proto

if TYPE_CHECKING:
    from flwr.app import RecordDict

    from fedlora.config import ClientConfig
    from fedlora.lora.state import StateDict

TEMPLATE_FILES = ("adapter_config.json", "README.md")  # save_pretrained's, less weights


@dataclass(frozen=True)
class BaseFacts:
    """The base model's fingerprint, initial adapter and PEFT directory files.

    ``initial`` maps ``get_peft_model_state_dict`` keys to float32 tensors (LoRA A
    ``(r, d_in)``, B ``(d_out, r)``, a trained head); ``template`` maps a file name of
    a PEFT adapter directory (config, model card) to its text.
    """

    fingerprint: str
    initial: StateDict
    template: Mapping[str, str]


def compute_base_facts(cfg: ClientConfig, *, cached: bool = True) -> BaseFacts:
    """Build the model of ``cfg`` at its global rank here and read its facts.

    ``cfg`` is the run's config without site overrides (a ServerApp's
    ``ExperimentConfig`` is one). With ``cached`` the model is this process's
    cached bundle (a client that trains this very model next); otherwise it is
    built for this call alone and freed after it (a client whose own rank or
    model path differs, so it never trains this one). The initial adapter is
    the bundle's copy as built, so training in this process before does not
    change it.
    """
    from fedlora.cache import build_model_bundle, model_bundle
    from fedlora.fingerprint import model_fingerprint

    bundle = model_bundle(cfg) if cached else build_model_bundle(cfg)
    model = bundle.model
    with tempfile.TemporaryDirectory(prefix="fedlora-template-") as tmp:
        model.save_pretrained(tmp)
        template = {
            name: (Path(tmp) / name).read_text(encoding="utf-8")
            for name in TEMPLATE_FILES
            if (Path(tmp) / name).exists()
        }
    initial = {k: v.clone() for k, v in bundle.initial.items()}
    return BaseFacts(model_fingerprint(model), initial, template)


def facts_to_content(facts: BaseFacts) -> RecordDict:
    """Return a query reply's content carrying ``facts``.

    The adapter travels in float32 whatever the run's transport dtype: the
    server's initial adapter must be exact.
    """
    from flwr.app import ConfigRecord, RecordDict

    from fedlora.lora.state import to_record

    meta = ConfigRecord({proto.BASE_FINGERPRINT: facts.fingerprint})
    for name, text in facts.template.items():
        meta[f"{proto.TEMPLATE_FILE}{name}"] = text
    return RecordDict(
        {proto.BASE_FACTS: meta, proto.ARRAYS: to_record(facts.initial, "float32")}
    )


def facts_from_content(content: RecordDict) -> BaseFacts:
    """Inverse of :func:`facts_to_content`.

    Raises
    ------
    ValueError
        If a record or the fingerprint is missing, or the adapter is not float32.
    """
    from fedlora.lora.state import from_record

    meta = content.config_records.get(proto.BASE_FACTS)
    arrays = content.array_records.get(proto.ARRAYS)
    if meta is None or arrays is None or proto.BASE_FINGERPRINT not in meta:
        raise ValueError(
            f"a base-facts reply needs the records {proto.BASE_FACTS!r} (with "
            f"{proto.BASE_FINGERPRINT!r}) and {proto.ARRAYS!r}; got "
            f"{sorted(content.keys())}"
        )
    dtypes = {a.dtype for a in arrays.values()}
    if dtypes - {"float32"}:
        raise ValueError(f"base-facts adapter must be float32, got {sorted(dtypes)}")
    template = {
        key.removeprefix(proto.TEMPLATE_FILE): str(text)
        for key, text in meta.items()
        if key.startswith(proto.TEMPLATE_FILE)
    }
    return BaseFacts(str(meta[proto.BASE_FINGERPRINT]), from_record(arrays), template)
