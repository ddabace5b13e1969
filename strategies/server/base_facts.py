"""What a server that does not evaluate needs from the base model, without holding it.

The ServerApp needs the base model for three things besides central evaluation:
the freshly initialised global adapter (A random from the seed, B zero), the base
model's fingerprint that every site checks its own model against, and the files
of a PEFT adapter directory (``adapter_config.json``, model card) to save each
round's adapter in. When the server does not evaluate (no held-out split, or
SHE-LoRA, whose server cannot decrypt the merged adapter), it gets these
*base facts* from a short-lived child process and never imports transformers or
peft nor loads the model: the ServerApp process stays at the size of torch and
Flower for the whole run (0.44 GiB instead of 0.87 GiB at the peak of the
tiny-Llama run; a real model saves its own size on top). The child builds the
model exactly as a client does (``fedlora.cache.model_bundle``), so the facts are
those of the in-process path.

The child is ``python -m strategies.server.base_facts <run-config.json> <out dir>``;
it writes ``initial.safetensors`` (the initial adapter, float32), ``facts.json``
(fingerprint, and the key of the run config it was computed for) and ``template/``
(PEFT's ``save_pretrained`` output of that adapter). :func:`save_adapter_dir` then
writes any adapter with the template's config and model card: the same files
``PeftModel.save_pretrained`` writes.

The launcher starts the same child before it starts Flower
(:func:`start_precompute`), so the model loads while the SuperLink, the SuperExec
and the simulation engine start: ``<run dir>/.base-facts/`` holds a ``lock`` the
child keeps (``flock``) until it is done and the finished ``facts/``. The ServerApp
waits on the lock, uses the facts if their key is that of its own run config, and
otherwise computes them itself. This module imports neither torch nor Flower at
the top: the launcher stays light.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from fedlora.lora.state import StateDict

PRECOMPUTED = ".base-facts"  # in the run directory, while the launcher runs
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


def held_out_split(cfg: Any) -> bool:
    """Whether ``cfg`` (an ``ExperimentConfig``) asks for a held-out split."""
    return bool(cfg.data.test_path) or cfg.data.test_fraction > 0


def facts_key(run_config: Mapping[str, Any]) -> str:
    """Key of a flat run config: facts are reused only for the same config."""
    text = json.dumps(dict(run_config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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


def write_facts(facts: BaseFacts, out: Path, key: str = "") -> None:
    """Write ``facts`` to the directory ``out`` (read back by :func:`read_facts`).

    The files go to a sibling temporary directory first, renamed to ``out`` when
    complete: a reader never sees half of them.
    """
    from safetensors.torch import save_file

    final, out = out, out.with_name(f"{out.name}.tmp-{os.getpid()}")
    out.mkdir(parents=True, exist_ok=True)
    initial = {k: v.contiguous() for k, v in facts.initial.items()}
    save_file(initial, str(out / "initial.safetensors"))
    (out / "template").mkdir(exist_ok=True)
    for name, text in facts.template.items():
        (out / "template" / name).write_text(text, encoding="utf-8")
    meta = {"fingerprint": facts.fingerprint, "key": key}
    (out / "facts.json").write_text(json.dumps(meta))
    os.replace(out, final)


def read_facts(out: Path) -> BaseFacts:
    """Inverse of :func:`write_facts`."""
    from safetensors.torch import load_file

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
        cmd, env = _child_command(config_file, Path(tmp) / "out")
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
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})


def _child_command(config_file: Path, out: Path) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_SOURCE_ROOT), env.get("PYTHONPATH", "")) if p
    )
    return [sys.executable, "-m", __name__, str(config_file), str(out)], env


def start_precompute(cfg: Any, run_dir: Path) -> subprocess.Popen[bytes] | None:
    """Start computing the base facts of ``cfg`` into ``run_dir/.base-facts``.

    Launcher side, and only when the server will not hold the model anyway (no
    held-out split); ``cfg`` is the ``ExperimentConfig`` of the run config. The
    child holds ``.base-facts/lock`` until its facts are written or it fails; its
    output goes to ``.base-facts/child.log``. Returns the child, or None.
    """
    if held_out_split(cfg):
        return None
    from fedlora.config.flat import flatten_config

    root = run_dir / PRECOMPUTED
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "run_config.json").write_text(json.dumps(flatten_config(cfg)))
    cmd, env = _child_command(root / "run_config.json", root / "facts")
    with (root / "lock").open("w") as lock, (root / "child.log").open("wb") as log:
        fcntl.flock(lock, fcntl.LOCK_EX)  # shared with the child, held until it exits
        return subprocess.Popen(
            cmd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            pass_fds=(lock.fileno(),),
        )


def stop_precompute(child: subprocess.Popen[bytes] | None, run_dir: Path) -> None:
    """Stop the launcher's child if it still runs and remove ``.base-facts``."""
    if child is not None and child.poll() is None:
        child.kill()
        child.wait()
    shutil.rmtree(run_dir / PRECOMPUTED, ignore_errors=True)


def precomputed_facts(
    run_dir: Path, run_config: Mapping[str, Any], wait_s: float = 900.0
) -> BaseFacts | None:
    """Return the launcher's facts for exactly ``run_config`` (waits for its child).

    None if there are none (a deployment, a run with central evaluation), if the
    child failed or was computed for another config, or after ``wait_s``.
    """
    root = run_dir / PRECOMPUTED
    try:
        lock = (root / "lock").open("r")
    except OSError:
        return None
    with lock:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.05)
    facts_dir = root / "facts"
    try:
        meta = json.loads((facts_dir / "facts.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("key") != facts_key(run_config):
        return None
    return read_facts(facts_dir)


def main(argv: list[str]) -> None:
    """Child entry point: ``<run-config.json> <out dir>``."""
    from strategies.config import ExperimentConfig

    config_file, out = Path(argv[0]), Path(argv[1])
    run_config = json.loads(config_file.read_text())
    cfg = ExperimentConfig.from_run_config(run_config)
    write_facts(compute_base_facts(cfg), out, key=facts_key(run_config))


if __name__ == "__main__":
    main(sys.argv[1:])
