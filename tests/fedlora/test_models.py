"""Base model loading, the 4-bit CPU gradient guard and adapter round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedlora.config import AdapterConfig, ModelConfig
from fedlora.lora.state import adapter_state, load_adapter_state
from fedlora.models import load_base_model, wrap_lora

pytestmark = pytest.mark.bnb

TINY = ModelConfig(name="tiny_llama", tiny_hidden_size=64, tiny_layers=2)
LORA = AdapterConfig(rank=4, alpha=8.0)


def _tiny(quantization: str = "nf4", seed: int = 0):  # type: ignore[no-untyped-def]
    cfg = ModelConfig(**{**TINY.__dict__, "quantization": quantization})
    base = load_base_model(cfg, task="causal_lm", num_labels=0, seed=seed)
    return wrap_lora(base, cfg, LORA, task="causal_lm", seed=seed)


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _randomise_b(model: torch.nn.Module) -> None:
    """Non-zero B so gradients reach every A (and flow through 4-bit layers)."""
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1


def _lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.train()
    model(**_batch()).loss.backward()
    return {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


def test_nf4_base_is_4bit_and_only_lora_trains() -> None:
    import bitsandbytes as bnb

    model = _tiny()
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert n4 == 2 * 7  # q,k,v,o,gate,up,down per layer
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_4bit_gradients_survive_a_no_grad_forward() -> None:
    """An eval forward must not repack 4-bit weights and corrupt later gradients."""
    import bitsandbytes as bnb

    fresh = _tiny()
    _randomise_b(fresh)
    reference = _lora_grads(fresh)

    model = _tiny()
    _randomise_b(model)
    model.eval()
    with torch.no_grad():
        model(**_batch())
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
    grads = _lora_grads(model)
    bad = [
        k
        for k in reference
        if not torch.allclose(grads[k], reference[k], rtol=1e-4, atol=1e-6)
    ]
    assert not bad, f"gradients changed after a no-grad forward: {bad[:4]}"


def test_guard_detects_the_bug_without_the_fix() -> None:
    """Negative control: with repacking allowed, weights get repacked (CPU bf16)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16  # type: ignore[attr-defined]

    if not has_avx512bf16():
        pytest.skip("this CPU never repacks 4-bit weights (no AVX512-BF16)")
    model = _tiny()
    _randomise_b(model)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True
    model.eval()
    with torch.no_grad():
        model(**_batch())
    packed = [
        m
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
        and getattr(m.weight.quant_state, "packing_format_for_cpu", False)
    ]
    assert packed, "bitsandbytes no longer repacks; the repacking fix may be obsolete"


def test_adapter_save_load_round_trip(tmp_path: Path) -> None:
    """save_pretrained -> PeftModel.from_pretrained on a fresh base: same logits."""
    from peft import PeftModel

    model = _tiny()
    _randomise_b(model)
    model.eval()
    with torch.no_grad():
        want = model(**_batch()).logits
    model.save_pretrained(tmp_path / "adapter")
    base = load_base_model(TINY, task="causal_lm", num_labels=0, seed=0)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    loaded.eval()
    with torch.no_grad():
        got = loaded(**_batch()).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_adapter_state_round_trip_and_rejections() -> None:
    model = _tiny()
    state = adapter_state(model)
    assert state and all(v.dtype == torch.float32 for v in state.values())
    changed = {k: v + 1.0 for k, v in state.items()}
    load_adapter_state(model, changed)
    assert all(torch.equal(adapter_state(model)[k], changed[k]) for k in state)
    key = next(iter(state))
    with pytest.raises(KeyError, match="not in the model"):
        load_adapter_state(model, {"nope.lora_A.weight": state[key]})
    with pytest.raises(ValueError, match="shape mismatch"):
        load_adapter_state(model, {key: torch.zeros(1, 1)})


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_other_quantisations_train(quantization: str) -> None:
    model = _tiny(quantization)
    _randomise_b(model)
    grads = _lora_grads(model)
    assert grads and all(torch.isfinite(g).all() for g in grads.values())


def test_same_seed_builds_the_same_initial_adapter() -> None:
    a, b = adapter_state(_tiny(seed=5)), adapter_state(_tiny(seed=5))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_num_layers_keeps_the_first_pretrained_layers() -> None:
    """``model.num_layers=1``: one layer, with the checkpoint's layer-0 weights."""
    full_cfg = ModelConfig(**{**TINY.__dict__, "quantization": "none"})
    cut_cfg = ModelConfig(**{**full_cfg.__dict__, "num_layers": 1})
    full = load_base_model(full_cfg, task="causal_lm", num_labels=0, seed=0)
    cut = load_base_model(cut_cfg, task="causal_lm", num_labels=0, seed=0)
    assert len(full.model.layers) == 2 and len(cut.model.layers) == 1
    want = full.model.layers[0].state_dict()
    got = cut.model.layers[0].state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize(("compute_dtype", "dtype"), [
    ("float32", torch.float32), ("bfloat16", torch.bfloat16)
])  # fmt: skip
def test_unquantised_base_is_stored_in_the_compute_dtype(
    compute_dtype: str, dtype: torch.dtype
) -> None:
    cfg = ModelConfig(
        **{**TINY.__dict__, "quantization": "none", "compute_dtype": compute_dtype}
    )
    base = load_base_model(cfg, task="causal_lm", num_labels=0, seed=0)
    assert {p.dtype for p in base.parameters()} == {dtype}
    assert not any(p.requires_grad for p in base.parameters())
    model = wrap_lora(base, cfg, LORA, task="causal_lm", seed=0)
    _randomise_b(model)
    grads = _lora_grads(model)
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
