"""TLS certificates for a SuperLink and authentication keys for SuperNodes.

Writes, into one folder:

- `ca.crt` / `ca.key`: a private certificate authority (keep `ca.key` off the nodes);
- `server.pem` / `server.key`: the SuperLink's certificate, signed by the CA, valid for
  `localhost`, `127.0.0.1`, `::1` and every `--host` given;
- `node-<i>` / `node-<i>.pub`: one ECDSA P-384 key pair per SuperNode in OpenSSH format,
  the form `flower-supernode --auth-supernode-private-key` and `flwr supernode register`
  read;
- `node-<i>.crt` / `node-<i>.key`: the node's TLS client certificate (the same key, PEM),
  signed by the CA for client use only: the Fleet gateway refuses a TLS handshake without
  one (`fedtune.deploy.fleet_gateway`).

Counts and lifetimes are bounded (`MAX_NODES`, `MAX_DAYS`): `--nodes 10**21` filled a
disk and `--days 1e9` overflowed the date arithmetic.

Run `python -m fedtune.deploy.certs DIR --host HOST --nodes N` (or `fedtune deploy certs`).

Existing files are never replaced unless `force` is given (a replaced CA silently cuts off
every node that trusts the old one), no file is written through a symlink (each is created
with O_EXCL | O_NOFOLLOW; `force` removes the old entry, link or file, first), and private
keys are created 0600, never readable by others even for an instant.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
PRIVATE_MODE, PUBLIC_MODE = 0o600, 0o644
MAX_NODES = 10_000  # key pairs per call (a few KB each)
MAX_DAYS = 3_650    # ten years; far past it the date arithmetic overflows


class CertsError(ValueError):
    """A certificate or key file cannot be written; the message names it."""


@dataclass(frozen=True)
class CertFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]  # private keys; the public key is the same path + ".pub"


def node_key_path(folder: Path, index: int) -> Path:
    return folder / f"node-{index}"


def node_cert_paths(private_key: Path) -> tuple[Path, Path]:
    """The TLS client certificate and its PEM key next to a node's OpenSSH key."""
    return (private_key.with_name(private_key.name + ".crt"),
            private_key.with_name(private_key.name + ".key"))


def check_counts(nodes: int, days: int) -> None:
    """One line naming the argument and its range, for either CLI."""
    if isinstance(nodes, bool) or not isinstance(nodes, int) or not 0 <= nodes <= MAX_NODES:
        raise CertsError(f"--nodes must be an integer in [0, {MAX_NODES}], got {nodes!r}")
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise CertsError(f"--days must be an integer in [1, {MAX_DAYS}], got {days!r}")


def write_certs(folder: str | Path, hosts: Sequence[str] = (), nodes: int = 2,
                days: int = 365, force: bool = False) -> CertFiles:
    """Create the CA, the SuperLink's certificate for `hosts` (plus loopback) and `nodes`
    SuperNode key pairs in `folder`. If any of these files exists, nothing is written and a
    CertsError names them, unless `force` (then each is replaced)."""
    check_counts(nodes, days)
    folder = Path(folder)
    files = CertFiles(folder / "ca.crt", folder / "server.pem", folder / "server.key",
                      tuple(node_key_path(folder, i) for i in range(nodes)))
    targets = [files.ca_cert, folder / "ca.key", files.server_cert, files.server_key]
    for key in files.node_keys:
        targets += [key, _public_path(key), *node_cert_paths(key)]
    if not force:
        _refuse_existing(targets)
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

    _write(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), force)
    _write(folder / "ca.key", _pem_key(ca_key), force, private=True)
    _write(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), force)
    _write(files.server_key, _pem_key(server_key), force, private=True)
    for path in files.node_keys:
        write_node_key(path, force, ca=(ca_cert, ca_key), days=days)
    return files


def load_ca(folder: str | Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA that `write_certs` left in `folder` (to issue more node certificates)."""
    folder = Path(folder)
    cert = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def write_node_key(path: str | Path, force: bool = False,
                   ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
                   days: int = 365) -> Path:
    """One SuperNode key pair: `path` (private, OpenSSH) and `path`.pub (public, OpenSSH),
    and with `ca` its TLS client certificate `path`.crt + `path`.key (PEM). P-384, because
    Flower accepts only NIST curves for SuperNode keys. An existing file is a CertsError
    unless `force`."""
    path = Path(path)
    cert_path, pem_key_path = node_cert_paths(path)
    if not force:
        _refuse_existing([path, _public_path(path),
                          *((cert_path, pem_key_path) if ca is not None else ())])
    key = ec.generate_private_key(ec.SECP384R1())
    if ca is not None:
        _write(cert_path, _client_cert(key, path.name, ca, days), force)
        _write(pem_key_path, _pem_key(key), force, private=True)
    _write(path, key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()), force, private=True)
    _write(_public_path(path), key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n", force)
    return path


def _client_cert(key: ec.EllipticCurvePrivateKey, name: str,
                 ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], days: int) -> bytes:
    ca_cert, ca_key = ca
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _public_path(private: Path) -> Path:
    return private.with_name(private.name + ".pub")


def _refuse_existing(paths: Sequence[Path]) -> None:
    existing = [str(p) for p in paths if os.path.lexists(p)]  # a dangling link counts
    if existing:
        raise CertsError(f"refusing to overwrite {', '.join(existing)}; nodes may trust or use "
                         "them (choose another folder, or pass --force to replace them)")


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, force: bool, private: bool = False) -> None:
    """Create `path` as a new file (O_EXCL: never through a symlink, never into an existing
    file) with its final mode from the first byte on; `force` unlinks an old entry first
    (unlinking a symlink removes the link, not its target)."""
    if force:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise CertsError(f"cannot replace {path}: {exc.strerror}") from None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, PRIVATE_MODE if private else PUBLIC_MODE)
    except FileExistsError:
        raise CertsError(f"{path} appeared while the certificates were being written; "
                         "nothing in it was followed or replaced") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--host", action="append", default=[],
                        help="a name or IP the SuperNodes use to reach the SuperLink "
                             "(repeatable; loopback is always included)")
    parser.add_argument("--nodes", type=int, default=2,
                        help=f"SuperNode key pairs to make (0-{MAX_NODES})")
    parser.add_argument("--days", type=int, default=365,
                        help=f"certificate lifetime (1-{MAX_DAYS})")
    parser.add_argument("--force", action="store_true",
                        help="replace existing certificate and key files")
    args = parser.parse_args(argv)
    try:
        files = write_certs(args.folder, args.host, args.nodes, args.days, args.force)
    except CertsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {files.ca_cert}, {files.server_cert}, {files.server_key} and "
          f"{len(files.node_keys)} SuperNode key pairs in {args.folder}")


if __name__ == "__main__":
    main()
