"""PiSSA / FeDeRA initialisation in federation: the split equals peft's, every site
builds the same residual base and factors, the residual is fingerprinted, and the
exported adapter applies to the original base."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_configs import tiny_config
from torch import nn

from fedlora.cache import model_bundle
from fedlora.config.flat import ConfigError
from fedlora.fingerprint import base_fingerprint
from fedlora.lora.pissa import (
    FACTORS_FILE,
    RESIDUAL_KEY,
    pissa_base,
    pissa_split,
    write_pissa_as_lora,
)
from fedlora.lora.state import A_SUFFIX, B_SUFFIX, adapter_state

ROOT = Path(__file__).resolve().parents[2]


def _cfg(**extra: object):  # type: ignore[no-untyped-def]
    return tiny_config(
        "causal_lm",
        {
            "data.num_examples": 120,
            "adapter.init": "pissa",
            "adapter.rank": 3,
            "adapter.target_modules": ("q_proj", "up_proj"),  # 64->64, 64->128
            **extra,
        },
    )


class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Linear(24, 40)  # d_out > d_in
        self.tall = nn.Linear(40, 24)  # d_out < d_in


@pytest.mark.parametrize("rslora", [False, True])
def test_the_split_is_peft_pissa_init_in_float64(rslora: bool) -> None:
    """A, B and the residual equal peft's own PiSSA init (float32 SVD) up to the
    sign of each singular pair, at an odd rank, on both matrix shapes."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = _Two()
    original = {n: m.weight.detach().clone() for n, m in model.named_children()}
    config = LoraConfig(
        r=3,
        lora_alpha=5,
        target_modules=["wide", "tall"],
        init_lora_weights="pissa",
        use_rslora=rslora,
    )
    peft_model = get_peft_model(model, config)
    for name, w in original.items():
        layer = peft_model.base_model.model.get_submodule(name)
        s = float(layer.scaling["default"])
        a, b, res = pissa_split(w, 3, s)
        want_a = layer.lora_A["default"].weight.detach()
        want_b = layer.lora_B["default"].weight.detach()
        # each pair's sign is fixed: the largest |entry| of B's column positive
        assert (b.gather(0, b.abs().argmax(dim=0, keepdim=True)) > 0).all()
        sign = torch.sign((a * want_a).sum(dim=1))  # peft leaves LAPACK's sign
        torch.testing.assert_close(a * sign[:, None], want_a, rtol=0, atol=2e-5)
        torch.testing.assert_close(b * sign[None, :], want_b, rtol=0, atol=2e-5)
        base = layer.get_base_layer().weight.detach()
        torch.testing.assert_close(res, base, rtol=0, atol=2e-6)
        exact = res.double() + s * (b.double() @ a.double())
        torch.testing.assert_close(exact, w.double(), rtol=0, atol=1e-6)


def _build(cache: Path, child: bool) -> Path:
    cfg = _cfg()
    if not child:
        old = os.environ["FEDLORA_CACHE"]
        os.environ["FEDLORA_CACHE"] = str(cache)
        try:
            return Path(
                pissa_base(
                    cfg.model, cfg.adapter, task="causal_lm", num_labels=0, seed=0
                )
            )
        finally:
            os.environ["FEDLORA_CACHE"] = old
    code = (
        "import sys; from tiny_configs import tiny_config; "
        "from fedlora.lora.pissa import pissa_base; "
        "c = tiny_config('causal_lm', {'data.num_examples': 120, "
        "'adapter.init': 'pissa', 'adapter.rank': 3, "
        "'adapter.target_modules': ('q_proj', 'up_proj')}); "
        "print(pissa_base(c.model, c.adapter, task='causal_lm', num_labels=0, seed=0))"
    )
    env = {
        **os.environ,
        "FEDLORA_CACHE": str(cache),
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return Path(out.stdout.strip().splitlines()[-1])


def test_two_sites_build_the_same_residual_base_and_factors_bit_for_bit(
    tmp_path: Path,
) -> None:
    """Two separate builds (here and in a child process, own caches, the tiny
    Llama generated in each) write identical factors and residual weights."""
    here = _build(tmp_path / "site-a", child=False)
    there = _build(tmp_path / "site-b", child=True)
    assert here != there
    for name in (FACTORS_FILE, "model.safetensors"):
        a, b = load_file(str(here / name)), load_file(str(there / name))
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    factors = load_file(str(here / FACTORS_FILE))
    assert len(factors) == 8 and all(v.abs().sum() > 0 for v in factors.values())
    assert (here / "config.json").read_text() == (there / "config.json").read_text()


def test_the_fingerprint_covers_the_residual() -> None:
    """Same rank: the same fingerprint; another rank or no PiSSA: another one."""
    fingerprints = {
        label: base_fingerprint(model_bundle(cfg).model)
        for label, cfg in {
            "pissa r3": _cfg(),
            "pissa r2": _cfg(**{"adapter.rank": 2}),
            "default": _cfg(**{"adapter.init": "default"}),
        }.items()
    }
    assert len(set(fingerprints.values())) == 3, fingerprints
    assert model_bundle(_cfg()).model.config.to_dict()[RESIDUAL_KEY]


def test_the_pissa_model_starts_where_the_full_precision_base_is() -> None:
    """Without quantisation W_res + s B A = W: the outputs are those of the base."""
    fp32 = {"model.quantization": "none"}
    pissa = model_bundle(_cfg(**fp32)).model
    plain = model_bundle(_cfg(**{**fp32, "adapter.init": "default"})).model
    state = adapter_state(pissa)
    assert all(v.abs().sum() > 0 for k, v in state.items() if k.endswith(B_SUFFIX))
    x = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(
            pissa(input_ids=x).logits, plain(input_ids=x).logits, rtol=0, atol=1e-5
        )


def test_the_exported_lora_applies_to_the_original_base(tmp_path: Path) -> None:
    """``[B | -B0] [A; A0]`` at rank 2r with the same scale: original W plus it
    equals the residual plus the trained B A (float64)."""
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    name = "base_model.model.layer"
    w = torch.randn(6, 5, generator=g).double()
    a0, b0 = torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g)
    a1, b1 = torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g)
    s = 3.0 / 2  # lora_alpha / r
    res = w - s * b0.double() @ a0.double()
    save_file(
        {name + A_SUFFIX: a1, name + B_SUFFIX: b1},
        str(tmp_path / "adapter_model.safetensors"),
    )
    residual_dir = "/cache/pissa-0123"
    (tmp_path / "adapter_config.json").write_text(
        json.dumps(
            {
                "r": 2,
                "lora_alpha": 3.0,
                "init_lora_weights": "pissa",
                "base_model_name_or_path": residual_dir,
            }
        )
    )
    (tmp_path / "README.md").write_text(f"---\nbase_model: {residual_dir}\n---\n")
    initial = {name + A_SUFFIX: a0, name + B_SUFFIX: b0}
    assert write_pissa_as_lora(tmp_path, initial, 2.0, "org/original") == 4
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config == {
        "r": 4,
        "lora_alpha": 6.0,
        "init_lora_weights": True,
        "base_model_name_or_path": "org/original",  # not the residual base
    }
    assert "base_model: org/original" in (tmp_path / "README.md").read_text()
    got = load_file(str(tmp_path / "adapter_model.safetensors"))
    s2 = config["lora_alpha"] / config["r"]
    exported = w + s2 * got[name + B_SUFFIX].double() @ got[name + A_SUFFIX].double()
    torch.testing.assert_close(exported, res + s * b1.double() @ a1.double())


@pytest.mark.parametrize("init", ["pissa", "loftq"])
def test_a_classifier_with_a_trained_head_starts_from_the_svd_factors(
    init: str,
) -> None:
    """The head (peft modules_to_save) is in the adapter but not in the factors:
    loading the factors alone made peft fail (KeyError on the classifier)."""
    cfg = tiny_config(
        "classification",
        {"adapter.init": init, "adapter.rank": 3, "adapter.train_head": True},
    )
    state = adapter_state(model_bundle(cfg).model)
    assert any("classifier" in k or "score" in k for k in state)
    b = [v for k, v in state.items() if k.endswith(B_SUFFIX)]
    assert b and all(v.abs().sum() > 0 for v in b)  # not LoRA's zero B


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"adapter.peft_type": "vera"}, "peft_type=lora"),
        ({"adapter.use_dora": True}, "use_dora=false"),
        ({"strategy.name": "hetlora"}, "strategy=fedavg"),
        ({"adapter.init": "olora"}, "allowed"),
    ],
)
def test_pissa_refuses_what_it_cannot_do_and_names_what_works(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        _cfg(**overrides)
    assert "adapter.init" in str(err.value)
