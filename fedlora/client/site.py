"""Per-site settings from Flower's node-config (nothing site-specific is hard-coded).

In simulation Flower sets ``partition-id`` and ``num-partitions`` for each virtual
node. A real SuperNode passes its own keys with ``--node-config "k=v ..."``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedlora.config.flat import ConfigError


@dataclass(frozen=True)
class SiteConfig:
    """What one client (site) knows about itself.

    Parameters
    ----------
    partition_id : int (default: 0)
        Which partition of the shared dataset this site trains on (simulation).
    num_partitions : int (default: 1)
        Number of partitions the dataset is split into.
    data_path : str (default: "")
        The site's own data file; when set it is used whole, no partitioning.
    device : str (default: "")
        Overrides ``model.device`` at this site (``cpu`` or ``cuda``).
    state_dir : str (default: "")
        Where this site keeps state across restarts (the DP ledger).
    rank : int (default: 0)
        This site's LoRA rank (<= the run's adapter.rank); 0 = from the run config.
    he_budget : int (default: -1)
        SHE-LoRA: encrypted columns per adapted matrix; -1 = from the run config.
    he_secret_context : str (default: "")
        SHE-LoRA: the clients' secret CKKS context file; "" = from the run config.
    model_path : str (default: "")
        Local directory of the base model at this site (replaces ``model.name``,
        so no site downloads weights); "" = the run's ``model.name``.
    name : str (default: "")
        How the server's logs and ``metrics.jsonl`` name this site when it fails
        (``site-name``); "" = Flower's node id.
    worker : bool (default: False)
        Hand every message to the site's long-lived worker (``site-worker=true``;
        ``fedlora.client.worker``), which keeps the model, data and ledger between
        rounds; needs ``state_dir`` (its socket and log live there).
    """

    partition_id: int = 0
    num_partitions: int = 1
    data_path: str = ""
    device: str = ""
    state_dir: str = ""
    rank: int = 0
    he_budget: int = -1
    he_secret_context: str = ""
    model_path: str = ""
    name: str = ""
    worker: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.partition_id < self.num_partitions:
            raise ConfigError(
                f"node-config partition-id={self.partition_id} must be in "
                f"[0, num-partitions={self.num_partitions})"
            )
        if self.rank < 0:
            raise ConfigError(f"node-config rank={self.rank} must be >= 1 (0 = unset)")
        if self.device not in ("", "cpu", "cuda", "auto"):
            raise ConfigError(
                f"node-config device={self.device!r}; allowed: cpu, cuda, auto"
            )
        if self.worker and not self.state_dir:
            raise ConfigError(
                "node-config site-worker=true needs state-dir=<directory>: the "
                "worker's socket and log live there"
            )

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SiteConfig:
        """Build from ``context.node_config``; unknown keys are ignored by Flower."""
        try:
            return cls(
                partition_id=int(node_config.get("partition-id", 0)),
                num_partitions=int(node_config.get("num-partitions", 1)),
                data_path=str(node_config.get("data-path", "")),
                device=str(node_config.get("device", "")),
                state_dir=str(node_config.get("state-dir", "")),
                rank=int(node_config.get("rank", 0)),
                he_budget=int(node_config.get("he-budget", -1)),
                he_secret_context=str(node_config.get("he-secret-context", "")),
                model_path=str(node_config.get("model-path", "")),
                name=str(node_config.get("site-name", "")),
                worker=_flag("site-worker", node_config.get("site-worker", False)),
            )
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"Invalid node-config {dict(node_config)}: {err}"
            ) from err


def _flag(key: str, value: Any) -> bool:
    """Read a node-config boolean: ``true``/``false`` (TOML) or their strings."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise ValueError(f"{key}={value!r} is not a boolean (true or false)")
