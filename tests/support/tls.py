"""A throwaway certificate authority, and a real ``docker-registry`` that speaks HTTPS with it.

Why our own CA: the TLS tests must show that imagefs trusts exactly what it is told to (a
``--ca-file``, a ``--cert-dir``), refuses what it is not, and presents a client certificate
when a registry demands one. :mod:`cryptography` makes the certificates in milliseconds (EC
P-256), so every test session gets fresh ones and nothing is checked in.

Why ``127.0.0.2``: imagefs talks plain HTTP to ``127.0.0.1`` and ``localhost`` (as Docker treats
a registry on this machine); any other loopback address gets HTTPS like a remote registry.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .registry import START_TIMEOUT, Registry, RegistryError

__all__ = ["CA", "Issued", "TLSFront", "TLSRegistry", "TLS_HOST"]

#: A loopback address imagefs does not treat as "this machine", so it uses HTTPS.
TLS_HOST = "127.0.0.2"


@dataclass
class Issued:
    """A certificate and its private key, as PEM, plus the objects for signing with the key."""

    cert: x509.Certificate
    key: Any = field(repr=False)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def write(self, cert_path: Path, key_path: Path) -> tuple[Path, Path]:
        cert_path.write_bytes(self.cert_pem)
        key_path.write_bytes(self.key_pem)
        key_path.chmod(0o600)
        return cert_path, key_path


class CA:
    """A self-signed root that issues server, client and signing certificates."""

    def __init__(self, name: str = "imagefs test CA") -> None:
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.root = Issued(cert, self._key)

    @property
    def cert_pem(self) -> bytes:
        return self.root.cert_pem

    def write_cert(self, path: Path) -> Path:
        path.write_bytes(self.cert_pem)
        return path

    def issue(self, common_name: str, *, ips: tuple[str, ...] = (), dns: tuple[str, ...] = (),
              usage: str = "server", rsa_key: bool = False) -> Issued:
        """A leaf for ``usage`` ``"server"``, ``"client"`` or ``"signing"`` (an RSA key for RS256 JWTs)."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048) if rsa_key else ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.root.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
        )
        names = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips] + [x509.DNSName(d) for d in dns]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        if usage == "server":
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        elif usage == "client":
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        return Issued(builder.sign(self._key, hashes.SHA256()), key)


class TLSRegistry(Registry):
    """A :class:`Registry` on ``https://127.0.0.2:PORT`` with a certificate from ``ca``.

    ``client_ca`` makes the registry demand a client certificate issued by it (distribution's
    ``http.tls.clientcas``).
    """

    def __init__(self, workdir: Path, ca: CA, *, client_ca: CA | None = None,
                 extra_config: Mapping[str, Any] | None = None, **kw: Any) -> None:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        cert, key = ca.issue(TLS_HOST, ips=(TLS_HOST,)).write(workdir / "server.crt", workdir / "server.key")
        self.ca_path = ca.write_cert(workdir / "ca.pem")
        tls: dict[str, Any] = {"certificate": str(cert), "key": str(key)}
        if client_ca is not None:
            tls["clientcas"] = [str(client_ca.write_cert(workdir / "client-ca.pem"))]
        self._client_ca = client_ca
        config = {"http": {"tls": tls}}
        for k, v in (extra_config or {}).items():
            config[k] = v if k != "http" else {**v, "tls": tls}
        super().__init__(workdir, extra_config=config, **kw)

    @property
    def host(self) -> str:
        return f"{TLS_HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"https://{self.host}"

    def _wait_ready(self) -> None:
        # The base class polls plain HTTP; this one polls HTTPS, trusting the test CA and, where
        # the registry demands one, presenting a client certificate of its own.
        assert self._proc is not None
        ctx = ssl.create_default_context(cafile=str(self.ca_path))
        if self._client_ca is not None:
            probe = self._client_ca.issue("readiness probe", usage="client")
            ctx.load_cert_chain(*map(str, probe.write(self.workdir / "probe.cert", self.workdir / "probe.key")))
        deadline = time.monotonic() + START_TIMEOUT
        last = "no attempt"
        with httpx.Client(timeout=1.0, trust_env=False, verify=ctx) as client:
            while True:
                if self._proc.poll() is not None:
                    raise RegistryError(f"docker-registry exited during startup; log tail:\n{self.log_tail()}")
                try:
                    resp = client.get(f"{self.url}/v2/")
                except httpx.HTTPError as exc:
                    last = repr(exc)
                else:
                    if "docker-distribution-api-version" in resp.headers:
                        return
                    last = f"HTTP {resp.status_code}"
                if time.monotonic() > deadline:
                    raise RegistryError(f"TLS registry on {self.host} not ready: {last}; log tail:\n{self.log_tail()}")
                time.sleep(0.02)


class TLSFront:
    """HTTPS on ``TLS_HOST`` in front of a plain-HTTP address (say, the fault :class:`Proxy`), so
    its faults — a stalled answer, a cut body — reach a client over TLS as they would from a real
    HTTPS registry. Each connection is decrypted here and relayed byte for byte."""

    def __init__(self, upstream: str, ca: CA) -> None:
        self.upstream = upstream  # host:port
        self._server = ca.issue(TLS_HOST, ips=(TLS_HOST,))
        self._sock: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stall_next: int | None = None
        self._closing = threading.Event()

    def stall_next_connection(self, after: int) -> None:
        """The next connection opened relays ``after`` bytes of its answers (head included), then
        nothing more, holding the connection open: a registry that hangs mid-body."""
        self._stall_next = after

    @property
    def host(self) -> str:
        assert self._sock is not None
        return f"{TLS_HOST}:{self._sock.getsockname()[1]}"

    def __enter__(self) -> "TLSFront":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with tempfile.TemporaryDirectory() as d:
            cert, key = self._server.write(Path(d) / "front.crt", Path(d) / "front.key")
            ctx.load_cert_chain(cert, key)
        self._sock = socket.create_server((TLS_HOST, 0))
        threading.Thread(target=self._accept, args=(ctx, self._sock), daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._closing.set()
        if self._sock is not None:
            self._sock.close()
        with self._lock:
            for s in self._open:
                s.close()

    def _accept(self, ctx: ssl.SSLContext, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._relay, args=(ctx, conn), daemon=True).start()

    def _relay(self, ctx: ssl.SSLContext, conn: socket.socket) -> None:
        try:
            client = ctx.wrap_socket(conn, server_side=True)
            host, _, port = self.upstream.rpartition(":")
            up = socket.create_connection((host, int(port)))
        except OSError:
            conn.close()
            return
        with self._lock:
            self._open |= {client, up}
            stall, self._stall_next = self._stall_next, None
        threading.Thread(target=self._pump, args=(up, client, stall), daemon=True).start()
        self._pump(client, up)

    def _pump(self, src: socket.socket, dst: socket.socket, stall: int | None = None) -> None:
        try:
            while data := src.recv(65536):
                if stall is not None and len(data) >= stall:
                    dst.sendall(data[:stall])
                    self._closing.wait()  # hang, connection open, until the front closes
                    return
                dst.sendall(data)
                if stall is not None:
                    stall -= len(data)
        except OSError:
            pass
        finally:  # one side ended: end both, as a proxy does
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass
