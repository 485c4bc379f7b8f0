"""TLS certificates for a SuperLink and authentication keys for SuperNodes.

Writes, into one folder:
- `ca.crt` / `ca.key`: a private certificate authority (keep `ca.key` off the nodes);
- `server.pem` / `server.key`: the SuperLink's certificate, signed by the CA, valid for
  `localhost`, `127.0.0.1`, `::1` and every `--host` given;
- `node-<i>` / `node-<i>.pub`: one ECDSA P-384 key pair per SuperNode in OpenSSH format,
  the form `flower-supernode --auth-supernode-private-key` and `flwr supernode register`
  read.

Run `python -m fedtune.deploy.certs DIR --host HOST --nodes N` (or `fedtune deploy certs`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class CertFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]  # private keys; the public key is the same path + ".pub"


def node_key_path(folder: Path, index: int) -> Path:
    return folder / f"node-{index}"


def write_certs(folder: str | Path, hosts: Sequence[str] = (), nodes: int = 2,
                days: int = 365) -> CertFiles:
    """Create the CA, the SuperLink's certificate for `hosts` (plus loopback) and `nodes`
    SuperNode key pairs in `folder`; existing files are overwritten."""
    if nodes < 0:
        raise ValueError(f"nodes must be >= 0, got {nodes}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))
    now = dt.datetime.now(dt.UTC)
    # Backdated a little: a node whose clock runs behind must still accept the cert.
    not_before, not_after = now - dt.timedelta(hours=1), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                     crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    files = CertFiles(folder / "ca.crt", folder / "server.pem", folder / "server.key",
                      tuple(node_key_path(folder, i) for i in range(nodes)))
    _write(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(folder / "ca.key", _pem_key(ca_key), private=True)
    _write(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    _write(files.server_key, _pem_key(server_key), private=True)
    for path in files.node_keys:
        write_node_key(path)
    return files


def write_node_key(path: str | Path) -> Path:
    """One SuperNode key pair: `path` (private, OpenSSH) and `path`.pub (public, OpenSSH).
    P-384, because Flower accepts only NIST curves for SuperNode keys."""
    path = Path(path)
    key = ec.generate_private_key(ec.SECP384R1())
    _write(path, key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()), private=True)
    _write(path.with_name(path.name + ".pub"), key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return path


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--host", action="append", default=[],
                        help="a name or IP the SuperNodes use to reach the SuperLink "
                             "(repeatable; loopback is always included)")
    parser.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs to make")
    parser.add_argument("--days", type=int, default=365, help="certificate lifetime")
    args = parser.parse_args(argv)
    files = write_certs(args.folder, args.host, args.nodes, args.days)
    print(f"wrote {files.ca_cert}, {files.server_cert}, {files.server_key} and "
          f"{len(files.node_keys)} SuperNode key pairs in {args.folder}")


if __name__ == "__main__":
    main()
