"""What a server that does not evaluate needs from the base model, without holding it.

The ServerApp needs the base model for three things besides central evaluation:
the freshly initialised global adapter (A random from the seed, B zero), the base
model's fingerprint that every site checks its own model against, and the files
of a PEFT adapter directory (``adapter_config.json``, model card) to save each
round's adapter in. When the server does not evaluate (no held-out split, or
SHE-LoRA, whose server cannot decrypt the merged adapter), it gets these
*base facts* from a short-lived child process and never imports transformers or
peft nor loads the model: the ServerApp process stays at the size of torch and
Flower (about 0.3 GiB instead of 0.8 GiB for the tiny Llama, more for real models)
for the whole run. The child builds the model exactly as a client does
(``fedlora.cache.model_bundle``), so the facts are those of the in-process path.

The child is ``python -m strategies.server.base_facts <run-config.json> <out dir>``;
it writes ``initial.safetensors`` (the initial adapter, float32), ``facts.json``
(fingerprint) and ``template/`` (PEFT's ``save_pretrained`` output of that
adapter). :func:`save_adapter_dir` then writes any adapter with the template's
config and model card: the same files ``PeftModel.save_pretrained`` writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedlora.lora.state import StateDict

WEIGHTS_FILE = "adapter_model.safetensors"  # peft.utils.SAFETENSORS_WEIGHTS_NAME
_TEMPLATE_FILES = ("adapter_config.json", "README.md")
_SOURCE_ROOT = Path(__file__).resolve().parents[2]  # holds fedlora/ and strategies/


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


def compute_base_facts(cfg: Any) -> BaseFacts:
    """Build the model of ``cfg`` (an ``ExperimentConfig``) here and read its facts.

    This imports transformers and peft and loads the base model: the child process
    calls it, and so can a process that holds the model anyway.
    """
    from fedlora.cache import model_bundle
    from fedlora.fingerprint import base_fingerprint
    from fedlora.lora.state import adapter_state

    model = model_bundle(cfg).model
    with tempfile.TemporaryDirectory(prefix="fedlora-template-") as tmp:
        model.save_pretrained(tmp)
        template = {
            name: (Path(tmp) / name).read_text(encoding="utf-8")
            for name in _TEMPLATE_FILES
            if (Path(tmp) / name).exists()
        }
    return BaseFacts(base_fingerprint(model), adapter_state(model), template)


def write_facts(facts: BaseFacts, out: Path) -> None:
    """Write ``facts`` to the directory ``out`` (read back by :func:`read_facts`)."""
    out.mkdir(parents=True, exist_ok=True)
    initial = {k: v.contiguous() for k, v in facts.initial.items()}
    save_file(initial, str(out / "initial.safetensors"))
    (out / "template").mkdir(exist_ok=True)
    for name, text in facts.template.items():
        (out / "template" / name).write_text(text, encoding="utf-8")
    (out / "facts.json").write_text(json.dumps({"fingerprint": facts.fingerprint}))


def read_facts(out: Path) -> BaseFacts:
    """Inverse of :func:`write_facts`."""
    meta = json.loads((out / "facts.json").read_text())
    template = {
        p.name: p.read_text(encoding="utf-8")
        for p in sorted((out / "template").iterdir())
    }
    return BaseFacts(
        meta["fingerprint"], dict(load_file(str(out / "initial.safetensors"))), template
    )


def base_facts_in_child(run_config: Mapping[str, Any]) -> BaseFacts:
    """Compute the base facts of ``run_config`` (flat) in a child process.

    Raises
    ------
    RuntimeError
        If the child fails (e.g. the model cannot be loaded), with its error output.
    """
    with tempfile.TemporaryDirectory(prefix="fedlora-base-facts-") as tmp:
        config_file = Path(tmp) / "run_config.json"
        config_file.write_text(json.dumps(dict(run_config)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_SOURCE_ROOT), env.get("PYTHONPATH", "")) if p
        )
        cmd = [sys.executable, "-m", __name__, str(config_file), str(Path(tmp) / "out")]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                "loading the base model for the server's initial adapter and "
                f"fingerprint failed (exit code {done.returncode}):\n"
                + done.stderr[-4000:]
            )
        return read_facts(Path(tmp) / "out")


def save_adapter_dir(
    path: Path, facts: BaseFacts, state: Mapping[str, torch.Tensor]
) -> None:
    """Write ``state`` as a PEFT adapter directory, as ``save_pretrained`` does.

    ``state`` must have the keys of ``facts.initial`` (same shapes): a global
    adapter of this run. ``PeftModel.from_pretrained(base, path)`` loads it.
    """
    if set(state) != set(facts.initial):
        missing = sorted(set(facts.initial) - set(state))
        extra = sorted(set(state) - set(facts.initial))
        raise ValueError(
            f"adapter keys differ from the base model's adapter: missing "
            f"{missing[:3]}, unexpected {extra[:3]}"
        )
    path.mkdir(parents=True, exist_ok=True)
    for name, text in facts.template.items():
        (path / name).write_text(text, encoding="utf-8")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})


def main(argv: list[str]) -> None:
    """Child entry point: ``<run-config.json> <out dir>``."""
    from strategies.config import ExperimentConfig

    config_file, out = Path(argv[0]), Path(argv[1])
    cfg = ExperimentConfig.from_run_config(json.loads(config_file.read_text()))
    write_facts(compute_base_facts(cfg), out)


if __name__ == "__main__":
    main(sys.argv[1:])
