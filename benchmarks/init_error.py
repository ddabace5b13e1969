"""How far each LoRA initialisation starts from the full-precision model.

QLoRA starts at ``deq(NF4(W))``; PiSSA at ``deq(NF4(W_res)) + s B A`` (the
principal part kept in float32, only the residual quantised); LoftQ at
``deq(NF4(W)) + s B A`` with ``s B A`` fitted to the quantisation error. For each
model this builds the client model as a site does (``fedlora.cache.model_bundle``)
and reports, against the float32 model:

- ``weight_error``: ``||W_start - W|| / ||W||`` per adapted matrix (median, max);
- ``output_error``: ``||layer(x) - layer_32(x)|| / ||layer_32(x)||`` per adapted
  layer on the inputs that layer sees in the float32 model for one held-out batch
  of 8 (median, max): the error where the activations are real;
- ``eval_loss`` at round 0 on the held-out split (the float32 model's beside it);
- ``svd_seconds``: one float64 SVD per distinct matrix shape, as the
  initialisation runs it once per site (PiSSA's residual base and LoftQ's factors
  are cached afterwards).

Models: the tiny Llama (random weights) and SmolLM2-135M (pretrained; every
linear layer of the blocks), r = 8::

    python -m benchmarks.init_error [--models tiny_llama smollm2] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.output import write_result
from fedlora.cache import collator, heldout_dataset, model_bundle
from fedlora.config.flat import build_config
from fedlora.lora.pissa import pissa_split
from fedlora.lora.state import A_SUFFIX, B_SUFFIX, adapter_state
from fedlora.train import evaluate
from strategies.config import ExperimentConfig

MODELS: dict[str, dict[str, Any]] = {
    "tiny_llama": {
        "model.name": "tiny_llama",
        "model.tiny_hidden_size": 64,
        "adapter.target_modules": ("q_proj", "v_proj", "up_proj", "down_proj"),
    },
    "smollm2": {"model.name": "smollm2"},
}


def config(model: str, init: str, quantization: str) -> ExperimentConfig:
    """The model's causal-LM job with one initialisation."""
    return build_config(
        ExperimentConfig,
        {
            **MODELS[model],
            "data.source": "synthetic_instruct",
            "data.task": "causal_lm",
            "data.num_examples": 400,
            "adapter.rank": 8,
            "adapter.init": init,
            "model.quantization": quantization,
        },
    )


def start_weights(model: Any) -> dict[str, torch.Tensor]:
    """Adapted module name -> the effective weight at the start, float64."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_module_weight

    state = adapter_state(model)
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer):
            base = dequantize_module_weight(layer.get_base_layer()).double()
            s = float(layer.scaling["default"])
            b, a = state[name + B_SUFFIX].double(), state[name + A_SUFFIX].double()
            out[name] = base + s * (b @ a)
    return out


def layer_inputs(cfg: ExperimentConfig, model: Any) -> dict[str, torch.Tensor]:
    """Adapted module name -> its input in ``model`` on one held-out batch of 8."""
    from peft.tuners.lora import LoraLayer

    data = heldout_dataset(cfg)
    batch = collator(cfg)([data[i] for i in range(min(8, len(data)))])
    seen: dict[str, torch.Tensor] = {}
    modules: dict[str, torch.nn.Module] = dict(model.named_modules())
    hooks = [
        layer.register_forward_pre_hook(
            lambda _m, args, name=name: seen.__setitem__(name, args[0].detach())
        )
        for name, layer in modules.items()
        if isinstance(layer, LoraLayer)
    ]
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def output_errors(
    model: Any, reference: Any, inputs: dict[str, torch.Tensor]
) -> list[float]:
    """Relative output error of each adapted layer of ``model`` on ``inputs``."""
    mine, theirs = dict(model.named_modules()), dict(reference.named_modules())
    out = []
    with torch.no_grad():
        for name, x in inputs.items():
            want = theirs[name](x)
            out.append(float((mine[name](x) - want).norm() / want.norm()))
    return out


def eval_loss(cfg: ExperimentConfig, model: Any) -> float:
    """Held-out loss of ``model`` (its initial adapter)."""
    result = evaluate(
        model,
        heldout_dataset(cfg),
        collator(cfg),
        task="causal_lm",
        batch_size=cfg.train.eval_batch_size,
        device=torch.device("cpu"),
    )
    return float(result.loss)


def measure(model_name: str) -> dict[str, Any]:
    """Every initialisation of one model against its float32 version."""
    full_cfg = config(model_name, "default", "none")
    full = model_bundle(full_cfg).model
    reference = start_weights(full)
    inputs = layer_inputs(full_cfg, full)
    rows: dict[str, Any] = {"float32": {"eval_loss": eval_loss(full_cfg, full)}}
    for init in ("default", "pissa", "loftq"):
        cfg = config(model_name, init, "nf4")
        started = time.perf_counter()
        model = model_bundle(cfg).model
        build = time.perf_counter() - started
        errors = [
            float((w - reference[n]).norm() / reference[n].norm())
            for n, w in start_weights(model).items()
        ]
        outputs = output_errors(model, full, inputs)
        rows[init] = {
            "weight_error_median": statistics.median(errors),
            "weight_error_max": max(errors),
            "output_error_median": statistics.median(outputs),
            "output_error_max": max(outputs),
            "eval_loss": eval_loss(cfg, model),
            "build_seconds": build,
        }
        print(model_name, init, rows[init], flush=True)
        del model
    shapes = sorted({tuple(w.shape) for w in reference.values()})
    svd = {}
    for shape in shapes:
        weight = torch.randn(shape)
        started = time.perf_counter()
        pissa_split(weight, 8, 2.0)
        svd[f"{shape[0]}x{shape[1]}"] = time.perf_counter() - started
    return {"matrices": len(reference), "inits": rows, "svd_seconds": svd}


def main(argv: list[str] | None = None) -> None:
    """CLI entry point (module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.init_error")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--out", type=str, default=None, help="result file")
    args = parser.parse_args(argv)
    out = {
        "rank": 8,
        "torch_threads": torch.get_num_threads(),
        "models": {m: measure(m) for m in args.models},
    }
    write_result(
        "init_error",
        time.strftime("%Y%m%d-%H%M%S"),
        out,
        Path(args.out) if args.out else None,
    )


if __name__ == "__main__":
    main()
