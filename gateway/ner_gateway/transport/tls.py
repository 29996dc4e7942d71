"""Server transport: TLS (optionally mutual) whose certificate files are re-read when they change, or plaintext."""

from __future__ import annotations

import ipaddress
import logging
import ssl
import threading
from pathlib import Path

import grpc

from ner_gateway.core.errors import ConfigurationError
from ner_gateway.secret_files import FileStamp, file_stamp
from ner_gateway.settings import GatewaySettings

LOGGER = logging.getLogger(__name__)

Stamp = tuple[FileStamp | None, ...]


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        return False


class RotatingCertificate:
    """The certificate-configuration fetcher of ``grpc.dynamic_ssl_server_credentials``: gRPC calls it before
    every new connection's handshake; it re-reads the files only when their mtime, size or inode changed (a
    Kubernetes Secret update swaps a symlink: a new inode), and None keeps the current configuration."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        self.files = (cert_file, key_file, *([client_ca_file] if client_ca_file else []))
        self.client_ca_file = client_ca_file
        self._lock = threading.Lock()  # gRPC may call from several of its threads
        self._seen = self._stamp()
        try:
            self.initial = self._load()
        except (OSError, ssl.SSLError) as e:
            raise ConfigurationError(f"cannot use the TLS files {', '.join(map(str, self.files))}: {e}") from e

    def _stamp(self) -> Stamp:
        stamps: list[FileStamp | None] = []
        for path in self.files:
            try:
                stamps.append(file_stamp(path))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cert, key = self.files[:2]
        # gRPC only finds a bad or mismatched pair at the first handshake; ssl says so now, with the reason.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        if self.client_ca_file is not None:
            context.load_verify_locations(self.client_ca_file)
        return grpc.ssl_server_certificate_configuration(
            [(key.read_bytes(), cert.read_bytes())],
            root_certificates=self.client_ca_file.read_bytes() if self.client_ca_file else None,
        )

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            stamp = self._stamp()
            if stamp == self._seen:
                return None
            # Remembered even when loading fails: one warning per change, and a half-written rotation (new cert,
            # old key) is retried as soon as the second file changes too.
            self._seen = stamp
            try:
                config = self._load()
            except (OSError, ssl.SSLError) as e:
                LOGGER.warning("TLS files changed but cannot be used (%s); keeping the current certificate", e)
                return None
            LOGGER.info("TLS certificate reloaded from %s", self.files[0])
            return config


def server_credentials(settings: GatewaySettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings (mutual when a client CA is set); None when TLS is not configured."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    fetcher = RotatingCertificate(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    # gRPC documents a fetcher's None as "keep the current configuration"; typeshed's stub leaves it out.
    return grpc.dynamic_ssl_server_credentials(
        fetcher.initial, fetcher,  # type: ignore[arg-type]
        require_client_authentication=settings.tls_client_ca_file is not None,
    )


def add_port(server: grpc.aio.Server, settings: GatewaySettings) -> int:
    """Bind ``host:port`` with TLS when configured, else in plaintext; returns the bound port."""
    address = f"{settings.host}:{settings.port}"
    credentials = server_credentials(settings)
    if credentials is not None:
        LOGGER.info("TLS on%s", " with client certificates (mutual TLS)" if settings.tls_client_ca_file else "")
        return server.add_secure_port(address, credentials)
    if not is_loopback(settings.host):
        LOGGER.warning("serving plaintext gRPC on %s, beyond loopback: requests, entities and bearer tokens cross "
                       "the network unencrypted; set NER_TLS_CERT_FILE and NER_TLS_KEY_FILE", settings.host)
    return server.add_insecure_port(address)
