"""Every shipped Hydra config composes and validates; pyproject run-config = schema.

No model or dataset is loaded here: validation runs in the dataclasses'
``__post_init__``. All failures are collected and reported together.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fedlora.config.flat import ConfigError, build_config, flatten_config
from simulations.experiment import (
    CONF_DIR,
    default_run_config,
    from_hydra,
    pyproject_config,
)
from strategies.config import ExperimentConfig

GROUP_CLASSES = {
    "model": "model",
    "data": "data",
    "adapter": "adapter",
    "train": "train",
    "federation": "federation",
    "privacy": "privacy",
    "strategy": "strategy",
}
# Options whose YAML leaves a mandatory value (???) for the user to fill in.
REQUIRED = {
    ("model", "hf"): ["model.name=tiny_llama"],
    ("data", "local"): ["data.path={csv}"],
    ("data", "hf"): ["data.path=some/dataset"],
}
# Options that need a compatible choice in another group to validate.
PAIRED = {
    ("data", "synthetic_instruct"): ["model=tiny_llama"],
    ("model", "smollm2"): ["data=synthetic_instruct"],
    ("strategy", "she_lora"): ["federation.fraction_evaluate=1.0"],
}
EXPECTED_FILES = 32


def _compose(overrides: list[str]) -> dict[str, Any]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    return container


BASE_DIR = "base"  # conf/base/<group>.yaml: every key of a group, with defaults


def _defaults_of(node: Any) -> list[str]:
    return [str(d) for d in node.pop("defaults", []) if str(d) != "_self_"]


def _group_yaml(group: str, option: str) -> Any:
    """The option's own keys merged over the configs its defaults list names
    (another option of the group, or ``/base/<group>@_here_``)."""
    node = OmegaConf.load(CONF_DIR / group / f"{option}.yaml")
    merged = OmegaConf.create()
    for base in _defaults_of(node):
        if base.startswith("/"):
            path = base.split("@")[0].lstrip("/")
            parent = OmegaConf.load(CONF_DIR / f"{path}.yaml")
        else:
            parent = _group_yaml(group, base)
        merged = OmegaConf.merge(merged, parent)
    return OmegaConf.merge(merged, node)


def _options() -> list[tuple[str, str]]:
    return sorted(
        (p.parent.name, p.stem)
        for p in CONF_DIR.rglob("*.yaml")
        if p.parent != CONF_DIR and p.parent.name != BASE_DIR
    )


def test_number_of_shipped_configs() -> None:
    """A new conf/ file must be seen by the tests below (update the count)."""
    assert len(list(CONF_DIR.rglob("*.yaml"))) == EXPECTED_FILES


def test_every_option_composes_and_validates(tmp_path: Path) -> None:
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\na b,0\nc d,1\n")
    failures = []
    for group, option in _options():
        extra = [o.format(csv=csv) for o in REQUIRED.get((group, option), [])]
        overrides = [f"{group}={option}", *PAIRED.get((group, option), []), *extra]
        try:
            exp, _ = from_hydra(_compose(overrides))
            assert isinstance(exp, ExperimentConfig)
        except Exception as err:  # noqa: BLE001 - collect every failure
            failures.append(f"{group}/{option}.yaml: {type(err).__name__}: {err}")
    assert not failures, "\n".join(failures)


def test_group_yaml_keys_equal_dataclass_fields() -> None:
    """Every dataclass field is overridable from the CLI, and nothing else exists."""
    failures = []
    for group, option in _options():
        node = _group_yaml(group, option)
        cls = type(getattr(ExperimentConfig(), GROUP_CLASSES[group]))
        want = {f.name for f in dataclasses.fields(cls)}
        got = set(node.keys())
        if got != want:
            failures.append(
                f"{group}/{option}: missing {want - got}, extra {got - want}"
            )
    assert not failures, "\n".join(failures)


# The key that names the option itself (set by every option, even to the default).
IDENTITY = {
    "adapter": "variant",
    "strategy": "name",
    "privacy": "mode",
    "data": "source",
    "model": "name",
}


def test_an_option_lists_only_what_it_changes_from_its_base() -> None:
    """With a base file, an option repeats no base value (no "unused by" lines)."""
    failures = []
    for group, option in _options():
        base_file = CONF_DIR / BASE_DIR / f"{group}.yaml"
        if not base_file.exists():
            continue
        base = OmegaConf.load(base_file)
        node = OmegaConf.load(CONF_DIR / group / f"{option}.yaml")
        parents = _defaults_of(node)  # the base file, or an option built on it
        if f"/{BASE_DIR}/{group}@_here_" not in parents and not any(
            not parent.startswith("/") for parent in parents
        ):
            failures.append(f"{group}/{option}: does not start from its base file")
        own = OmegaConf.to_container(node)  # "???" stays a string here
        defaults = OmegaConf.to_container(base)
        assert isinstance(own, dict) and isinstance(defaults, dict)
        same = [
            k
            for k, v in own.items()
            if k != IDENTITY.get(group) and k in defaults and v == defaults[k]
        ]
        if same:
            failures.append(f"{group}/{option}: repeats base values of {same}")
    assert not failures, "\n".join(failures)


def test_pyproject_run_config_equals_schema_and_defaults() -> None:
    """[tool.flwr.app.config] = flat ExperimentConfig() = composed Hydra defaults."""
    declared = pyproject_config()
    schema = default_run_config()
    assert set(declared) == set(schema), set(declared) ^ set(schema)
    differ = {k: (declared[k], schema[k]) for k in schema if declared[k] != schema[k]}
    assert not differ, differ
    # the keys declared "auto" resolve when the config is built, from the model
    built = build_config(ExperimentConfig, declared)
    assert flatten_config(built) == flatten_config(ExperimentConfig())
    assert built.data.prompt_format == "alpaca"  # minilm has no chat template
    smol = build_config(ExperimentConfig, {**declared, "model.name": "smollm2",
                                           "data.source": "synthetic_instruct",
                                           "data.task": "causal_lm"})  # fmt: skip
    assert smol.data.prompt_format == "chat"
    hydra_default, _ = from_hydra(_compose([]))
    assert flatten_config(hydra_default) == flatten_config(ExperimentConfig())


def test_dp_study_sweep_is_the_grid_and_every_job_validates() -> None:
    """conf/dp_study.yaml: 4 adapters x 2 weightings x 3 seeds at epsilon 1, and the
    non-DP baseline override; every job composes with the sized settings."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="dp_study", return_hydra_config=True)
    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    assert params == {
        "adapter": ["lora", "ffa", "la_lora", "rolora"],
        "strategy.weighting": ["uniform", "num_examples"],
        "seed": ["0", "1", "2"],
    }
    jobs = [
        [f"adapter={a}", f"strategy.weighting={w}"]
        for a in params["adapter"]
        for w in params["strategy.weighting"]
    ]
    jobs.append(["adapter=lora", "privacy=none"])
    for overrides in jobs:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            job = compose(config_name="dp_study", overrides=overrides)
        container = OmegaConf.to_container(job, resolve=True)
        assert isinstance(container, dict)
        exp, _ = from_hydra(container)
        private = "privacy=none" not in overrides
        assert exp.privacy.mode == ("dp" if private else "none")
        assert exp.privacy.epsilon == (1.0 if private else 0.0)
        assert (exp.train.batch_size, exp.adapter.rank) == (256, 4)
        assert (exp.federation.clients, exp.data.num_examples) == (2, 24000)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["model.quantization=nf5"], "model.quantization='nf5'"),
        (["adapter.rank=-1"], "adapter.rank=-1"),
        (["federation.clients=1"], "min_clients=2 exceeds"),
        (["data=local", "data.path=/no/such/file.csv"], "no such file"),
        (["+adapter.rnak=4"], "adapter.rnak"),
        (["federation.client_ranks=[4,8]"], "which strategy=fedavg cannot merge"),
        (
            ["strategy=flexlora", "federation.client_ranks=[4,16]"],
            "above adapter.rank=8, the global",
        ),
        (["strategy=she_lora"], "set federation.fraction_evaluate"),
        (["strategy=hetlora", "adapter=ffa"], "Use adapter=lora"),
        (["launcher.ray_address=head-node"], "launcher.ray_address='head-node'"),
        (["launcher.ray_address=ray://h:10001"], "host:port of the cluster's head"),
    ],
)
def test_bad_values_fail_before_anything_loads(
    overrides: list[str], needle: str
) -> None:
    with pytest.raises(
        ConfigError, match=needle.replace(".", r"\.").replace("+", r"\+")
    ):
        from_hydra(_compose(overrides))


@pytest.mark.parametrize("address", ["", "auto", "10.0.0.5:6379", "head.lan:6380"])
def test_ray_addresses_that_are_accepted(address: str) -> None:
    _, launch = from_hydra(_compose([f"launcher.ray_address='{address}'"]))
    assert launch.ray_address == address


def test_unknown_group_option_lists_the_available_ones() -> None:
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="Available options") as info:
        _compose(["strategy=fedprox"])
    assert "fedavg" in str(info.value)


def test_a_run_directory_inside_the_app_must_be_git_ignored(tmp_path: Path) -> None:
    from simulations.experiment import PROJECT_ROOT, check_outside_app

    check_outside_app(tmp_path / "run")  # outside the project: fine
    check_outside_app(PROJECT_ROOT / "outputs" / "x")  # ignored: fine
    with pytest.raises(ConfigError, match="Flower would package it"):
        check_outside_app(PROJECT_ROOT / "runs" / "x")


def test_help_lists_every_choosable_group_and_option_defaults_first() -> None:
    """`--help` names the groups by hand (to leave out base): it must match conf/."""
    import yaml

    config = yaml.safe_load((CONF_DIR / "config.yaml").read_text())
    lines = config["hydra"]["help"]["template"].splitlines()
    start = lines.index("== Configuration groups ==") + 3  # header, sentence, blank
    listed = {}
    for line in lines[start:]:
        if not line.strip():
            break
        group, options = line.split(":", 1)
        listed[group] = [o.strip() for o in options.split(",")]
    defaults = {
        k: v for d in config["defaults"] if isinstance(d, dict) for k, v in d.items()
    }
    on_disk = {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in CONF_DIR.iterdir()
        if d.is_dir() and d.name != "base"
    }
    assert set(listed) == set(on_disk)
    for group, options in listed.items():
        assert options[0] == defaults[group], group
        assert sorted(options) == on_disk[group], group
        assert options[1:] == sorted(options[1:]), group


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["seed=3"], "sweep/seed=3"),
        (["seed=3", "adapter.rank=4"], "sweep/adapter.rank=4/seed=3"),
    ],
)
def test_a_sweep_job_folder_stays_inside_the_sweep_dir(
    overrides: list[str], expected: str
) -> None:
    """A job whose only override is the seed (excluded from the folder name) got
    ``/seed=N`` as its folder, which Hydra put at the file system's root."""
    import os

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.job.override_dirname == ",".join(overrides[1:])
    folder = os.path.normpath(os.path.join("sweep", cfg.hydra.sweep.subdir))
    assert folder == expected
