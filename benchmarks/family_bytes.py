"""Bytes one client sends per round, for each member of the LoRA family.

For each model and adapter setting this wraps the model with peft exactly as a
client does (``fedlora.models.wrap_lora``), takes what a client's reply carries
in round 1 (``select(adapter_state, variant.factors_for_round(1))``, the function
``train_round`` uses: VeRA's shared projections never travel) and serialises it
the way the strategy counts bytes (``recorddict_to_proto(...).ByteSize()``), in
float32. The values do not change the size of a float32 record, so the adapter
is measured with zeros of its shapes, and the base model is built on the meta
device from its config: no weights are loaded, which lets a 7B shape be measured
on a laptop.

Models: the tiny Llama of the tests, SmolLM2-135M (``model=smollm2``, every linear
layer of the blocks) from the offline package's config, and Llama-2-7B's shape
(hidden 4096, 32 layers; q_proj and v_proj, as in the VeRA paper's instruction
tuning)::

    python -m benchmarks.family_bytes [--out FILE]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from benchmarks.output import write_result
from fedlora.config import AdapterConfig, ModelConfig
from fedlora.lora.state import PROJECTION, factor_of, select
from fedlora.lora.variants import VARIANTS
from fedlora.models import wrap_lora

SETTINGS: list[tuple[str, dict[str, Any]]] = [  # label -> AdapterConfig fields
    ("lora r=8", {"rank": 8}),
    ("lora r=8, adapter=ffa", {"rank": 8, "variant": "ffa"}),
    ("lora r=64", {"rank": 64}),  # the VeRA paper's LoRA baseline on Llama
    ("dora r=8", {"rank": 8, "use_dora": True}),
    ("vera r=8", {"rank": 8, "peft_type": "vera"}),
    ("vera r=256", {"rank": 256, "peft_type": "vera"}),
    ("vera r=256, adapter=ffa", {"rank": 256, "peft_type": "vera", "variant": "ffa"}),
]


def _llama_7b() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )


def make_7b(model_cfg: ModelConfig) -> bool:
    """Whether ``model_cfg`` is the 7B shape (targets fixed to q_proj, v_proj)."""
    return model_cfg.name.startswith("meta-llama/")


def _config_of(model_cfg: ModelConfig) -> Any:
    """The transformers config of a preset, without loading its weights."""
    from transformers import AutoConfig

    from fedlora.models import weights_location

    weights, _ = weights_location(model_cfg)
    return AutoConfig.from_pretrained(weights)


MODELS: dict[str, tuple[ModelConfig, Any]] = {
    "tiny_llama": (ModelConfig(name="tiny_llama", tiny_hidden_size=64), None),
    "smollm2": (ModelConfig(name="smollm2"), None),
    "llama-2-7b shape": (ModelConfig(name="meta-llama/Llama-2-7b-hf"), _llama_7b),
}


def sent_bytes(
    model_cfg: ModelConfig, hf_config: Any, fields: dict[str, Any]
) -> dict[str, Any]:
    """Serialised bytes and scalars of a round-1 reply for one setting."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM

    targets = ("q_proj", "v_proj") if make_7b(model_cfg) else ()
    adapter = AdapterConfig(**fields, target_modules=targets)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(hf_config)
    model = wrap_lora(base, model_cfg, adapter, task="causal_lm", seed=0)
    from peft import get_peft_model_state_dict

    shapes = {k: v.shape for k, v in get_peft_model_state_dict(model).items()}
    state = {k: torch.zeros(s) for k, s in shapes.items()}
    reply = select(state, VARIANTS.get(adapter.variant).factors_for_round(1))
    record = RecordDict({"arrays": ArrayRecord(reply)})
    shared = sum(s.numel() for k, s in shapes.items() if factor_of(k) == PROJECTION)
    return {
        "tensors_up": len(reply),
        "params_up": sum(v.numel() for v in reply.values()),
        "bytes_up": recorddict_to_proto(record).ByteSize(),
        "shared_projection_params": shared,
        "adapted_matrices": sum(isinstance(m, BaseTunerLayer) for m in model.modules()),
    }


def main(argv: list[str] | None = None) -> None:
    """CLI entry point (module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.family_bytes")
    parser.add_argument("--out", type=str, default=None, help="result file")
    args = parser.parse_args(argv)
    rows = []
    for name, (model_cfg, make) in MODELS.items():
        hf_config = make() if make else _config_of(model_cfg)
        for label, fields in SETTINGS:
            row = {"model": name, "setting": label, **fields}
            row.update(sent_bytes(model_cfg, hf_config, fields))
            print(row, flush=True)
            rows.append(row)
    write_result(
        "family_bytes",
        time.strftime("%Y%m%d-%H%M%S"),
        {"rows": rows},
        Path(args.out) if args.out else None,
    )


if __name__ == "__main__":
    main()
