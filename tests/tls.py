"""A Redis that speaks TLS only, with a certificate of a test CA, and a second CA it does not chain to."""

import datetime
import ipaddress
import secrets
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import free_port


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _cert(subject: str, key, issuer: str, issuer_key, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key=None) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        key_path = path.with_suffix(".key")
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        key_path.chmod(0o600)
    return path


@dataclass(frozen=True)
class TlsRedis:
    port: int
    password: str
    ca: Path  # the server's certificate chains to it
    wrong_ca: Path  # ... and not to this one

    def url(self) -> str:
        return f"rediss://:{self.password}@127.0.0.1:{self.port}/0"


@contextmanager
def tls_redis(root: Path) -> Iterator[TlsRedis]:
    """A throwaway redis-server on a TLS port only (no plain port), certified for 127.0.0.1."""
    keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in ("ca", "wrong", "server")}
    ca = _write(root / "ca.pem", _cert("opsync test CA", keys["ca"], "opsync test CA", keys["ca"], ca=True))
    wrong = _write(root / "wrong-ca.pem", _cert("another CA", keys["wrong"], "another CA", keys["wrong"], ca=True))
    server = _write(root / "server.pem", _cert("127.0.0.1", keys["server"], "opsync test CA", keys["ca"], ca=False), keys["server"])
    port, password = free_port(), secrets.token_urlsafe(16)
    command = ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    command += ["--tls-cert-file", str(server), "--tls-key-file", str(server.with_suffix(".key")), "--tls-ca-cert-file", str(ca)]
    command += ["--tls-auth-clients", "no", "--requirepass", password, "--dir", str(root)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(host="127.0.0.1", port=port, password=password, ssl=True, ssl_ca_certs=str(ca), retry=None)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, "the TLS redis-server did not start"
                time.sleep(0.05)
        client.close()
        yield TlsRedis(port, password, ca, wrong)
    finally:
        proc.terminate()
        proc.wait(10)
