"""Development certificates and SuperNode keys for a TLS deployment.

``python -m fedlora.certs <dir> --sites 3 --host superlink.example.org`` writes:

* ``ca.crt`` / ``ca.key``: a self-signed certificate authority (EC P-384, 1 year);
* ``server.pem`` / ``server.key``: the SuperLink's TLS certificate, signed by the
  CA, valid for ``localhost``, ``127.0.0.1`` and every ``--host`` (DNS name or IP);
* ``site-<i>.key`` / ``site-<i>.pub``: one EC P-384 key pair per site in OpenSSH
  format, for SuperNode authentication (``flwr supernode register site-<i>.pub``
  on the operator's machine, ``--auth-supernode-private-key site-<i>.key`` at the
  site).

Private keys are written with mode 0600. For real deployments bring your own CA
and keys; these are for development and tests.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DAYS = 365


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(["localhost", "127.0.0.1", *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def create_certificates(out_dir: Path, hosts: Sequence[str] = ()) -> dict[str, Path]:
    """CA + SuperLink server certificate for ``hosts``; returns the file paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora dev CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "superlink")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=DAYS))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    paths = {
        "ca_cert": out_dir / "ca.crt",
        "ca_key": out_dir / "ca.key",
        "server_cert": out_dir / "server.pem",
        "server_key": out_dir / "server.key",
    }
    paths["ca_cert"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths["ca_key"], _pem_key(ca_key))
    paths["server_cert"].write_bytes(
        server_cert.public_bytes(serialization.Encoding.PEM)
    )
    _write_private(paths["server_key"], _pem_key(server_key))
    return paths


def create_site_keys(out_dir: Path, name: str) -> tuple[Path, Path]:
    """One SuperNode key pair (EC P-384, OpenSSH): ``<name>.key``, ``<name>.pub``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    _write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return private, public


def main(argv: list[str] | None = None) -> None:
    """CLI: development CA, SuperLink certificate and site keys."""
    parser = argparse.ArgumentParser(
        prog="python -m fedlora.certs",
        description="Create development TLS certificates and SuperNode key pairs.",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--sites", type=int, default=3, help="site key pairs")
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        help="SuperLink DNS name or IP (repeatable; localhost and 127.0.0.1 always)",
    )
    args = parser.parse_args(argv)
    paths = create_certificates(args.out_dir, args.host)
    for name, path in paths.items():
        print(f"{name}: {path}")
    for i in range(args.sites):
        private, public = create_site_keys(args.out_dir, f"site-{i}")
        print(f"site-{i}: {private} (keep at the site), {public} (register)")


if __name__ == "__main__":
    main()
