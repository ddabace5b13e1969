"""Identity of a frozen base model, so a site never trains on the wrong weights.

The fingerprint is a SHA-256 over the model's config (architecture, sizes,
vocabulary), the name and shape of every base parameter, and the values of the
base tensors that are not quantised (embeddings, norms, biases), cast to bfloat16.
Buffers are not parameters: VeRA's shared projections are checked with the frozen
adapter tensors instead (``fedlora.client.round.check_frozen``).
Casting makes it independent of where the model runs (a CUDA site in bfloat16 and
a CPU server in float32 agree) while any different checkpoint, size or quantisation
layout changes it. LoRA factors, VeRA's vectors and the task head are excluded:
they are the adapter, not the base.
"""

from __future__ import annotations

import hashlib
import json
import weakref

import torch
from torch import nn

_SKIP = ("lora_", "vera_lambda_", "modules_to_save", "original_module")
# Config keys that are not the model's identity: the load dtype, the library
# version, and ``problem_type``, which transformers sets on the first loss of a
# sequence classifier (the same model then fingerprinted differently).
_RUNTIME_KEYS = ("torch_dtype", "dtype", "transformers_version", "problem_type")


def base_fingerprint(model: nn.Module) -> str:
    """Fingerprint (16 hex chars) of the frozen base model inside ``model``."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        keep = {
            k: v
            for k, v in sorted(config.to_dict().items())
            if isinstance(v, (int, str, bool))
            and not k.startswith("_")
            and k not in _RUNTIME_KEYS
        }
        digest.update(json.dumps(keep, sort_keys=True).encode())
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if any(s in name for s in _SKIP) or "classifier" in name or "score" in name:
            continue
        digest.update(f"{name}:{tuple(param.shape)};".encode())
        if param.is_floating_point() and param.numel() > 0:
            values = param.detach().to("cpu", torch.bfloat16).contiguous()
            digest.update(values.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


# Per model object (weak: a dropped model's entry goes with it, so a new model
# that happens to reuse a freed object's id never inherits its fingerprint).
_FINGERPRINTS: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def model_fingerprint(model: nn.Module) -> str:
    """:func:`base_fingerprint` of ``model``, computed once per model object.

    The base is frozen, so a process that fingerprints the same model again (a
    client answering the server's base-facts query, then checking the server's
    fingerprint in its first round) reuses the hash of every base tensor.
    """
    found = _FINGERPRINTS.get(model)
    if found is None:
        found = _FINGERPRINTS[model] = base_fingerprint(model)
    return found
