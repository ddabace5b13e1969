"""Flat run-config <-> dataclasses, and validation messages."""

from __future__ import annotations

import pytest

from fedlora.config import AdapterConfig, ClientConfig, FederationConfig, ModelConfig
from fedlora.config.flat import ConfigError, build_config, flatten_config


def test_flatten_and_build_round_trip() -> None:
    cfg = ClientConfig(
        seed=3,
        adapter=AdapterConfig(rank=4, target_modules=("query", "key")),
        federation=FederationConfig(clients=3, rounds=2),
    )
    flat = flatten_config(cfg)
    assert flat["adapter.target_modules"] == "query,key"
    assert flat["federation.clients"] == 3
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert build_config(ClientConfig, flat) == cfg


def test_nested_dicts_from_hydra_are_accepted() -> None:
    cfg = build_config(
        ClientConfig, {"seed": 1, "adapter": {"rank": 2, "target_modules": ["q"]}}
    )
    assert cfg.adapter.rank == 2 and cfg.adapter.target_modules == ("q",)


def test_unknown_key_names_the_key_and_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match=r"adapter\.rnak.*allowed: .*adapter\.rank"):
        build_config(ClientConfig, {"adapter.rnak": 4})


@pytest.mark.parametrize(
    ("values", "pattern"),
    [
        (
            {"model.quantization": "nf5"},
            r"model\.quantization='nf5'.*\['int8', 'nf4', 'none'\]",
        ),
        ({"adapter.rank": 0}, r"adapter\.rank=0 is out of range"),
        ({"adapter.rank": "eight"}, r"adapter\.rank='eight': expected an integer"),
        ({"federation.fraction_train": 1.5}, r"federation\.fraction_train=1\.5"),
        (
            {"federation.clients": 2, "federation.min_clients": 3},
            r"min_clients=3 exceeds",
        ),
        ({"data.source": "imagenet"}, r"data\.source='imagenet'.*synthetic"),
        ({"adapter.variant": "dora"}, r"adapter\.variant='dora'.*lora"),
        ({"data.source": "local"}, r"data\.path is empty"),
        (
            {"privacy.mode": "dp", "privacy.epsilon": -1.0},
            r"privacy\.epsilon=-1\.0 must be > 0",
        ),
        (
            {"privacy.mode": "dp"},
            r"needs privacy\.epsilon > 0 .* or privacy\.noise_multiplier",
        ),
        (
            {"privacy.mode": "dp", "privacy.epsilon": 1.0, "privacy.delta": 1.0},
            r"privacy\.delta=1\.0 is out of range",
        ),
        (
            {
                "privacy.mode": "dp",
                "privacy.epsilon": 1.0,
                "privacy.noise_multiplier": 0.8,
            },
            r"both given; give one",
        ),
        (
            {
                "privacy.mode": "dp",
                "privacy.epsilon": 1.0,
                "model.gradient_checkpointing": True,
            },
            r"gradient_checkpointing=true: Opacus",
        ),
        (
            {"privacy.mode": "dp", "privacy.epsilon": 1.0, "train.grad_accum": 2},
            r"train\.grad_accum=2",
        ),
        (
            {"privacy.mode": "dp", "privacy.epsilon": 1.0, "privacy.accountant": "gdp"},
            r"privacy\.accountant='gdp'",
        ),
    ],
)
def test_bad_values_fail_with_a_clear_message(
    values: dict[str, object], pattern: str
) -> None:
    with pytest.raises(ConfigError, match=pattern):
        build_config(ClientConfig, values)


def test_client_ignores_other_groups_of_the_run_config() -> None:
    flat = flatten_config(ClientConfig())
    flat["strategy.name"] = "fedavg"
    flat["output_dir"] = "/tmp/x"
    assert ClientConfig.from_run_config(flat) == ClientConfig()


def test_preset_task_mismatch_is_rejected() -> None:
    with pytest.raises(ConfigError, match="minilm.*causal_lm"):
        build_config(
            ClientConfig,
            {
                "model.name": "minilm",
                "data.source": "synthetic_instruct",
                "data.task": "causal_lm",
            },
        )


def test_model_config_defaults_are_qlora() -> None:
    cfg = ModelConfig()
    assert (cfg.quantization, cfg.double_quant, cfg.compute_dtype) == (
        "nf4",
        True,
        "float32",
    )
