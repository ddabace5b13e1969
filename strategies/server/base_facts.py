"""Where a server that does not evaluate gets its base facts, and how it saves.

A server without central evaluation (no held-out split, or SHE-LoRA, whose server
cannot decrypt the merged adapter) never imports transformers or peft nor loads
the model: the ServerApp process stays at the size of torch and Flower for the
whole run (0.44 GiB instead of 0.87 GiB at the peak of the tiny-Llama run; a real
model saves its own size on top). It needs the model's *base facts*
(``fedlora.base_facts``) all the same, and gets them

- in a simulation (Flower's in-memory grid) from the simulated clients
  (:func:`facts_from_clients`): they build this model for their first round
  anyway, so the run loads it once per client process and not once more for the
  server, and the clients are warm when round 1 starts. Several clients are
  asked and must agree bit for bit;
- in a deployment from a short-lived child process (:func:`base_facts_in_child`):
  ``python -m strategies.server.base_facts <run-config.json> <out dir>`` writes
  ``initial.safetensors`` (the initial adapter, float32), ``facts.json``
  (fingerprint) and ``template/`` (PEFT's ``save_pretrained`` output of that
  adapter). A site is not the server's authority on the model it checks the
  sites against.

:func:`save_adapter_dir` then writes any adapter with the template's config and
model card: the same files ``PeftModel.save_pretrained`` writes. This module
imports neither torch nor Flower at the top.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.base_facts import BaseFacts, compute_base_facts

if TYPE_CHECKING:
    import torch
    from flwr.serverapp import Grid

WEIGHTS_FILE = "adapter_model.safetensors"  # peft.utils.SAFETENSORS_WEIGHTS_NAME
_SOURCE_ROOT = Path(__file__).resolve().parents[2]  # holds fedlora/ and strategies/


def held_out_split(cfg: Any) -> bool:
    """Whether ``cfg`` (an ``ExperimentConfig``) asks for a held-out split."""
    return bool(cfg.data.test_path) or cfg.data.test_fraction > 0


def write_facts(facts: BaseFacts, out: Path) -> None:
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
    meta = {"fingerprint": facts.fingerprint}
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


def ask_clients(grid: Grid, cfg: Any) -> set[str]:
    """Push the base-facts query of ``cfg`` (an ``ExperimentConfig``); return ids.

    As many nodes are asked as round 1 samples (``federation.fraction_train``, at
    least ``federation.min_clients``), so the simulation engine hands the queries
    to as many client processes, which all load the model before round 1; at
    most one per CPU of this machine (no more actors run here), so a large
    federation does not send an adapter per client twice.
    """
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from fedlora import protocol as proto
    from strategies.server.exchange import push

    nodes = sorted(grid.get_node_ids())
    fed = cfg.federation
    sampled = max(1, fed.min_clients, int(len(nodes) * fed.fraction_train))
    question = ConfigRecord({proto.QUERY: proto.QUERY_BASE_FACTS})
    messages = [
        Message(
            RecordDict({proto.CONFIG: question}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node in nodes[: min(len(nodes), sampled, os.cpu_count() or 1)]
    ]
    return push(grid, messages)


def clients_answer(
    grid: Grid, pending: set[str], timeout: float | None, own: str = ""
) -> BaseFacts:
    """Collect the answers to :func:`ask_clients`; they must all be the same.

    ``own``: the fingerprint of the server's own model, if it holds one; every
    answer must have it too (the initial adapters are not compared with the
    server's: a client on another device draws them from another generator).

    Raises
    ------
    RuntimeError
        If a client fails (e.g. the model cannot be loaded; its error is quoted),
        none answers within ``timeout`` seconds, or two answers disagree.
    """
    from fedlora.base_facts import facts_from_content
    from strategies.server.exchange import receive

    answers: list[tuple[str, BaseFacts]] = []
    for reply in receive(grid, pending, timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise RuntimeError(
                f"simulated client (node {node}) could not build the base model for "
                f"the server's initial adapter and fingerprint: {reply.error.reason}"
            )
        try:
            answers.append((f"node {node}", facts_from_content(reply.content)))
        except ValueError as err:
            reason = f"node {node}: malformed base-facts reply: {err}"
            raise RuntimeError(reason) from err
    if not answers:
        raise RuntimeError(
            f"no simulated client answered the base-facts query within {timeout} s "
            "(federation.round_timeout)"
        )
    first, facts = answers[0]
    if own and facts.fingerprint != own:
        raise RuntimeError(
            f"{first} built another base model than the server's (fingerprint "
            f"{facts.fingerprint}, the server's {own}): every process of a "
            "simulation must run the same code, library versions and model files"
        )
    for who, other in answers[1:]:
        if not same_facts(facts, other):
            raise RuntimeError(
                f"{first} and {who} built different base models (fingerprints "
                f"{facts.fingerprint} and {other.fingerprint}, or different initial "
                "adapters): every process of a simulation must run the same code, "
                "library versions and model files"
            )
    return facts


def facts_from_clients(grid: Grid, cfg: Any, timeout: float | None) -> BaseFacts:
    """Ask simulated clients for the base facts of ``cfg`` and return their answer.

    :func:`ask_clients`, then :func:`clients_answer`.
    """
    return clients_answer(grid, ask_clients(grid, cfg), timeout)


def same_facts(a: BaseFacts, b: BaseFacts) -> bool:
    """Whether two clients built the same model: fingerprint and every tensor.

    The template files are not compared: peft writes ``target_modules`` from a
    set, in an order that differs between processes.
    """
    import torch

    return (
        a.fingerprint == b.fingerprint
        and set(a.initial) == set(b.initial)
        and all(torch.equal(a.initial[k], b.initial[k]) for k in a.initial)
    )


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


def main(argv: list[str]) -> None:
    """Child entry point: ``<run-config.json> <out dir>``."""
    from strategies.config import ExperimentConfig

    config_file, out = Path(argv[0]), Path(argv[1])
    run_config = json.loads(config_file.read_text())
    cfg = ExperimentConfig.from_run_config(run_config)
    write_facts(compute_base_facts(cfg), out)


if __name__ == "__main__":
    main(sys.argv[1:])
