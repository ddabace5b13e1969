"""The message format between the ServerApp and the ClientApps, in one place.

Every record name, config key and metric key that one side writes and the other
reads is defined here once, so a typo fails at import time rather than as a
silently missing value. The typed helpers build and read the records whose fields
travel together (a client's privacy report, a train or evaluate reply).

A train or evaluate message from the server carries:

* ``ArrayRecord`` ``ARRAYS``: the adapter tensors (``fedlora.lora.state.to_record``);
* ``ConfigRecord`` ``CONFIG``: ``SERVER_ROUND``, ``BASE_FINGERPRINT``,
  ``FROZEN_FINGERPRINT`` (FFA-LoRA's frozen A), SHE-LoRA's ``SHE_*`` keys;
* ``ArrayRecord`` ``RESIDUAL`` (FLoRA's merged update beside the base), if any.

A reply carries ``ARRAYS`` (only the trained tensors), ``MetricRecord`` ``METRICS``
(see :func:`train_metrics`, :func:`evaluate_metrics`) and SHE-LoRA's ``SHE_UPLOAD``.

Every adapter-sized ArrayRecord (``ARRAYS`` both ways, ``RESIDUAL``, ``SHE_PLAIN``)
travels in the run's ``federation.transport_dtype`` (one of ``TRANSPORT_DTYPES``);
``fedlora.lora.state.to_record`` / ``from_record`` encode and decode it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

MetricValue = int | float | list[int] | list[float]

# Record names.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
RESIDUAL = "flora-residual"
SITE = "site"

# Element types of adapter tensors on the wire (``Array.dtype``) -> bytes per
# element. float32 is Flower's own numpy ``Array``; numpy has no bfloat16, so the
# 16-bit types travel as raw little-endian element bytes (C order, no header) with
# ``Array.stype = RAW_STYPE``, which Flower's ``Array.numpy()`` refuses rather than
# misreads.
TRANSPORT_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
RAW_STYPE = "fedlora.raw-le"

# Server -> client config keys.
SERVER_ROUND = "server-round"
BASE_FINGERPRINT = "base-fingerprint"
FROZEN_FINGERPRINT = "frozen-fingerprint"

# Query messages: the config key naming the question, and the questions.
QUERY = "fedlora-query"
QUERY_SITE = "site"
QUERY_SHE_SENSITIVITY = "she-sensitivity"
# A simulated client's base facts (``fedlora.base_facts``): reply records
# ``BASE_FACTS`` (``BASE_FINGERPRINT``, and each PEFT directory file's text under
# ``TEMPLATE_FILE`` + its name) and ``ARRAYS`` (the initial adapter, float32).
QUERY_BASE_FACTS = "base-facts"
BASE_FACTS = "base-facts"
TEMPLATE_FILE = "file:"

# Client -> server metric keys.
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
TRAIN_LOSS = "train-loss"
TRAIN_STEPS = "train-steps"
TRAIN_SECONDS = "train-seconds"
# ``ArrayRecord.count_bytes()`` of ``ARRAYS`` received / sent: element bytes in the
# transport dtype plus per-tensor headers and keys.
BYTES_DOWN = "bytes-down"
BYTES_UP = "bytes-up"
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"
EVAL_PERPLEXITY = "eval-perplexity"
EVAL_EXACT_MATCH = "eval-exact-match"
EVAL_ROUGE_L = "eval-rouge-l"
RANK = "rank"
HE_BUDGET = "he-budget"
HE_ENCRYPT_SECONDS = "he-encrypt-seconds"
HE_DECRYPT_SECONDS = "he-decrypt-seconds"
HE_ENCRYPTED_FRACTION = "he-encrypted-fraction"
# Where a client's time went (``fedlora.client.app``): process start to the
# handler (first message of a process only), the handler (loading included),
# and, with a site worker, the worker's handler and the base models it built.
STARTUP_SECONDS = "startup-seconds"
HANDLER_SECONDS = "handler-seconds"
WORKER_SECONDS = "worker-seconds"
WORKER_MODEL_LOADS = "worker-model-loads"
# Where a reply was computed (a ConfigRecord): the host, and the Ray node id when
# the client ran as a Ray actor (a simulation; several nodes on a Ray cluster).
PLACEMENT = "placement"
PLACEMENT_HOST = "host"
PLACEMENT_RAY_NODE = "ray-node"

# SHE-LoRA: server -> client config keys (``SHE_LIST`` is a prefix + matrix name).
SHE_K = "she-k"
SHE_SUM_K = "she-sum-k"
SHE_TOTAL_WEIGHT = "she-total-weight"
SHE_CONTEXT_ID = "she-context-id"
SHE_WEIGHTING = "she-weighting"
SHE_LIST = "she-list:"
# SHE-LoRA: records (ciphertext chunks, the plaintext merge, a client's upload,
# its column scores) and the keys inside them.
SHE_CIPHER = "she-cipher"
SHE_PLAIN = "she-plain"
SHE_UPLOAD = "she-upload"
SHE_SCORES = "she-scores"
SHE_COLS = "she-cols:"
SHE_WEIGHT = "she-weight"
SCORE_POSITIONS = "pos:"
SCORE_VALUES = "score:"


@dataclass(frozen=True)
class PrivacyReport:
    """A DP client's privacy report: everything needed to recompute its epsilon.

    ``epsilon`` is the client's cumulative spend over every round it took part in
    (``steps`` DP-SGD steps so far) at ``delta``; ``exhausted`` says this round was
    refused because it would exceed the budget. ``accountant`` stays on the client
    (the run's config names it); the rest travels in ``METRICS``.
    """

    epsilon: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    exhausted: bool
    accountant: str = ""

    def to_metrics(self) -> dict[str, float]:
        """Write the report as metric entries (``exhausted`` as 0/1)."""
        return {
            "epsilon": float(self.epsilon),
            "dp-noise-multiplier": float(self.noise_multiplier),
            "dp-sample-rate": float(self.sample_rate),
            "dp-steps": int(self.steps),
            "dp-delta": float(self.delta),
            "dp-exhausted": int(self.exhausted),
        }

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, object]) -> PrivacyReport | None:
        """Read the report back; None when the reply carries none (no DP)."""
        if "epsilon" not in metrics:
            return None

        def num(key: str) -> float:
            value = metrics.get(key, float("nan"))
            return float(value) if isinstance(value, int | float) else float("nan")

        return cls(
            epsilon=num("epsilon"),
            noise_multiplier=num("dp-noise-multiplier"),
            sample_rate=num("dp-sample-rate"),
            steps=int(num("dp-steps")) if math.isfinite(num("dp-steps")) else 0,
            delta=num("dp-delta"),
            exhausted=num("dp-exhausted") > 0,
        )


def train_metrics(
    *,
    num_examples: int,
    loss: float,
    steps: int,
    seconds: float,
    bytes_down: int,
    bytes_up: int,
    partition_id: int,
    privacy: PrivacyReport | None = None,
    extra: Mapping[str, MetricValue] | None = None,
) -> dict[str, MetricValue]:
    """Build the ``METRICS`` of a train reply; ``num_examples`` is the FedAvg weight."""
    values: dict[str, MetricValue] = {
        NUM_EXAMPLES: num_examples,
        TRAIN_LOSS: loss,
        TRAIN_STEPS: steps,
        TRAIN_SECONDS: seconds,
        BYTES_DOWN: bytes_down,
        BYTES_UP: bytes_up,
        PARTITION_ID: partition_id,
    }
    if privacy is not None:
        values.update(privacy.to_metrics())
    values.update(extra or {})
    return values


def evaluate_metrics(
    *,
    num_examples: int,
    loss: float,
    accuracy: float | None,
    perplexity: float | None,
    exact_match: float | None = None,
    rouge_l: float | None = None,
) -> dict[str, MetricValue]:
    """Build the ``METRICS`` of an evaluate reply.

    Accuracy for classification, perplexity for causal LM (and exact match and
    ROUGE-L with ``train.eval_generate > 0``); a measure that does not apply is
    absent. The server averages each over clients weighted by ``NUM_EXAMPLES``.
    """
    values: dict[str, MetricValue] = {NUM_EXAMPLES: num_examples, EVAL_LOSS: loss}
    for key, value in (
        (EVAL_ACCURACY, accuracy),
        (EVAL_PERPLEXITY, perplexity),
        (EVAL_EXACT_MATCH, exact_match),
        (EVAL_ROUGE_L, rouge_l),
    ):
        if value is not None:
            values[key] = value
    return values
