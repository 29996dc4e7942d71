"""TLS, mutual TLS, bearer tokens (with rotation) and the Python client, on real gateway processes and real
in-process gRPC servers. Every certificate is made here with ``cryptography``."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import logging
import os
import secrets
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ner_gateway.client import AsyncNerClient, NerClient, target
from ner_gateway.core.errors import ConfigurationError
from ner_gateway.net import free_port
from ner_gateway.pb.ner.v1 import ner_pb2, ner_pb2_grpc
from ner_gateway.settings import GatewaySettings
from ner_gateway.transport.auth import BearerTokens
from ner_gateway.transport.tls import RotatingCertificate, add_port, is_loopback

from conftest import GatewayProcess, stop_process

TEXT = "Angela Merkel visited Paris"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED

# --- certificates -----------------------------------------------------------------------------------------


@dataclass
class Pem:
    key: bytes
    cert: bytes

    def write(self, folder: Path, name: str) -> tuple[Path, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.key").write_bytes(self.key)
        (folder / f"{name}.crt").write_bytes(self.cert)
        return folder / f"{name}.crt", folder / f"{name}.key"


class CA:
    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (self._builder(self.name, self.key.public_key())
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def _builder(self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(self.name).public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1)))

    def issue(self, name: str, server: bool) -> Pem:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = self._builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key.public_key())
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        builder = builder.add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return Pem(key_pem, cert.public_bytes(serialization.Encoding.PEM))


@dataclass
class Pki:
    folder: Path
    ca: CA
    server: Pem
    client: Pem
    foreign_client: Pem  # signed by a CA the gateway does not trust

    def credentials(self, ca: bytes | None = None, client: Pem | None = None) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(ca or self.ca.pem, client.key if client else None,
                                            client.cert if client else None)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca, other = CA("ner test CA"), CA("some other CA")
    pki = Pki(tmp_path_factory.mktemp("pki"), ca, ca.issue("ner-gateway", server=True),
              ca.issue("backend", server=False), other.issue("intruder", server=False))
    (pki.folder / "ca.crt").write_bytes(ca.pem)
    (pki.folder / "untrusted-ca.crt").write_bytes(other.pem)
    pki.client.write(pki.folder, "client")
    pki.foreign_client.write(pki.folder, "intruder")
    return pki


def channel(address: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    # A subchannel pool of its own: a new channel makes a new connection (and handshake), never borrows one.
    options = [("grpc.use_local_subchannel_pool", 1)]
    return (grpc.secure_channel(address, credentials, options) if credentials
            else grpc.insecure_channel(address, options))


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def recognize(address: str, credentials: grpc.ChannelCredentials | None, metadata=()) -> ner_pb2.RecognizeResponse:
    with channel(address, credentials) as ch:
        return ner_pb2_grpc.NerServiceStub(ch).Recognize(ner_pb2.RecognizeRequest(texts=[TEXT]), timeout=10,
                                                         metadata=metadata)


def refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def eventually(check: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "not within the time limit"
        time.sleep(0.2)


# --- raw TLS, with Python's ssl module: what the gateway's port does in the handshake itself ------------------

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS_FRAME = 0x04


def tls12_handshake(address: str, ca_file: Path, client: tuple[Path, Path] | None = None) -> bytes:
    """A TLS 1.2 handshake (ALPN h2) against ``address`` that verifies the server's certificate for the address,
    then the header of the server's first HTTP/2 frame (the server preface: SETTINGS). TLS 1.2, so that the
    server's verdict on the client's certificate falls inside the handshake (with TLS 1.3 the client finishes
    first). gRPC's server sends no TLS alert when it refuses (its log says why): it closes the connection."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    if client is not None:
        context.load_cert_chain(*client)
    with (socket.create_connection((host, int(port)), timeout=10) as raw,
          context.wrap_socket(raw, server_hostname=host, suppress_ragged_eofs=False) as tls):
        assert (tls.version(), tls.selected_alpn_protocol()) == ("TLSv1.2", "h2")
        assert tls.getpeercert()["subject"] == ((("commonName", "ner-gateway"),),)
        header = b""
        while len(header) < 9:
            chunk = tls.recv(9 - len(header))
            assert chunk, f"connection closed after {header!r}"
            header += chunk
        return header


def assert_hung_up_in_the_handshake(address: str, ca_file: Path, client: tuple[Path, Path] | None = None) -> None:
    """The port accepted the TCP connection and presented the gateway's certificate (verified: TLS 1.2 checks it
    before the client's reply), then closed the connection inside the handshake: SSLEOFError (or a reset, when
    the client's flight was still unread). A dead gateway would give ConnectionRefusedError instead."""
    with pytest.raises((ssl.SSLEOFError, ConnectionResetError)) as info:
        tls12_handshake(address, ca_file, client)
    if isinstance(info.value, ssl.SSLEOFError):
        assert info.value.reason == "UNEXPECTED_EOF_WHILE_READING", info.value


def handshake_failures(gateway: GatewayProcess, reason: str) -> int:
    """The gateway's gRPC core logs each refused handshake with OpenSSL's reason (GRPC_VERBOSITY=INFO)."""
    return sum(1 for line in gateway.output().splitlines() if "Handshake failed" in line and reason in line)


def server_refused_for(gateway: GatewayProcess, reason: str, before: int, attempts: int) -> None:
    """``attempts`` more handshakes refused for ``reason`` on the gateway's side since ``before`` was counted."""
    eventually(lambda: handshake_failures(gateway, reason) >= before + attempts)


@contextlib.contextmanager
def served_meanwhile(gateway: GatewayProcess, credentials: grpc.ChannelCredentials,
                     metadata: Sequence[tuple[str, str]] = ()) -> Iterator[None]:
    """A correctly configured client of the same gateway process: answered before, then after the block on the
    same connection and on a new one, the process never having stopped."""
    request = ner_pb2.RecognizeRequest(texts=[TEXT])
    with channel(gateway.address, credentials) as ch:
        stub = ner_pb2_grpc.NerServiceStub(ch)
        assert len(stub.Recognize(request, timeout=10, metadata=metadata).documents) == 1
        yield
        assert len(stub.Recognize(request, timeout=10, metadata=metadata).documents) == 1
    assert len(recognize(gateway.address, credentials, metadata).documents) == 1
    assert gateway.process.poll() is None


# --- the gateways -----------------------------------------------------------------------------------------


@dataclass
class Secured:
    gateway: GatewayProcess
    tokens_file: Path
    valid: str
    retiring: str
    metrics_port: int


def write_atomically(path: Path, text: str) -> None:
    """As a Kubernetes Secret update does: the new content appears at once, never half written."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# gRPC core logs a refused TLS handshake with its reason at INFO: set, whatever the environment says.
GRPC_CORE_INFO = {"GRPC_VERBOSITY": "INFO"}


@pytest.fixture(scope="module")
def secured(start_gateway, tiny_repository: Path, pki: Pki) -> Iterator[Secured]:
    """Mutual TLS and a token file (DEBUG logs, so that the log check sees the most)."""
    valid, retiring = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    tokens_file = pki.folder / "tokens"
    write_atomically(tokens_file, f"# accepted bearer tokens\n\n{valid}\n  {retiring}  \n")
    cert, key = pki.server.write(pki.folder / "secured", "server")
    metrics_port = free_port()
    env = {"NER_TLS_CERT_FILE": str(cert), "NER_TLS_KEY_FILE": str(key),
           "NER_TLS_CLIENT_CA_FILE": str(pki.folder / "ca.crt"), "NER_AUTH_TOKENS_FILE": str(tokens_file),
           "NER_LOG_LEVEL": "DEBUG", "NER_METRICS_PORT": str(metrics_port), **GRPC_CORE_INFO}
    gateway = start_gateway(tiny_repository, env=env, credentials=pki.credentials(client=pki.client))
    yield Secured(gateway, tokens_file, valid, retiring, metrics_port)
    stop_process(gateway.process)


ENV_TOKENS = (secrets.token_urlsafe(24), secrets.token_urlsafe(24))


@pytest.fixture(scope="module")
def tls_only(start_gateway, tiny_repository: Path, pki: Pki) -> Iterator[GatewayProcess]:
    """Server TLS (no client certificates), tokens from the environment, reflection exempt."""
    cert, key = pki.server.write(pki.folder / "tls-only", "server")
    env = {"NER_TLS_CERT_FILE": str(cert), "NER_TLS_KEY_FILE": str(key), "NER_AUTH_TOKENS": ",".join(ENV_TOKENS),
           "NER_AUTH_EXEMPT_REFLECTION": "true", **GRPC_CORE_INFO}
    gateway = start_gateway(tiny_repository, env=env, credentials=pki.credentials())
    yield gateway
    stop_process(gateway.process)


# --- TLS --------------------------------------------------------------------------------------------------


def test_tls_call_ok_through_the_client(tls_only: GatewayProcess, pki: Pki) -> None:
    with NerClient(tls_only.address, ca_file=pki.folder / "ca.crt", token=ENV_TOKENS[1]) as client:
        response = client.recognize([TEXT], aggregation="first", offset_unit="utf16_code_unit")
        assert len(response.documents) == 1
        assert [m.name for m in client.list_models().models] == ["tiny"]
        assert client.health().status == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_client_against_tls_server_fails(tls_only: GatewayProcess, pki: Pki) -> None:
    host, port = tls_only.address.rsplit(":", 1)
    before = handshake_failures(tls_only, "WRONG_VERSION_NUMBER")
    with served_meanwhile(tls_only, pki.credentials(), bearer(ENV_TOKENS[0])):
        # HTTP/2 in plaintext: the port takes the connection, and hangs up where a plaintext server sends SETTINGS.
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            raw.sendall(HTTP2_PREFACE + bytes([0, 0, 0, SETTINGS_FRAME, 0, 0, 0, 0, 0]))
            try:
                answer = raw.recv(9)
            except ConnectionResetError:
                answer = b""
        assert answer == b""
        error = refused(lambda: recognize(tls_only.address, None, bearer(ENV_TOKENS[0])))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "Connection refused" not in error.details(), error.details()
        # The gateway's side: bytes that are not a TLS record, for both clients.
        server_refused_for(tls_only, "WRONG_VERSION_NUMBER", before, 2)


def test_client_that_does_not_trust_the_server_fails(tls_only: GatewayProcess, pki: Pki) -> None:
    with served_meanwhile(tls_only, pki.credentials(), bearer(ENV_TOKENS[0])):
        with pytest.raises(ssl.SSLCertVerificationError) as info:
            tls12_handshake(tls_only.address, pki.folder / "untrusted-ca.crt")
        assert (info.value.verify_code, info.value.verify_message) == (20, "unable to get local issuer certificate")
        error = refused(lambda: recognize(tls_only.address, grpc.ssl_channel_credentials(CA("untrusted").pem),
                                          bearer(ENV_TOKENS[0])))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "Tls handshake failed" in error.details(), error.details()
        assert "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate" in error.details()


def test_mtls_client_without_certificate_is_refused(secured: Secured, pki: Pki) -> None:
    gateway, reason = secured.gateway, "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    before = handshake_failures(gateway, reason)
    with served_meanwhile(gateway, pki.credentials(client=pki.client), bearer(secured.valid)):
        assert_hung_up_in_the_handshake(gateway.address, pki.folder / "ca.crt")
        error = refused(lambda: recognize(gateway.address, pki.credentials(), bearer(secured.valid)))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "Connection refused" not in error.details(), error.details()
        server_refused_for(gateway, reason, before, 2)  # the raw handshake's and the gRPC client's


def test_mtls_client_certificate_from_another_ca_is_refused(secured: Secured, pki: Pki) -> None:
    gateway, reason = secured.gateway, "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate"
    before = handshake_failures(gateway, reason)
    with served_meanwhile(gateway, pki.credentials(client=pki.client), bearer(secured.valid)):
        intruder = (pki.folder / "intruder.crt", pki.folder / "intruder.key")
        assert_hung_up_in_the_handshake(gateway.address, pki.folder / "ca.crt", intruder)
        credentials = pki.credentials(client=pki.foreign_client)
        error = refused(lambda: recognize(gateway.address, credentials, bearer(secured.valid)))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "Connection refused" not in error.details(), error.details()
        server_refused_for(gateway, reason, before, 2)


def test_mtls_client_with_the_right_certificate(secured: Secured, pki: Pki) -> None:
    credentials = pki.credentials(client=pki.client)
    assert len(recognize(secured.gateway.address, credentials, bearer(secured.valid)).documents) == 1
    # The raw handshake that the refusals above fail gets through with the CA's client certificate: TLS, then
    # the gateway's HTTP/2 SETTINGS.
    header = tls12_handshake(secured.gateway.address, pki.folder / "ca.crt",
                             (pki.folder / "client.crt", pki.folder / "client.key"))
    assert header[3] == SETTINGS_FRAME


def test_certificate_rotation_without_restart(tls_only: GatewayProcess, pki: Pki) -> None:
    """New files (another CA, another serial) are served to new connections; the old ones come back after."""
    folder = pki.folder / "tls-only"
    original = Pem((folder / "server.key").read_bytes(), (folder / "server.crt").read_bytes())
    rotated_ca = CA("rotated CA")
    old_trust, new_trust = pki.credentials(), pki.credentials(ca=rotated_ca.pem)

    def serves(credentials: grpc.ChannelCredentials) -> bool:
        with channel(tls_only.address, credentials) as ch:
            try:
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
                return True
            except grpc.RpcError:
                return False

    try:
        rotated_ca.issue("ner-gateway", server=True).write(folder, "server")  # in place, one file after the other
        eventually(lambda: serves(new_trust))
        assert not serves(old_trust)
        assert tls_only.process.poll() is None  # the same process
        assert "TLS certificate reloaded from" in tls_only.output()
    finally:
        original.write(folder, "server")
    eventually(lambda: serves(old_trust))
    assert not serves(new_trust)


# --- bearer tokens ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("metadata", [(), (("authorization", "Basic dXNlcjpwdw=="),), (("authorization", "Bearer "),)])
def test_missing_or_malformed_token_is_unauthenticated(secured: Secured, pki: Pki, metadata) -> None:
    error = refused(lambda: recognize(secured.gateway.address, pki.credentials(client=pki.client), metadata))
    assert error.code() == UNAUTHENTICATED
    assert error.details() == "missing bearer token: send 'authorization: Bearer <token>'"


def test_wrong_token_is_unauthenticated(secured: Secured, pki: Pki) -> None:
    wrong = secured.valid[:-1] + ("A" if secured.valid[-1] != "A" else "B")
    error = refused(lambda: recognize(secured.gateway.address, pki.credentials(client=pki.client), bearer(wrong)))
    assert (error.code(), error.details()) == (UNAUTHENTICATED, "bearer token not accepted")


def test_every_kind_of_rpc_is_guarded(secured: Secured, pki: Pki) -> None:
    with channel(secured.gateway.address, pki.credentials(client=pki.client)) as ch:
        stub = ner_pb2_grpc.NerServiceStub(ch)
        stream = stub.RecognizeStream(iter([ner_pb2.RecognizeRequest(texts=[TEXT])]), timeout=10)
        assert refused(lambda: list(stream)).code() == UNAUTHENTICATED
        assert refused(lambda: stub.ListModels(ner_pb2.ListModelsRequest(), timeout=10)).code() == UNAUTHENTICATED
        unknown = ch.unary_unary("/ner.v1.NerService/NoSuchMethod")
        assert refused(lambda: unknown(b"", timeout=10)).code() == UNAUTHENTICATED  # not UNIMPLEMENTED
        stream = stub.RecognizeStream(iter([ner_pb2.RecognizeRequest(texts=[TEXT])] * 2), timeout=10,
                                      metadata=bearer(secured.valid))
        assert len(list(stream)) == 2


def test_token_rotation_without_restart(secured: Secured, pki: Pki) -> None:
    credentials = pki.credentials(client=pki.client)
    newcomer = secrets.token_urlsafe(24)
    write_atomically(secured.tokens_file, f"{secured.valid}\n{newcomer}\n")

    def accepted(token: str) -> bool:
        try:
            recognize(secured.gateway.address, credentials, bearer(token))
            return True
        except grpc.RpcError as e:
            assert e.code() == UNAUTHENTICATED
            return False

    eventually(lambda: accepted(newcomer))
    assert not accepted(secured.retiring)
    assert accepted(secured.valid)


def test_token_from_the_environment(tls_only: GatewayProcess, pki: Pki) -> None:
    for token in ENV_TOKENS:
        assert len(recognize(tls_only.address, pki.credentials(), bearer(token)).documents) == 1
    assert refused(lambda: recognize(tls_only.address, pki.credentials())).code() == UNAUTHENTICATED


def test_health_needs_no_token(secured: Secured, pki: Pki) -> None:
    with channel(secured.gateway.address, pki.credentials(client=pki.client)) as ch:
        response = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def list_services(ch: grpc.Channel, metadata=()) -> list[str]:
    requests = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    response = next(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(requests, timeout=5,
                                                                                       metadata=metadata))
    return [s.name for s in response.list_services_response.service]


def test_reflection_needs_a_token_unless_exempt(secured: Secured, tls_only: GatewayProcess, pki: Pki) -> None:
    with channel(secured.gateway.address, pki.credentials(client=pki.client)) as ch:
        assert refused(lambda: list_services(ch)).code() == UNAUTHENTICATED
        assert "ner.v1.NerService" in list_services(ch, bearer(secured.valid))
    with channel(tls_only.address, pki.credentials()) as ch:  # NER_AUTH_EXEMPT_REFLECTION=true
        assert "ner.v1.NerService" in list_services(ch)


def test_tokens_never_appear_in_logs_or_metrics(secured: Secured, pki: Pki) -> None:
    credentials = pki.credentials(client=pki.client)
    wrong = secrets.token_urlsafe(24)
    recognize(secured.gateway.address, credentials, bearer(secured.valid))
    refused(lambda: recognize(secured.gateway.address, credentials, bearer(wrong)))
    refused(lambda: recognize(secured.gateway.address, credentials, (("authorization", wrong),)))
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{secured.metrics_port}/metrics", timeout=5).read().decode()
    log = secured.gateway.output()
    assert "DEBUG" in log and "refused /ner.v1.NerService/Recognize: rejected bearer token" in log
    for token in (secured.valid, secured.retiring, wrong):
        assert token not in log and token not in metrics
    counts = {reason: float(line.rsplit(" ", 1)[1]) for reason in ("rejected", "malformed")
              for line in metrics.splitlines() if line.startswith(f'ner_auth_failures_total{{reason="{reason}"}}')}
    assert counts["rejected"] >= 1 and counts["malformed"] >= 1


# --- the command line, against the mutual-TLS gateway -------------------------------------------------------


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("NER_CLIENT_")}
    return subprocess.run([str(Path(sys.executable).parent / "ner-gateway"), *args], capture_output=True,
                          text=True, timeout=60, env={**base, **(env or {})})


def test_cli_with_tls_and_a_token(secured: Secured, pki: Pki, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"{secured.valid}\n")
    tls = ["--address", secured.gateway.address, "--tls-ca", str(pki.folder / "ca.crt"),
           "--tls-cert", str(pki.folder / "client.crt"), "--tls-key", str(pki.folder / "client.key")]
    result = cli("query", *tls, "--token-file", str(token_file), TEXT)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["documents"]) == 1
    result = cli("models", *tls, env={"NER_CLIENT_TOKEN": secured.valid})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["models"][0]["name"] == "tiny"
    result = cli("query", *tls, TEXT)
    assert result.returncode == 1 and "UNAUTHENTICATED: missing bearer token" in result.stderr
    result = cli("health", *tls)
    assert (result.returncode, result.stdout.strip()) == (0, "SERVING")


# --- the client's retries and balancing, against real in-process servers ------------------------------------


class Flaky(ner_pb2_grpc.NerServiceServicer):
    """Fails with the given codes first, then answers; records each attempt's grpc-previous-rpc-attempts."""

    def __init__(self, failures: list[grpc.StatusCode] = ()) -> None:
        self.failures = list(failures)
        self.attempts: list[str | None] = []

    async def Recognize(self, request, context):  # type: ignore[no-untyped-def]
        self.attempts.append(dict(context.invocation_metadata()).get("grpc-previous-rpc-attempts"))
        if self.failures:
            await context.abort(self.failures.pop(0), "not now")
        return ner_pb2.RecognizeResponse(model="flaky", documents=[ner_pb2.Document()] * len(request.texts))


async def serve(servicer: Flaky) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    ner_pb2_grpc.add_NerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
async def test_client_retries_through_the_service_config(code: grpc.StatusCode) -> None:
    servicer = Flaky([code])
    server, address = await serve(servicer)
    try:
        with NerClient(address) as client:  # blocking: from a thread, the server runs on this loop
            response = await asyncio.to_thread(client.recognize, [TEXT])
        assert response.model == "flaky"
        assert servicer.attempts == [None, "1"]  # gRPC's own retry, which says so in its metadata
    finally:
        await server.stop(0)


async def test_client_gives_up_after_max_attempts_and_never_retries_other_codes() -> None:
    servicer = Flaky([grpc.StatusCode.UNAVAILABLE] * 5)
    server, address = await serve(servicer)
    try:
        async with AsyncNerClient(address, max_attempts=3) as client:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.recognize([TEXT])
            assert (info.value.code(), len(servicer.attempts)) == (grpc.StatusCode.UNAVAILABLE, 3)
            servicer.failures, servicer.attempts = [grpc.StatusCode.INVALID_ARGUMENT], []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.recognize([TEXT])
            assert (info.value.code(), servicer.attempts) == (grpc.StatusCode.INVALID_ARGUMENT, [None])
    finally:
        await server.stop(0)


async def test_client_balances_over_several_addresses() -> None:
    servicers = [Flaky(), Flaky()]
    servers = [await serve(s) for s in servicers]
    try:
        async with AsyncNerClient([address for _, address in servers]) as client:
            assert client.target.startswith("ipv4:127.0.0.1:")
            for _ in range(50):
                await client.recognize([TEXT])
                if all(s.attempts for s in servicers):
                    break
        assert all(s.attempts for s in servicers), [len(s.attempts) for s in servicers]
    finally:
        for server, _ in servers:
            await server.stop(0)


@pytest.mark.parametrize(
    ("addresses", "expected"),
    [
        ("gw:50051", "gw:50051"),
        ("dns:///ner-gateway.ner.svc:50051", "dns:///ner-gateway.ner.svc:50051"),
        (["10.0.0.1:1", "10.0.0.2:2"], "ipv4:10.0.0.1:1,10.0.0.2:2"),
        ("10.0.0.1:1, 10.0.0.2:2", "ipv4:10.0.0.1:1,10.0.0.2:2"),
        (["[::1]:1", "[fe80::2]:2"], "ipv6:[::1]:1,[fe80::2]:2"),
    ],
)
def test_client_target(addresses, expected: str) -> None:
    assert target(addresses) == expected


@pytest.mark.parametrize("addresses", [["a:1", "b:2"], ["10.0.0.1:1", "[::1]:2"]])
def test_client_target_refuses_what_grpc_cannot_resolve(addresses: list[str]) -> None:
    with pytest.raises(ValueError):
        target(addresses)


# --- startup checks ---------------------------------------------------------------------------------------


def test_token_file_parsing_and_startup_refusals(tmp_path: Path) -> None:
    file = tmp_path / "tokens"
    file.write_text("# comment\n\n  alpha  \n#beta\ngamma\n")
    tokens = BearerTokens(file=file)
    assert [tokens.accepts(t) for t in ("alpha", "gamma", "beta", "#beta", "")] == [True, True, False, False, False]
    file.write_text("# rotated away\n")
    with pytest.raises(ConfigurationError, match="no bearer tokens"):
        BearerTokens(file=file)
    with pytest.raises(ConfigurationError, match="cannot read the bearer token file"):
        BearerTokens(file=tmp_path / "absent")
    settings = GatewaySettings(auth_tokens=" one , two ,")
    assert BearerTokens.from_settings(settings).accepts("two")  # type: ignore[union-attr]
    assert BearerTokens.from_settings(GatewaySettings()) is None


def test_unusable_tls_files_refused_at_startup(pki: Pki, tmp_path: Path) -> None:
    cert, _ = pki.server.write(tmp_path, "server")
    _, other_key = pki.client.write(tmp_path, "client")
    with pytest.raises(ConfigurationError, match="cannot use the TLS files"):
        RotatingCertificate(cert, other_key, None)  # a key that is not the certificate's
    with pytest.raises(ConfigurationError, match="cannot use the TLS files"):
        RotatingCertificate(cert, tmp_path / "absent.key", None)


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True),
                                                ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                                ("10.0.0.1", False), ("gateway.example", False)])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


async def test_plaintext_beyond_loopback_warns(caplog: pytest.LogCaptureFixture) -> None:
    for host, warned in (("127.0.0.1", False), ("0.0.0.0", True)):
        caplog.clear()
        server = grpc.aio.server()
        with caplog.at_level(logging.WARNING, logger="ner_gateway.transport.tls"):
            assert add_port(server, GatewaySettings(host=host, port=0)) > 0
        await server.stop(0)
        assert any("plaintext" in r.getMessage() for r in caplog.records) is warned, host
