"""LoftQ initialisation in federation: the factors are the best rank-r fit of the
NF4 error of the base as loaded, the base stays the standard NF4 one, two sites
build the same factors and fingerprint, and the export loads (end-to-end test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_configs import tiny_config

from fedlora.cache import model_bundle
from fedlora.config.flat import ConfigError
from fedlora.fingerprint import base_fingerprint
from fedlora.lora.loftq import BASE_KEY, loftq_split, quantised_layers
from fedlora.lora.state import A_SUFFIX, B_SUFFIX, adapter_state

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = {
    "data.num_examples": 120,
    "adapter.init": "loftq",
    "adapter.rank": 3,
    "adapter.alpha": 5.0,  # s = 5/3: the split divides by it (peft's assumes 1)
    "adapter.target_modules": ("q_proj", "up_proj"),  # 64->64, 64->128
}


def _cfg(**extra: object):  # type: ignore[no-untyped-def]
    return tiny_config("causal_lm", {**OVERRIDES, **extra})


def test_the_split_is_the_best_rank_r_fit_of_the_error() -> None:
    """``s B A`` is the Eckart-Young truncation of ``W - deq(Q)`` (numpy's SVD)."""
    import numpy as np

    g = torch.Generator().manual_seed(0)
    w, q = torch.randn(40, 24, generator=g), torch.randn(40, 24, generator=g)
    a, b = loftq_split(w, q, 3, 5 / 3)
    assert a.shape == (3, 24) and b.shape == (40, 3)
    u, sig, vt = np.linalg.svd((w - q).double().numpy(), full_matrices=False)
    best = (u[:, :3] * sig[:3]) @ vt[:3]
    got = (5 / 3) * (b.double() @ a.double()).numpy()
    np.testing.assert_allclose(got, best, rtol=0, atol=1e-5)


def test_loftq_starts_closer_to_the_full_weights_on_the_same_nf4_base() -> None:
    """Per adapted layer, ``deq(Q) + s B A`` is nearer ``W`` than ``deq(Q)``; the
    dequantised base equals the default-init NF4 base bit for bit."""
    loftq = model_bundle(_cfg()).model
    plain = model_bundle(_cfg(**{"adapter.init": "default"})).model
    full = model_bundle(
        _cfg(**{"adapter.init": "default", "model.quantization": "none"})
    ).model
    state = adapter_state(loftq)
    originals = dict(full.named_modules())
    plain_layers = quantised_layers(plain)
    layers = quantised_layers(loftq)
    assert len(layers) == 4
    for name, (deq, s) in layers.items():
        assert torch.equal(deq, plain_layers[name][0])
        w = originals[name].get_base_layer().weight.detach().double()
        fitted = deq.double() + s * (
            state[name + B_SUFFIX].double() @ state[name + A_SUFFIX].double()
        )
        before = (w - deq.double()).norm()
        assert (w - fitted).norm() < 0.99 * before, name


def _site(cache: Path, out: Path) -> str:
    """Build the LoftQ client model in a fresh process with its own cache."""
    code = (
        "import sys; from tiny_configs import tiny_config; "
        "from safetensors.torch import save_file; "
        "from fedlora.cache import model_bundle; "
        "from fedlora.fingerprint import base_fingerprint; "
        "from fedlora.lora.state import adapter_state; "
        f"m = model_bundle(tiny_config('causal_lm', {OVERRIDES!r})).model; "
        f"save_file(adapter_state(m), {str(out)!r}); print(base_fingerprint(m))"
    )
    env = {
        **os.environ,
        "FEDLORA_CACHE": str(cache),
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
    }
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_two_sites_build_the_same_factors_and_fingerprint(tmp_path: Path) -> None:
    first = _site(tmp_path / "a", tmp_path / "a.safetensors")
    second = _site(tmp_path / "b", tmp_path / "b.safetensors")
    assert first == second == base_fingerprint(model_bundle(_cfg()).model)
    a, b = (
        load_file(str(tmp_path / "a.safetensors")),
        load_file(str(tmp_path / "b.safetensors")),
    )
    assert set(a) == set(b) and len(a) == 8
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.abs().sum() > 0 for v in a.values())  # B too


def test_the_fingerprint_covers_the_quantised_weights() -> None:
    """Double quantisation changes the NF4 weights but not the base's config or
    its unquantised tensors: only LoftQ's digest tells the two bases apart."""
    single = {"model.double_quant": False}
    plain = [
        base_fingerprint(model_bundle(_cfg(**{"adapter.init": "default", **o})).model)
        for o in ({}, single)
    ]
    assert plain[0] == plain[1]  # the plain fingerprint cannot see NF4 weights
    loftq = [model_bundle(_cfg(**o)).model for o in ({}, single)]
    digests = [m.get_base_model().config.to_dict()[BASE_KEY] for m in loftq]
    assert digests[0] != digests[1]
    assert base_fingerprint(loftq[0]) != base_fingerprint(loftq[1])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.quantization": "none"}, "model.quantization=nf4"),
        ({"adapter.peft_type": "vera"}, "peft_type=lora"),
        ({"strategy.name": "flora"}, "strategy=fedavg"),
    ],
)
def test_loftq_refuses_what_it_cannot_do_and_names_what_works(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        _cfg(**overrides)
    assert "adapter.init=loftq" in str(err.value)
