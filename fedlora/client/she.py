"""ClientApp glue for SHE-LoRA: read the server's payload, seal the reply.

The secret context comes from a file named by node-config ``he-secret-context``
(or, in simulation, ``strategy.he_secret_context``); it never enters a message.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from torch import Tensor

from fedlora import protocol as proto
from fedlora.client.site import SiteConfig
from fedlora.config import ClientConfig
from fedlora.config.flat import build_config
from fedlora.lora.rank import best_rank_factors, lora_scale
from fedlora.lora.state import A_SUFFIX, B_SUFFIX, StateDict, factor_pairs, from_record
from fedlora.she.keys import context_id, load_secret_context
from fedlora.she.packing import ordered_chunks
from fedlora.she.updates import encrypt_upload, merged_updates


def is_she(config: Mapping[str, Any]) -> bool:
    """Tell whether the server runs SHE-LoRA (its messages carry ``she-k``)."""
    return proto.SHE_K in config


@dataclass(frozen=True)
class SheRunSettings:
    """The two keys of the run's ``strategy`` group that a SHE-LoRA client reads.

    The group itself is the server's (``strategies.config.StrategyConfig``, which
    the client side must not import); these are parsed from the same flat
    run-config with the same typed tool, and a test keeps the defaults equal.
    """

    he_budgets: tuple[int, ...] = (4,)
    he_secret_context: str = ""

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> SheRunSettings:
        """Read ``strategy.he_budgets`` and ``strategy.he_secret_context``."""
        return build_config(cls, run_config, prefix="strategy.", strict=False)


def budget_of(site: SiteConfig, run_config: Mapping[str, Any]) -> int:
    """Columns per matrix this site encrypts: node-config, else the run's list."""
    if site.he_budget >= 0:
        return site.he_budget
    budgets = SheRunSettings.from_run_config(run_config).he_budgets
    return budgets[site.partition_id % len(budgets)] if budgets else 0


@functools.lru_cache(maxsize=4)
def _secret(path: str) -> Any:
    return load_secret_context(Path(path))


def secret_context(site: SiteConfig, run_config: Mapping[str, Any]) -> Any:
    """Load (once per process) this site's secret CKKS context."""
    path = (
        site.he_secret_context
        or SheRunSettings.from_run_config(run_config).he_secret_context
    )
    if not path:
        raise ValueError(
            "strategy=she_lora: this site has no secret CKKS context; set node-config "
            "he-secret-context=<path to secret.ctx>"
        )
    return _secret(path)


def _lists(config: Mapping[str, Any], k: int) -> dict[str, list[int]]:
    return {
        key.split(":", 1)[1]: [int(x) for x in value][:k]
        for key, value in config.items()
        if key.startswith(proto.SHE_LIST)
    }


def received_updates(content: RecordDict, ctx: Any) -> dict[str, Tensor]:
    """Rebuild every matrix's merged update, before the client truncates it.

    ``content``: a train/evaluate message after round 1 (the plaintext merge
    ``B_p: (m, R)``, ``A_p: (R, n)`` in record ``she-plain``, the summed
    ciphertexts in ``she-cipher``). Returns ``{matrix: (m, n)}`` float64: the
    plaintext merge plus the decrypted column sums divided by the total weight,
    i.e. the weighted mean of the clients' ``s_i B_i A_i`` up to CKKS error.
    """
    config = content.config_records[proto.CONFIG]
    sum_k = int(str(config[proto.SHE_SUM_K]))
    return merged_updates(
        factor_pairs(from_record(content.array_records[proto.SHE_PLAIN])),
        ordered_chunks(content.config_records.get(proto.SHE_CIPHER)),
        _lists(config, sum_k),
        float(str(config[proto.SHE_TOTAL_WEIGHT])),
        ctx,
    )


def received_state(
    content: RecordDict, cfg: ClientConfig, ctx: Any
) -> tuple[StateDict, float]:
    """Return the adapter this client starts from (own rank) and decrypt seconds.

    Round 1: the factors the server sent. Later: the plaintext merge plus the
    decrypted column sums, re-parameterised to rank ``cfg.adapter.rank`` by SVD.
    """
    config = content.config_records[proto.CONFIG]
    server_id = str(config.get(proto.SHE_CONTEXT_ID, ""))
    if server_id != context_id(ctx):
        raise ValueError(
            f"the server's public CKKS context ({server_id}) is not the public half "
            f"of this site's secret context ({context_id(ctx)}); use one key pair"
        )
    state = from_record(content.array_records[proto.ARRAYS])
    if proto.SHE_PLAIN not in content.array_records:
        return state, 0.0
    start = time.perf_counter()
    dense = received_updates(content, ctx)
    scale = lora_scale(cfg.adapter.alpha, cfg.adapter.rank, cfg.adapter.use_rslora)
    for n, delta in dense.items():
        b, a = best_rank_factors(delta, cfg.adapter.rank, scale)
        state[n + B_SUFFIX], state[n + A_SUFFIX] = b.float(), a.float()
    return state, time.perf_counter() - start


@dataclass
class SheMessage:
    """SHE-LoRA's part of one train/evaluate message at this client.

    ``ctx`` is the site's secret CKKS context, ``metrics`` the timings to report.
    """

    ctx: Any
    metrics: dict[str, float]


def open_message(
    msg: Message, cfg: ClientConfig, site: SiteConfig, run_config: Mapping[str, Any]
) -> tuple[StateDict, SheMessage | None]:
    """Return the adapter this client starts from and SHE-LoRA's state (or None).

    ``cfg`` is the site's config (its own rank). Without SHE-LoRA the adapter is
    the one sent; with it, the plaintext merge plus the decrypted columns.
    """
    state = from_record(msg.content.array_records[proto.ARRAYS])
    if not is_she(msg.content.config_records[proto.CONFIG]):
        return state, None
    ctx = secret_context(site, run_config)
    state, seconds = received_state(msg.content, cfg, ctx)
    return state, SheMessage(ctx, {proto.HE_DECRYPT_SECONDS: seconds})


def seal(
    she: SheMessage | None,
    trained: Mapping[str, Tensor],
    config: Mapping[str, Any],
    cfg: ClientConfig,
    num_examples: int,
) -> tuple[StateDict, dict[str, ConfigRecord], dict[str, float]]:
    """Return the reply's plaintext tensors, extra records, metrics (as is w/o SHE)."""
    if she is None:
        return dict(trained), {}, {}
    plain, records, metrics = sealed_reply(trained, config, cfg, she.ctx, num_examples)
    return plain, records, {**she.metrics, **metrics}


def sealed_reply(
    trained: Mapping[str, Tensor],
    config: Mapping[str, Any],
    cfg: ClientConfig,
    ctx: Any,
    num_examples: int,
) -> tuple[StateDict, dict[str, ConfigRecord], dict[str, float]]:
    """Plaintext state, the records to add (upload info, ciphertexts), metrics."""
    k = int(str(config[proto.SHE_K]))
    cols = _lists(config, k)
    weight = (
        float(num_examples) if config.get(proto.SHE_WEIGHTING) != "uniform" else 1.0
    )
    start = time.perf_counter()
    plain, chunks = encrypt_upload(
        trained,
        cols,
        scale=lora_scale(cfg.adapter.alpha, cfg.adapter.rank, cfg.adapter.use_rslora),
        weight=weight,
        ctx=ctx,
    )
    seconds = time.perf_counter() - start
    upload = ConfigRecord({proto.SHE_CONTEXT_ID: context_id(ctx)})
    for n, c in cols.items():
        upload[f"{proto.SHE_COLS}{n}"] = c
    d_in = [trained[n + A_SUFFIX].shape[1] for n in cols]
    metrics = {
        proto.SHE_K: float(k),
        proto.SHE_WEIGHT: weight,
        proto.HE_ENCRYPT_SECONDS: seconds,
        proto.HE_ENCRYPTED_FRACTION: k / min(d_in) if d_in else 0.0,
    }
    records = {
        proto.SHE_UPLOAD: upload,
        proto.SHE_CIPHER: ConfigRecord({f"c{i}": c for i, c in enumerate(chunks)}),
    }
    return plain, records, metrics
