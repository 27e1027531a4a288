"""`fedlora-certs`: what it writes is what Flower and TLS need, and it never clobbers keys."""

import ipaddress
import stat
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from fedlora.certs import make_node_keys, make_tls

CLI = str(Path(sys.executable).with_name("fedlora-certs"))


def test_the_server_certificate_is_signed_by_the_ca_for_every_host(tmp_path):
    paths = make_tls(["server.lan", "10.0.0.5"], tmp_path)
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    server = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
    server.verify_directly_issued_by(ca)  # raises when the signature or issuer do not match
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["server.lan", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5"),
                                                       ipaddress.ip_address("127.0.0.1")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in ("ca_key", "key"):
        assert stat.S_IMODE(paths[key].stat().st_mode) == 0o600


def test_node_keys_are_p384_openssh_pairs_that_flower_accepts(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    (private, public), = make_node_keys(["jetson-1"], tmp_path).values()
    key = load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ") and public.read_text().strip().endswith("jetson-1")
    assert try_load_public_key(public)  # what `flwr supernode register` reads


def test_the_command_refuses_to_overwrite_and_bad_hosts(tmp_path):
    ok = subprocess.run([CLI, "tls", "--hosts", "server.lan", "-o", str(tmp_path)], capture_output=True, text=True)
    assert ok.returncode == 0 and "--ssl-certfile" in ok.stdout
    before = (tmp_path / "ca.key").read_bytes()
    again = subprocess.run([CLI, "tls", "--hosts", "server.lan", "-o", str(tmp_path)], capture_output=True, text=True)
    assert again.returncode == 2 and "exists; pass --force" in again.stderr and "Traceback" not in again.stderr
    assert (tmp_path / "ca.key").read_bytes() == before
    forced = subprocess.run([CLI, "tls", "--hosts", "server.lan", "-o", str(tmp_path), "--force"], capture_output=True)
    assert forced.returncode == 0 and (tmp_path / "ca.key").read_bytes() != before
    bad = subprocess.run([CLI, "tls", "--hosts", "http://server", "-o", str(tmp_path / "x")], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "neither an IP address nor a host name" in bad.stderr
