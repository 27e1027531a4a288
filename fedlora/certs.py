"""`fedlora-certs`: the keys a Flower deployment needs, made with the `cryptography` package.

    fedlora-certs tls --hosts server.lan,10.0.0.5 -o certs
        a certificate authority (ca.crt, ca.key) and a SuperLink certificate signed by it
        (server.pem, server.key) valid for the given host names and IP addresses; 127.0.0.1 and
        localhost are always added. The SuperLink gets server.pem, server.key and ca.crt; each
        SuperNode and each `flwr` user gets ca.crt only. ca.key signs nothing else: keep it offline.

    fedlora-certs node-keys --names jetson-1,jetson-2 -o keys
        for SuperNode authentication: an OpenSSH private key per node (give it to that node's
        `flower-supernode --auth-supernode-private-key`) and its public key (NAME.pub, which
        `flwr supernode register NAME.pub CONNECTION` registers with a SuperLink started with
        `--enable-supernode-auth`). The curve is NIST P-384, as Flower asks.

Existing files are never overwritten unless --force is given; private keys are written mode 0600.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ALWAYS_HOSTS = ("127.0.0.1", "localhost")


class CertError(Exception):
    pass


def _subject_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, *ALWAYS_HOSTS]):  # in order, without repeats
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c.isspace() or c in "/:," for c in host):
                raise CertError(f"'{host}' is neither an IP address nor a host name") from None
            names.append(x509.DNSName(host))
    return names


def _write(path: Path, data: bytes, private: bool) -> None:
    # created 0600 from the start: a private key is never readable by others, not even briefly
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_tls(hosts: list[str], out: Path, days: int = 365, force: bool = False) -> dict[str, Path]:
    """A CA and a server certificate for `hosts` (plus 127.0.0.1 and localhost) in `out`; the paths
    written, by role."""
    if days < 1:
        raise CertError("--days must be at least 1")
    names = _subject_names(hosts)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora deployment CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    first = names[0].value
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(first))]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    paths = {"ca": out / "ca.crt", "ca_key": out / "ca.key", "cert": out / "server.pem", "key": out / "server.key"}
    for path in paths.values():
        if path.exists() and not force:
            raise CertError(f"{path} exists; pass --force to replace it")
    _write(paths["ca_key"], _pem_key(ca_key), True)
    _write(paths["ca"], ca_cert.public_bytes(serialization.Encoding.PEM), False)
    _write(paths["key"], _pem_key(server_key), True)
    _write(paths["cert"], server_cert.public_bytes(serialization.Encoding.PEM), False)
    return paths


def make_node_keys(names: list[str], out: Path, force: bool = False) -> dict[str, tuple[Path, Path]]:
    """An OpenSSH P-384 key pair per SuperNode name: {name: (private key, public key)}."""
    if not names or any(not n or "/" in n or n.startswith(".") for n in names):
        raise CertError(f"node names must be non-empty file names, got {names}")
    out.mkdir(parents=True, exist_ok=True)
    pairs = {n: (out / n, out / f"{n}.pub") for n in names}
    for path in (p for pair in pairs.values() for p in pair):
        if path.exists() and not force:
            raise CertError(f"{path} exists; pass --force to replace it")
    for name, (private, public) in pairs.items():
        key = ec.generate_private_key(ec.SECP384R1())
        _write(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()), True)
        pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(public, pub + f" {name}\n".encode(), False)
    return pairs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedlora-certs", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    sub = parser.add_subparsers(dest="command", required=True)
    tls = sub.add_parser("tls", help="a CA and a SuperLink certificate for the given hosts")
    tls.add_argument("--hosts", required=True,
                     help="comma-separated host names and IP addresses the SuperLink is reached at")
    tls.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    keys = sub.add_parser("node-keys", help="SuperNode authentication key pairs")
    keys.add_argument("--names", required=True, help="comma-separated SuperNode names")
    for p in (tls, keys):
        p.add_argument("-o", "--out", type=Path, required=True, help="folder to write into")
        p.add_argument("--force", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    try:
        if args.command == "tls":
            paths = make_tls(split(args.hosts), args.out, args.days, args.force)
            print(f"SuperLink: --ssl-certfile {paths['cert']} --ssl-keyfile {paths['key']} "
                  f"--ssl-ca-certfile {paths['ca']}")
            print(f"SuperNodes: --root-certificates {paths['ca']}; flwr: root-certificates = \"{paths['ca'].resolve()}\"")
            print(f"Keep {paths['ca_key']} offline: it can sign certificates that every node trusts.")
        else:
            for name, (private, public) in make_node_keys(split(args.names), args.out, args.force).items():
                print(f"{name}: flwr supernode register {public} CONNECTION; "
                      f"flower-supernode --auth-supernode-private-key {private}")
    except (CertError, OSError) as e:
        print(f"fedlora-certs: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
