"""SHE-LoRA [Liu et al., 2025]: selective homomorphic encryption of adapter columns.

Paper: "SHE-LoRA: Selective Homomorphic Encryption for Federated Tuning with
Heterogeneous LoRA" (arXiv:2505.21051). Per adapted matrix, each client's most
sensitive input columns (scored on its own calibration data) travel only as CKKS
ciphertexts; the rest of the update is merged in plaintext at product level, as in
FlexLoRA. The server holds a *public* context only: it adds ciphertexts and cannot
read them. Each client decrypts the summed columns, adds them to the plaintext
merge and re-parameterises the result to its own rank by SVD.

Flaws of the official code that are fixed here: the server never loads a secret
context (refused with an error); one negotiated list per matrix (not the first
layer's list reused); the merged column is the exact weighted mean over *all*
clients (the code divides by the number of encrypting clients, biased when budgets
differ); swapping is an exact permutation (round-trip tested). The plaintext merge
is sent at the rank it can have, ``min(sum_i r_i, m, n)``, not cut to the maximum
client rank: a client adds the decrypted columns to it and only then truncates to
its own rank, so it ends at the best rank-``r_i`` approximation of the exact mean.
Deviation: clients encrypt columns of their own product ``s B A`` rather than of
``A`` (see ``fedlora.she.updates``), so the server only adds. Negotiation is a
deterministic vote/score ranking instead of the paper's Bayesian optimisation.
Column swapping hides nothing from this server (it made the list and unswaps
the plaintext); it hides the positions from anyone who sees the upload without
the list. Round 1 queries every sampled node for its column scores.
"""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from torch import Tensor

from fedlora import protocol as proto
from fedlora.lora.rank import product_mean, svd_factors
from fedlora.lora.state import (
    A_SUFFIX,
    B_SUFFIX,
    StateDict,
    from_record,
    matrix_names,
    pairs_state,
)
from fedlora.she.columns import Selection, negotiate, unswap_columns
from fedlora.she.keys import context_id, load_public_context
from fedlora.she.packing import add_ciphertexts, num_chunks, ordered_chunks
from strategies.aggregation import normalise_weights, weighted_mean
from strategies.client_reports import metric
from strategies.config import ExperimentConfig
from strategies.fedavg_lora import RoundStats
from strategies.rank_aware import (
    HeteroRankLora,
    head_keys,
    truncate_state,
)


def plain_rank(ranks: list[int], shape: tuple[int, ...]) -> int:
    """Rank bound of a sum of rank-``r_i`` updates of ``shape`` ``(m, n)``.

    ``rank(sum_i B_i A_i) <= min(sum_i r_i, m, n)``: the width at which the
    plaintext merge is exact.
    """
    return min(sum(ranks), *shape)


class SheLora(HeteroRankLora):
    """Selective-HE product-level aggregation over heterogeneous ranks.

    Parameters (besides HeteroRankLora's)
    ----------
    public_context : str
        Path of the server's public CKKS context (a secret one is refused).
    """

    checkpoint_attrs = (
        "columns",
        "plain",
        "summed",
        "sum_k",
        "total_weight",
    )

    server_can_evaluate = False  # the merged columns exist only at the key holders

    def __init__(self, *, public_context: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ctx = load_public_context(Path(public_context))
        assert not self.ctx.is_private()  # the server never holds a secret key
        self.ctx_id = context_id(self.ctx)
        self.columns: dict[str, list[int]] = {}  # negotiated, best first
        self.plain: dict[str, tuple[Tensor, Tensor]] = {}  # B_p A_p = merge
        self.summed: list[bytes] = []
        self.sum_k = 0
        self.total_weight = 0.0

    @classmethod
    def extra_kwargs(cls, cfg: ExperimentConfig) -> dict[str, Any]:
        """``strategy.he_public_context``."""
        if not cfg.strategy.he_public_context:
            raise ValueError(
                "strategy=she_lora needs strategy.he_public_context (the launcher "
                "fills it in simulation; deployment: python -m fedlora.she.keys DIR)"
            )
        return {"public_context": cfg.strategy.he_public_context}

    def budget(self, node: int) -> int:
        """Columns per matrix that ``node`` encrypts (capped by the list)."""
        length = min((len(c) for c in self.columns.values()), default=0)
        return min(self.nodes[node].he_budget, length)

    # -- round 1: negotiation ---------------------------------------------

    def negotiate(self, grid: Grid, nodes: list[int]) -> None:
        """Query the nodes' column scores; fix one nested list per matrix."""
        replies = self.query(grid, nodes, proto.QUERY_SHE_SENSITIVITY)
        names = matrix_names(self._global())
        selections: dict[str, list[Selection]] = {n: [] for n in names}
        for node, reply in replies.items():
            rec = reply.content.config_records[proto.SHE_SCORES]
            for n in names:
                pos = [int(x) for x in rec.get(f"{proto.SCORE_POSITIONS}{n}", [])]  # type: ignore[union-attr]
                sc = [float(x) for x in rec.get(f"{proto.SCORE_VALUES}{n}", [])]  # type: ignore[union-attr]
                selections[n].append(Selection(self.nodes[node].he_budget, pos, sc))
        glob = self._global()
        self.columns = {
            n: negotiate(selections[n], glob[n + A_SUFFIX].shape[1]) for n in names
        }
        log(
            INFO,
            "SHE-LoRA: negotiated %d columns per matrix from %d nodes' scores",
            min((len(c) for c in self.columns.values()), default=0),
            len(replies),
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Negotiate once, then send each node its payload."""
        self.global_state = from_record(arrays)
        nodes = self.learn_nodes(
            grid, self.sample(grid, self.fraction_train, self.min_train_nodes)
        )
        if not self.columns:
            self.negotiate(grid, nodes)
        messages = self._messages(server_round, nodes, config, MessageType.TRAIN)
        self.record_down(server_round, messages)
        stats = self.stats[server_round]
        stats.extra["he_bytes_down"] = float(
            sum(len(c) for c in self.summed) * len(messages)
        )
        return messages

    def node_content(
        self, server_round: int, node: int, config: ConfigRecord
    ) -> RecordDict:
        """Head (+ initial factors in round 1), plaintext merge, summed ciphertexts."""
        state = truncate_state(self._global(), self.nodes[node].rank)
        own = ConfigRecord(dict(config))
        own[proto.SHE_K] = self.budget(node)
        own[proto.SHE_SUM_K] = self.sum_k
        own[proto.SHE_TOTAL_WEIGHT] = self.total_weight
        own[proto.SHE_CONTEXT_ID] = self.ctx_id
        own[proto.SHE_WEIGHTING] = self.weighting
        for n, cols in self.columns.items():
            own[f"{proto.SHE_LIST}{n}"] = cols
        content = RecordDict({proto.CONFIG: own})
        if self.plain:
            state = {k: state[k] for k in head_keys(state)}
            content[proto.SHE_PLAIN] = self.wire(pairs_state(self.plain))
            content[proto.SHE_CIPHER] = ConfigRecord(
                {f"c{i}": c for i, c in enumerate(self.summed)}
            )
        content[proto.ARRAYS] = self.wire(state)
        return content

    # -- replies ------------------------------------------------------------

    def reply_problem(self, server_round: int, msg: Message) -> str | None:
        """Shapes at the sender's rank, then the encrypted part."""
        problem = super().reply_problem(server_round, msg)
        if problem is not None:
            return problem
        content = msg.content
        m = content.metric_records[proto.METRICS]
        got_id = content.config_records.get(proto.SHE_UPLOAD, ConfigRecord()).get(
            proto.SHE_CONTEXT_ID, ""
        )
        if got_id != self.ctx_id:
            return (
                f"ciphertexts under another CKKS key pair (context {got_id!r}, the "
                f"server's public context is {self.ctx_id!r}); give the site the "
                "secret context made with the server's public one"
            )
        upload = content.config_records[proto.SHE_UPLOAD]
        k = int(metric(m, proto.SHE_K, -1))
        node = msg.metadata.src_node_id
        if not 0 <= k <= self.budget(node):
            return (
                f"encrypted {k} columns per matrix; its budget is {self.budget(node)}"
            )
        for n, cols in self.columns.items():
            sent = [int(x) for x in upload.get(f"{proto.SHE_COLS}{n}", [])]  # type: ignore[union-attr]
            if sent != cols[:k]:
                extra = sorted(set(sent) - set(cols[:k]))
                return (
                    f"ciphertext for column(s) {extra or sent} of {n} that were not "
                    f"negotiated (expected the first {k} of the list: {cols[:k]})"
                )
        sizes = [self._global()[n + B_SUFFIX].shape[0] for n in self.columns]
        chunks = ordered_chunks(
            content.config_records.get(proto.SHE_CIPHER, ConfigRecord())
        )
        want = num_chunks(k, sizes) if k else 0
        if len(chunks) != want:
            return (
                f"{len(chunks)} ciphertexts for {k} columns per matrix; expected {want}"
            )
        if metric(m, proto.SHE_WEIGHT, 0.0) <= 0:
            return "missing or non-positive she-weight"
        return None

    def merge(
        self, server_round: int, replies: list[Message], weights: list[float]
    ) -> StateDict:
        """Exact plaintext product mean + homomorphic column sums.

        Keeps ``self.plain`` (every matrix's plaintext mean, see
        :meth:`merge_plain`), the summed ciphertexts and the total weight for the
        next messages; returns the global adapter (head: weighted mean; factors:
        the plaintext mean's best rank-``max_rank`` approximation).
        """
        del weights  # the clients folded their own weights into the ciphertexts
        start = time.perf_counter()
        metrics = [m.content.metric_records[proto.METRICS] for m in replies]
        w = [metric(m, proto.SHE_WEIGHT) for m in metrics]
        ks = [int(metric(m, proto.SHE_K)) for m in metrics]
        ranks = [self.nodes[m.metadata.src_node_id].rank for m in replies]
        states = [from_record(m.content.array_records[proto.ARRAYS]) for m in replies]
        glob = self._global()
        new = dict(glob)
        heads = head_keys(glob)
        if heads:
            new.update(weighted_mean([{h: s[h] for h in heads} for s in states], w))
        for n, cols in self.columns.items():
            factors = [
                (s[n + B_SUFFIX], unswap_columns(s[n + A_SUFFIX], cols[:k]))
                for s, k in zip(states, ks, strict=True)
            ]
            b, a = self.merge_plain(n, factors, w, ranks)
            new[n + B_SUFFIX], new[n + A_SUFFIX] = b.float(), a.float()
        uploads = [
            ordered_chunks(
                m.content.config_records.get(proto.SHE_CIPHER, ConfigRecord())
            )
            for m in replies
        ]
        self.summed = add_ciphertexts(self.ctx, uploads)
        self.sum_k = max(ks, default=0)
        self.total_weight = float(sum(w))
        self._he_stats(self.stats[server_round], metrics, uploads, start)
        return new

    def merge_plain(
        self,
        name: str,
        factors: list[tuple[Tensor, Tensor]],
        weights: list[float],
        ranks: list[int],
    ) -> tuple[Tensor, Tensor]:
        """Merge one matrix's plaintext parts exactly; return the global pair.

        ``factors``: each client's ``(B_i: (m, r_i), A_i: (r_i, n))`` with its
        encrypted columns zeroed (unswapped). Their weighted mean
        ``dW_p = sum_i p_i s_i B_i A_i`` has rank at most
        ``min(sum_i r_i, m, n)``; ``self.plain[name]`` keeps it at that rank
        (``B_p: (m, R)``, ``A_p: (R, n)``, scale 1, float32), so
        ``B_p A_p = dW_p`` up to float32 rounding. A client adds the decrypted
        columns to it before truncating to its own rank; cutting ``dW_p`` to
        ``max_rank`` here would lose the components of the sum beyond it.
        Returns ``dW_p``'s best rank-``max_rank`` factors for the global scale
        (float64), the server's own adapter.
        """
        scales = [self.scale(r) for r in ranks]
        delta = product_mean(factors, normalise_weights(weights), scales)
        u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
        bp, ap = svd_factors(u, sv, vh, plain_rank(ranks, delta.shape), 1.0)
        self.plain[name] = (bp.float(), ap.float())
        return svd_factors(u, sv, vh, self.max_rank, self.scale(self.max_rank))

    def _he_stats(
        self,
        stats: RoundStats,
        metrics: list[Any],
        uploads: list[list[bytes]],
        start: float,
    ) -> None:
        cipher_up = float(sum(len(c) for u in uploads for c in u))
        stats.extra.update(
            {
                "he_bytes_up": cipher_up,
                # serialised replies minus their ciphertexts: the plaintext part
                "he_plain_bytes_up": float(stats.bytes_up) - cipher_up,
                "he_ciphertexts_up": float(sum(len(u) for u in uploads)),
                "he_encrypt_seconds": sum(
                    metric(m, proto.HE_ENCRYPT_SECONDS, 0.0) for m in metrics
                ),
                "he_decrypt_seconds": sum(
                    metric(m, proto.HE_DECRYPT_SECONDS, 0.0) for m in metrics
                ),
                "he_aggregate_seconds": time.perf_counter() - start,
                "he_encrypted_fraction": max(
                    (metric(m, proto.HE_ENCRYPTED_FRACTION, 0.0) for m in metrics),
                    default=0.0,
                ),
            }
        )
