"""SHE-LoRA's client reads the run's strategy keys through one typed view."""

from __future__ import annotations

from fedlora.client.she import SheRunSettings, budget_of
from fedlora.client.site import SiteConfig
from fedlora.config.flat import flatten_config
from strategies.config import StrategyConfig


def test_the_client_view_has_the_server_groups_defaults() -> None:
    server = StrategyConfig()
    client = SheRunSettings()
    assert (client.he_budgets, client.he_secret_context) == (
        server.he_budgets,
        server.he_secret_context,
    )


def test_budgets_come_from_node_config_first_then_the_runs_list() -> None:
    flat = {
        f"strategy.{k}": v
        for k, v in flatten_config(StrategyConfig(he_budgets=(2, 8, 5))).items()
    }
    assert SheRunSettings.from_run_config(flat).he_budgets == (2, 8, 5)
    site = SiteConfig.from_node_config({"partition-id": 4, "num-partitions": 6})
    assert budget_of(site, flat) == 8  # entry 4 mod 3
    own = SiteConfig.from_node_config(
        {"partition-id": 4, "num-partitions": 6, "he-budget": 11}
    )
    assert budget_of(own, flat) == 11
