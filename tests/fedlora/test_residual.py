"""FLoRA's residual beside the base: same function as merging it into the weights,
and the PEFT directory written for it reloads to the same model."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_configs import tiny_config

from fedlora.cache import model_bundle
from fedlora.lora.residual import set_residual, write_residual_adapter
from fedlora.lora.state import adapter_state

CFG = tiny_config("causal_lm", {"model.quantization": "none"})


def _residual(
    state: dict[str, torch.Tensor],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    out = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            name = key[: -len(".lora_A.weight")]
            m = state[name + ".lora_B.weight"].shape[0]
            out[name] = (
                0.1 * torch.randn(m, 6, generator=g),
                0.1 * torch.randn(6, a.shape[1], generator=g),
            )
    return out


def test_residual_equals_merging_the_delta_into_the_base_weight(tmp_path: Path) -> None:
    from peft import PeftModel

    from fedlora.models import load_base_model

    bundle = model_bundle(CFG)
    model = bundle.model
    residual = _residual(adapter_state(model))
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        set_residual(model, residual)
        with_residual = model(input_ids=ids).logits
        set_residual(model, {})
        assert torch.equal(model(input_ids=ids).logits, plain)  # removed cleanly
        modules = dict(model.named_modules())
        saved = {}
        for name, (b, a) in residual.items():
            weight = modules[name].base_layer.weight
            saved[name] = weight.clone()
            weight += b @ a
        merged = model(input_ids=ids).logits
        for name, w in saved.items():
            modules[name].base_layer.weight.copy_(w)
    assert not torch.allclose(with_residual, plain, atol=1e-3)
    torch.testing.assert_close(with_residual, merged, rtol=1e-4, atol=1e-5)

    # the run directory's adapter: a plain PEFT LoRA that *is* the residual
    path = tmp_path / "adapter"
    model.save_pretrained(str(path))
    assert write_residual_adapter(path, residual) == 6
    base = load_base_model(CFG.model, task="causal_lm", num_labels=0, seed=CFG.seed)
    reloaded = PeftModel.from_pretrained(base, str(path))
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids).logits, merged, rtol=1e-4, atol=1e-5
        )
