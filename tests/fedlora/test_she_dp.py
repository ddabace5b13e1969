"""SHE-LoRA negotiation under DP: what a client sends depends on no raw example.

Drives the real ClientApp (``fedlora.client.app.app``) with the two query messages
the server sends before round 1 (``site``, then ``she-sensitivity``), exactly as
``HeteroRankLora.query`` builds them. One site, the same config and adapter, two
different local datasets of the same size: with ``privacy=dp`` every negotiation
reply is identical; without DP the column scores change with the data (the
control that lets the DP assertion fail).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedlora.cache import model_bundle
from fedlora.client.app import app
from fedlora.client.round import for_site
from fedlora.client.site import SiteConfig
from fedlora.config import ClientConfig
from fedlora.config.flat import build_config, flatten_config
from fedlora.lora.state import A_SUFFIX, adapter_state, matrix_names
from fedlora.protocol import QUERY
from strategies.config import ExperimentConfig

pytestmark = pytest.mark.usefixtures("flower_task_identity")

ROWS, BUDGET = 48, 4
KINDS = ("site", "she-sensitivity")


def _dataset(path: Path, words: tuple[str, str]) -> Path:
    """A local CSV of ``ROWS`` labelled sentences (same size, different text)."""
    lines = ["sentence,sentiment"] + [
        f"{words[i % 2]} review {i} with {' '.join([words[i % 2]] * (1 + i % 5))},"
        f"{'pos' if i % 2 else 'neg'}"
        for i in range(ROWS)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("she-dp")
    return (
        _dataset(root / "a.csv", ("dull", "great")),
        _dataset(root / "b.csv", ("the quick brown fox", "jumps over 7 lazy dogs")),
    )


def _run_config(privacy: str, data: Path) -> dict[str, Any]:
    overrides: dict[str, Any] = {
        "model.name": "tiny_llama",
        "model.tiny_hidden_size": 64,
        "data.source": "local",
        "data.path": str(data),
        "data.text_column": "sentence",
        "data.label_column": "sentiment",
        "data.num_classes": 2,
        "adapter.rank": 4,
        "strategy.name": "she_lora",
        "strategy.he_budgets": (BUDGET,),
        "federation.fraction_evaluate": 1.0,
        "privacy.mode": privacy,
    }
    if privacy == "dp":
        overrides["privacy.epsilon"] = 1.0
    return flatten_config(build_config(ExperimentConfig, overrides))


def _negotiation(run_config: dict[str, Any], data: Path) -> dict[str, Any]:
    """Every reply the site sends before round 1, as plain dicts."""
    context = Context(
        run_id=1,
        node_id=0,
        node_config={"partition-id": 0, "num-partitions": 1, "data-path": str(data)},
        state=RecordDict(),
        run_config=run_config,
    )
    out = {}
    for kind in KINDS:
        query = Message(
            RecordDict({"config": ConfigRecord({QUERY: kind})}),
            dst_node_id=0,
            message_type=MessageType.QUERY,
        )
        content = app(query, context).content
        out[kind] = {
            **{k: dict(v) for k, v in content.config_records.items()},
            **{k: dict(v) for k, v in content.metric_records.items()},
        }
        assert not content.array_records
    return out


def test_dp_negotiation_is_the_same_on_any_data(
    datasets: tuple[Path, Path], tmp_path: Path
) -> None:
    first, second = datasets
    run_config = _run_config("dp", first)  # one config; only the site's data differs
    dp_first = _negotiation(run_config, first)
    dp_second = _negotiation(run_config, second)
    assert dp_first == dp_second
    # no raw example is read at all: a site whose data file is missing answers alike
    assert _negotiation(run_config, tmp_path / "missing.csv") == dp_first

    # the scores are sum_rho |A[rho, j]| of the adapter the site holds
    cfg = for_site(ClientConfig.from_run_config(run_config), SiteConfig(0, 1))
    state = adapter_state(model_bundle(cfg).model)
    scores = dp_first["she-sensitivity"]["she-scores"]
    names = matrix_names(state)
    assert set(scores) == {f"{p}:{n}" for n in names for p in ("pos", "score")}
    for name in names:
        want = state[name + A_SUFFIX].double().abs().sum(dim=0)  # (d_in,)
        best = sorted(range(want.numel()), key=lambda j: (-float(want[j]), j))
        assert list(scores[f"pos:{name}"]) == best[:BUDGET]
        assert list(scores[f"score:{name}"]) == pytest.approx(
            [float(want[j]) for j in best[:BUDGET]], rel=1e-12
        )


def test_without_dp_the_scores_read_the_data_and_dp_changes_nothing_else(
    datasets: tuple[Path, Path],
) -> None:
    first, second = datasets
    dp = _negotiation(_run_config("dp", first), first)
    plain_first = _negotiation(_run_config("none", first), first)
    plain_second = _negotiation(_run_config("none", first), second)
    # control: the non-DP calibration is a function of the raw data
    scores = {
        name: run["she-sensitivity"]["she-scores"]
        for name, run in (("dp", dp), ("first", plain_first), ("second", plain_second))
    }
    assert scores["first"] != scores["second"]
    # DP changes the scores' values only: same site reply, same message layout
    assert dp["site"] == plain_first["site"]
    assert dp["she-sensitivity"].keys() == plain_first["she-sensitivity"].keys()
    assert scores["dp"].keys() == scores["first"].keys()
    for key, value in scores["dp"].items():
        assert len(value) == len(scores["first"][key]) == BUDGET
