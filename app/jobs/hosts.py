"""``DOWNLOAD_ALLOWED_HOSTS``: which URLs the downloader may fetch.

Entries are comma-separated. ``*.hiapi.ai`` admits any subdomain of hiapi.ai over https
on port 443; ``temp.hiapi.ai`` admits exactly that host; an entry with a scheme and port,
such as ``http://127.0.0.1:9100``, admits exactly that origin (used for a local simulator).
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

__all__ = ["HostAllowlist"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class _Rule:
    scheme: str
    host: str  # lower-case; a leading "*." means any subdomain
    port: int

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
                rules.append(_Rule(url.scheme, url.host, port))
            else:
                rules.append(_Rule("https", entry, 443))
        return cls(rules)

    def allows(self, url: str | httpx.URL) -> bool:
        try:
            parsed = httpx.URL(url) if isinstance(url, str) else url
            scheme = parsed.scheme.lower()
            host = parsed.host.lower().rstrip(".")  # decoding a bad IDN raises here
            port = parsed.port or _DEFAULT_PORTS.get(scheme, 0)
            userinfo = parsed.userinfo
        except (httpx.InvalidURL, ValueError, UnicodeError):
            return False
        if scheme not in _DEFAULT_PORTS or not host or userinfo:
            return False
        return any(rule.admits(scheme, host, port) for rule in self._rules)
