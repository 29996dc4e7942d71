"""Where the Triton endpoints are: ``NER_TRITON_URL`` is a comma-separated list of ``host:port`` and/or
``dns:///name:port`` entries; a DNS entry (a Kubernetes headless Service) expands to one endpoint per address, and
is re-resolved on every refresh of the pool, so pods that come and go are picked up."""

from __future__ import annotations

import logging
import socket

from ner_gateway.core.errors import ConfigurationError

LOGGER = logging.getLogger(__name__)

DNS_PREFIX = "dns:///"


def resolve(spec: str) -> list[str]:
    """Expand a NER_TRITON_URL value into ``host:port`` endpoints (DNS entries to one per address)."""
    endpoints: list[str] = []
    for entry in (part.strip() for part in spec.split(",")):
        if not entry:
            continue
        if entry.startswith(DNS_PREFIX):
            host, _, port = entry[len(DNS_PREFIX):].rpartition(":")
            if not host or not port.isdigit():
                raise ConfigurationError(f"invalid Triton endpoint {entry!r}: expected dns:///name:port")
            try:
                infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except socket.gaierror as e:
                LOGGER.warning("cannot resolve %s: %s", entry, e)
                continue
            for family, _, _, _, address in infos:
                ip = address[0] if family == socket.AF_INET else f"[{address[0]}]"
                endpoints.append(f"{ip}:{port}")
        else:
            endpoints.append(entry)
    return list(dict.fromkeys(endpoints))
