"""ClientApp glue for SHE-LoRA: read the server's payload, seal the reply.

The secret context comes from a file named by node-config ``he-secret-context``
(or, in simulation, ``strategy.he_secret_context``); it never enters a message.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, RecordDict
from torch import Tensor

from fedlora.adapters import A_SUFFIX, B_SUFFIX, StateDict, factor_pairs, from_record
from fedlora.config import ClientConfig
from fedlora.lowrank import best_rank_factors, lora_scale
from fedlora.she.client import encrypt_upload, merged_updates
from fedlora.she.keys import context_id, load_secret_context
from fedlora.she.packing import ordered_chunks
from fedlora.site import SiteConfig

CIPHER = "she-cipher"
PLAIN = "she-plain"


def is_she(config: Mapping[str, Any]) -> bool:
    """Tell whether the server runs SHE-LoRA (its messages carry ``she-k``)."""
    return "she-k" in config


def budget_of(site: SiteConfig, run_config: Mapping[str, Any]) -> int:
    """Columns per matrix this site encrypts: node-config, else the run's list."""
    if site.he_budget >= 0:
        return site.he_budget
    raw = str(run_config.get("strategy.he_budgets", "4"))
    budgets = [int(x) for x in raw.replace(" ", "").split(",") if x]
    return budgets[site.partition_id % len(budgets)] if budgets else 0


@functools.lru_cache(maxsize=4)
def _secret(path: str) -> Any:
    return load_secret_context(Path(path))


def secret_context(site: SiteConfig, run_config: Mapping[str, Any]) -> Any:
    """Load (once per process) this site's secret CKKS context."""
    path = site.he_secret_context or str(
        run_config.get("strategy.he_secret_context", "")
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
        if key.startswith("she-list:")
    }


def received_updates(content: RecordDict, ctx: Any) -> dict[str, Tensor]:
    """Rebuild every matrix's merged update, before the client truncates it.

    ``content``: a train/evaluate message after round 1 (the plaintext merge
    ``B_p: (m, R)``, ``A_p: (R, n)`` in record ``she-plain``, the summed
    ciphertexts in ``she-cipher``). Returns ``{matrix: (m, n)}`` float64: the
    plaintext merge plus the decrypted column sums divided by the total weight,
    i.e. the weighted mean of the clients' ``s_i B_i A_i`` up to CKKS error.
    """
    config = content.config_records["config"]
    sum_k = int(str(config["she-sum-k"]))
    return merged_updates(
        factor_pairs(from_record(content.array_records[PLAIN])),
        ordered_chunks(content.config_records.get(CIPHER)),
        _lists(config, sum_k),
        float(str(config["she-total-weight"])),
        ctx,
    )


def received_state(
    content: RecordDict, cfg: ClientConfig, ctx: Any
) -> tuple[StateDict, float]:
    """Return the adapter this client starts from (own rank) and decrypt seconds.

    Round 1: the factors the server sent. Later: the plaintext merge plus the
    decrypted column sums, re-parameterised to rank ``cfg.adapter.rank`` by SVD.
    """
    config = content.config_records["config"]
    server_id = str(config.get("she-context-id", ""))
    if server_id != context_id(ctx):
        raise ValueError(
            f"the server's public CKKS context ({server_id}) is not the public half "
            f"of this site's secret context ({context_id(ctx)}); use one key pair"
        )
    state = from_record(content.array_records["arrays"])
    if PLAIN not in content.array_records:
        return state, 0.0
    start = time.perf_counter()
    dense = received_updates(content, ctx)
    scale = lora_scale(cfg.adapter.alpha, cfg.adapter.rank, cfg.adapter.use_rslora)
    for n, delta in dense.items():
        b, a = best_rank_factors(delta, cfg.adapter.rank, scale)
        state[n + B_SUFFIX], state[n + A_SUFFIX] = b.float(), a.float()
    return state, time.perf_counter() - start


def sealed_reply(
    trained: Mapping[str, Tensor],
    config: Mapping[str, Any],
    cfg: ClientConfig,
    ctx: Any,
    num_examples: int,
) -> tuple[StateDict, dict[str, ConfigRecord], dict[str, float]]:
    """Plaintext state, the records to add (upload info, ciphertexts), metrics."""
    k = int(str(config["she-k"]))
    cols = _lists(config, k)
    weight = float(num_examples) if config.get("she-weighting") != "uniform" else 1.0
    start = time.perf_counter()
    plain, chunks = encrypt_upload(
        trained,
        cols,
        scale=lora_scale(cfg.adapter.alpha, cfg.adapter.rank, cfg.adapter.use_rslora),
        weight=weight,
        ctx=ctx,
    )
    seconds = time.perf_counter() - start
    upload = ConfigRecord({"she-context-id": context_id(ctx)})
    for n, c in cols.items():
        upload[f"she-cols:{n}"] = c
    d_in = [trained[n + A_SUFFIX].shape[1] for n in cols]
    metrics = {
        "she-k": float(k),
        "she-weight": weight,
        "he-encrypt-seconds": seconds,
        "he-encrypted-fraction": k / min(d_in) if d_in else 0.0,
    }
    records = {
        "she-upload": upload,
        CIPHER: ConfigRecord({f"c{i}": c for i, c in enumerate(chunks)}),
    }
    return plain, records, metrics
