"""``DOWNLOAD_ALLOWED_HOSTS``: which URLs the downloader may fetch.

Entries are comma-separated. ``*.hiapi.ai`` admits any subdomain of hiapi.ai over https
on port 443; ``temp.hiapi.ai`` admits exactly that host; an entry with a scheme and port,
such as ``http://127.0.0.1:9100``, admits exactly that origin (used for a local simulator).
Hosts admitted by name must resolve to public addresses only; an origin or IP literal
written into the list is taken as an explicit permission for that address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

import httpx

__all__ = ["HostAllowlist", "is_public_address", "resolves_to_public"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class _Rule:
    scheme: str
    host: str  # lower-case; a leading "*." means any subdomain
    port: int
    explicit: bool  # an origin or IP literal named on purpose: private addresses allowed

    def admits(self, scheme: str, host: str, port: int) -> bool:
        if scheme != self.scheme or port != self.port:
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and len(host) > len(self.host) - 1
        return host == self.host


class HostAllowlist:
    def __init__(self, rules: list[_Rule]) -> None:
        self._rules = rules

    @classmethod
    def parse(cls, spec: str) -> HostAllowlist:
        rules = []
        for raw in spec.split(","):
            entry = raw.strip().lower()
            if not entry:
                continue
            if "://" in entry:
                url = httpx.URL(entry)
                if url.scheme not in _DEFAULT_PORTS or not url.host:
                    raise ValueError(f"DOWNLOAD_ALLOWED_HOSTS: cannot read entry {raw.strip()!r}")
                port = url.port or _DEFAULT_PORTS[url.scheme]
                rules.append(_Rule(url.scheme, url.host, port, explicit=True))
            else:
                rules.append(_Rule("https", entry, 443, explicit=_is_ip(entry)))
        return cls(rules)

    def allows(self, url: str | httpx.URL) -> bool:
        return self.match(url) is not None

    def match(self, url: str | httpx.URL) -> _Rule | None:
        """The rule admitting ``url``, or None."""
        try:
            parsed = httpx.URL(url) if isinstance(url, str) else url
            scheme = parsed.scheme.lower()
            host = parsed.host.lower().rstrip(".")  # decoding a bad IDN raises here
            port = parsed.port or _DEFAULT_PORTS.get(scheme, 0)
            userinfo = parsed.userinfo
        except (httpx.InvalidURL, ValueError, UnicodeError):
            return None
        if scheme not in _DEFAULT_PORTS or not host or userinfo:
            return None
        return next((rule for rule in self._rules if rule.admits(scheme, host, port)), None)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_global and not ip.is_multicast


async def resolves_to_public(host: str, port: int) -> bool:
    """True if every address ``host`` resolves to is a public one.

    Refuses names that point at loopback, private, link-local (cloud metadata) or reserved
    addresses, so an allowlisted wildcard cannot be turned against the internal network.
    """
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return True  # resolution fails again on connect and is retried as a network error
    return all(is_public_address(str(info[4][0]).split("%")[0]) for info in infos)
