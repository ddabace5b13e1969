"""One client's memory and step time with an NF4 vs a float32 base model.

Each probe runs in a fresh process (peak RSS is per process): it composes the
shipped Hydra config with overrides, builds the client model through
``fedlora.cache.model_bundle`` and runs ``fedlora.client.round.train_round`` twice as
site 0 of 8, with the initial adapter ``fedlora.lora.state.adapter_state(model)``.

Commands (from the repository root)::

    python -m benchmarks.round_costs --skip-federation          # both presets
    python -m benchmarks.round_costs --skip-federation --memory-models tiny_llama-512x16
    python -m benchmarks.client_memory -o model.quantization=none   # one probe

Reading the figures: ``memory_footprint_mib`` counts parameter and buffer bytes;
RSS also holds the runtime (torch, transformers, peft, datasets: ~600 MiB) and
counts float32 safetensors weights as file-backed pages only once touched (they are
memory-mapped), whereas the NF4 path allocates its 4-bit weights and float32
embeddings/norms as anonymous memory. ``linear_share`` is the share of base weights
that NF4 can shrink (the embedding and task heads stay float32).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# Models of the memory report: label -> Hydra overrides. NF4 quantises only the
# decoder/encoder linears; the (tied) 30,522-token embedding stays float32, so the
# saving grows with depth: ``linear_share`` in the report says how much can shrink.
_TINY_LLAMA = (
    "model=tiny_llama",
    "data=synthetic_instruct",
    "model.tiny_hidden_size=512",
)
MEMORY_MODELS: dict[str, tuple[str, ...]] = {
    "minilm": (),
    "tiny_llama-512x4": (*_TINY_LLAMA, "model.tiny_layers=4"),
    "tiny_llama-512x16": (*_TINY_LLAMA, "model.tiny_layers=16"),  # not by default
}
DEFAULT_MEMORY_MODELS = ("minilm", "tiny_llama-512x4")
QUANTIZATIONS = ("nf4", "none")


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _rss_parts_mib() -> dict[str, float]:
    """Resident memory split into anonymous (heap) and file-backed (mmap) MiB."""
    parts = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            parts[key.lower()] = int(value.split()[0]) / 1024  # kB -> MiB
    return parts


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _weights(model: Any) -> tuple[int, int]:
    """(all base weights, weights in quantisable linears), 4-bit ones unpacked.

    Quantisable: ``nn.Linear`` (bitsandbytes' layers subclass it) outside the task
    heads, ``lm_head`` and LoRA's own A/B layers.
    """
    import torch

    from fedlora.models import NOT_QUANTISED

    def elements(param: Any) -> int:
        state = getattr(param, "quant_state", None)  # Params4bit stores 2 per byte
        if state is None:
            return int(param.numel())
        return int(torch.Size(state.shape).numel())

    base = model.base_model
    total = sum(elements(p) for n, p in base.named_parameters() if "lora_" not in n)
    linear = sum(
        m.in_features * m.out_features
        for name, m in base.named_modules()
        if isinstance(m, torch.nn.Linear)
        and "lora_" not in name
        and not set(name.split(".")) & {*NOT_QUANTISED, "modules_to_save"}
    )
    return total, linear


def _compose(overrides: Sequence[str]) -> Any:
    """ExperimentConfig from the shipped Hydra config plus ``overrides``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from fedlora.config.flat import build_config
    from strategies.config import ExperimentConfig

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    # The launcher group is not part of the experiment (as in simulations.run).
    values = {str(k): v for k, v in container.items() if k not in ("hydra", "launcher")}
    return build_config(ExperimentConfig, values)


def memory_probe(overrides: Sequence[str], threads: int) -> dict[str, Any]:
    """Build one client's model and run two local rounds in this process.

    The baseline is taken after the libraries every client imports (torch,
    transformers, peft, the model class), its tokenizer and its partition are
    loaded, so ``model_*`` deltas are the base model alone; bitsandbytes is
    imported only for a quantised base (as in a client) and reported apart.
    """
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from fedlora.cache import model_bundle, partition_dataset
    from fedlora.client.round import train_round
    from fedlora.client.site import SiteConfig
    from fedlora.lora.state import adapter_state

    torch.set_num_threads(threads)
    cfg = _compose(overrides)
    site = SiteConfig(0, 8)
    arch = "llama" if cfg.model.name == "tiny_llama" else "bert"
    importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    partition_dataset(cfg, site.partition_id, site.num_partitions)  # + tokenizer
    rss_runtime = _rss_bytes()
    if cfg.model.quantization != "none":
        import bitsandbytes  # noqa: F401
    rss_base, peak_base = _rss_bytes(), _peak_rss_bytes()
    start = time.perf_counter()
    model = model_bundle(cfg).model
    load_seconds = time.perf_counter() - start
    rss_load, peak_load = _rss_bytes(), _peak_rss_bytes()
    parts_load = _rss_parts_mib()
    weights, linear = _weights(model)
    state = adapter_state(model)
    steps = cfg.federation.local_steps
    first = train_round(cfg, site, 1, state)  # includes optimizer/kernel warm-up
    second = train_round(cfg, site, 2, state)
    peak_end, rss_end, parts_end = _peak_rss_bytes(), _rss_bytes(), _rss_parts_mib()
    mib = 2**20
    return {
        "overrides": list(overrides),
        "quantization": cfg.model.quantization,
        "torch_threads": torch.get_num_threads(),
        "base_parameters": weights,
        "linear_share": linear / weights,
        "memory_footprint_mib": model.get_memory_footprint() / mib,
        "rss_runtime_mib": rss_runtime / mib,
        "bitsandbytes_import_mib": (rss_base - rss_runtime) / mib,
        "model_rss_mib": (rss_load - rss_base) / mib,
        "model_load_peak_mib": (peak_load - max(rss_base, peak_base)) / mib
        if peak_load > max(rss_base, peak_base)
        else 0.0,
        "rss_after_load_mib": rss_load / mib,
        "rss_after_load_parts_mib": parts_load,
        "peak_rss_after_load_mib": peak_load / mib,
        "rss_after_train_mib": rss_end / mib,
        "rss_after_train_parts_mib": parts_end,
        "peak_rss_mib": peak_end / mib,
        "train_peak_over_load_mib": (peak_end - rss_load) / mib,
        "load_seconds": load_seconds,
        "local_steps": steps,
        "seconds_per_step_round1": first.result.seconds / steps,
        "seconds_per_step": second.result.seconds / steps,
    }


def _probe_subprocess(overrides: Sequence[str], threads: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.client_memory",
        "--threads",
        str(threads),
        *[f"-o{o}" for o in overrides],
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"probe {overrides} failed:\n{res.stderr[-3000:]}")
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def _prepare_weights(overrides: Sequence[str]) -> None:
    """Build cached generated weights (tiny_llama) before any probe measures."""
    cfg = _compose(overrides)
    from fedlora.models import weights_location

    weights_location(cfg.model)


def memory_report(models: Mapping[str, Sequence[str]], threads: int) -> dict[str, Any]:
    """NF4 and float32 probes per model, with NF4/float32 ratios side by side."""
    report: dict[str, Any] = {}
    for label, overrides in models.items():
        _prepare_weights(overrides)
        probes = {
            q: _probe_subprocess([*overrides, f"model.quantization={q}"], threads)
            for q in QUANTIZATIONS
        }
        nf4, f32 = probes["nf4"], probes["none"]
        ratio_keys = (
            "memory_footprint_mib",
            "model_rss_mib",
            "rss_after_load_mib",
            "peak_rss_mib",
            "seconds_per_step",
        )
        report[label] = {
            "nf4": nf4,
            "float32": f32,
            "ratio_nf4_over_float32": {k: nf4[k] / f32[k] for k in ratio_keys},
        }
    return report


def main(argv: Sequence[str] | None = None) -> None:
    """Run one probe in this process and print it as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        help="Hydra override (repeatable)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1 = a Ray actor's)",
    )
    args = parser.parse_args(argv)
    print(json.dumps(memory_probe(args.override, args.threads)))


if __name__ == "__main__":
    main()
