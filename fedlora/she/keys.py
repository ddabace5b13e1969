"""CKKS contexts for SHE-LoRA: secret for the clients, public for the server.

Aggregation is add-only (clients encrypt columns of their own product ``B_i A_i``;
the server only adds ciphertexts), so no Galois or relinearisation keys exist and
the coefficient modulus is two 60-bit primes: N = 8192 (4096 slots, enough for an
output dimension of 4096), scale 2^40. A fresh ciphertext is 131 KB and the
relative error of a sum of 8 ciphertexts is ~3e-10 (measured).

Create the pair with ``python -m fedlora.she.keys <dir>`` (writes ``secret.ctx``,
readable only by its owner, and ``public.ctx``); copy ``secret.ctx`` to every
site and ``public.ctx`` to the server. Nothing here ever puts a context in a
Flower message.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path
from typing import Any

POLY_MODULUS_DEGREE = 8192
COEFF_MOD_BIT_SIZES = (60, 60)
SCALE_BITS = 40
SLOTS = POLY_MODULUS_DEGREE // 2
SECRET_FILE = "secret.ctx"
PUBLIC_FILE = "public.ctx"


class HEContextError(ValueError):
    """A CKKS context is missing, malformed, or of the wrong kind for its holder."""


def new_context() -> Any:
    """Create a CKKS context with a secret key (the clients' shared key pair)."""
    import tenseal as ts

    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=POLY_MODULUS_DEGREE,
        coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES),
    )
    ctx.global_scale = 2**SCALE_BITS
    return ctx


def public_bytes(ctx: Any) -> bytes:
    """Serialise the public part of ``ctx`` (no secret, Galois or relin keys)."""
    pub = ctx.copy()
    if pub.is_private():
        pub.make_context_public()
    data: bytes = pub.serialize(save_galois_keys=False, save_relin_keys=False)
    return data


def context_id(ctx: Any) -> str:
    """Identity of a key pair: SHA-256 of its public serialisation (16 hex chars).

    Identical for the secret and the public context of one pair, different for any
    other pair, so a reply encrypted under a foreign key is recognised and dropped.
    """
    return hashlib.sha256(public_bytes(ctx)).hexdigest()[:16]


def create_contexts(out_dir: Path) -> tuple[Path, Path]:
    """Write ``secret.ctx`` (mode 0600) and ``public.ctx`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = new_context()
    secret_path, public_path = out_dir / SECRET_FILE, out_dir / PUBLIC_FILE
    data = ctx.serialize(
        save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    public_path.write_bytes(public_bytes(ctx))
    return secret_path, public_path


def _load(path: Path, who: str) -> Any:
    import tenseal as ts

    if not path.is_file():
        raise HEContextError(
            f"{who}: CKKS context file {str(path)!r} does not exist; create the pair "
            "with `python -m fedlora.she.keys <dir>`"
        )
    try:
        return ts.context_from(path.read_bytes())
    except Exception as err:  # noqa: BLE001 - TenSEAL raises bare exceptions
        raise HEContextError(
            f"{who}: {str(path)!r} is not a TenSEAL context ({err})"
        ) from err


def load_secret_context(path: Path) -> Any:
    """Load a client's context; it must hold the secret key (to decrypt)."""
    ctx = _load(path, "client")
    if not ctx.is_private():
        raise HEContextError(
            f"client: {str(path)!r} holds no secret key, so the aggregate cannot be "
            f"decrypted; give sites {SECRET_FILE}, not {PUBLIC_FILE}"
        )
    return ctx


def load_public_context(path: Path) -> Any:
    """Load the server's context; refuse one that holds a secret key."""
    ctx = _load(path, "server")
    if ctx.is_private():
        raise HEContextError(
            f"server: refusing {str(path)!r}: it holds the clients' secret key, with "
            f"which the server could decrypt every update; give the server "
            f"{PUBLIC_FILE} (written next to {SECRET_FILE} by "
            "`python -m fedlora.she.keys <dir>`)"
        )
    return ctx


def main(argv: list[str] | None = None) -> None:
    """CLI: create a development key pair for SHE-LoRA."""
    parser = argparse.ArgumentParser(
        prog="python -m fedlora.she.keys",
        description="Create the clients' secret CKKS context and the server's "
        "public one.",
    )
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    secret, public = create_contexts(args.out_dir)
    print(f"secret context (sites only): {secret}\npublic context (server): {public}")


if __name__ == "__main__":
    main()
