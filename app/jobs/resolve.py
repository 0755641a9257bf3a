"""Resolve a name once, check every address, and connect only to the addresses checked.

Checking a name with one lookup and connecting with another lets the answer change in
between: a name that fails its check's lookup, or that answers a public address to the check
and 127.0.0.1 to the connection (DNS rebinding), would reach the internal network. So the
check happens inside the lookup the connection uses:

- the downloader's aiohttp connector resolves through ``CheckedResolver``: an answer set with
  any non-public address is refused (``AddressRefused``) before a connection is attempted,
  unless the host was admitted by an explicit origin in ``DOWNLOAD_ALLOWED_HOSTS``;
- the notifier resolves through the same ``CheckedResolver`` and then connects to the checked
  address itself, sending the name as ``Host`` and as TLS SNI (the certificate is verified
  against the name).

A lookup that fails is ``LookupFailed``: a transient failure, retried later, never a pass.
"""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Callable

import aiohttp
import httpx
from aiohttp.abc import AbstractResolver, ResolveResult

from app.jobs.hosts import HostAllowlist
from app.net import is_public_address

__all__ = ["AddressRefused", "CheckedResolver", "LookupFailed", "download_private_ok"]


class LookupFailed(OSError):
    """The name could not be resolved (now): try again later."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.strerror = message  # what aiohttp's ClientConnectorDNSError shows


class AddressRefused(ValueError):
    """The name resolves to a private or local address (one answer is enough): refused before
    any connection is made. Not an ``OSError``, so aiohttp hands it on unwrapped."""

    def __init__(self, host: str) -> None:
        super().__init__(
            f"{host} resolves to a private or local address; refused before connecting"
        )
        self.host = host


def _never(host: str, port: int) -> bool:
    return False


class CheckedResolver(AbstractResolver):
    """Wraps a resolver (aiohttp's default unless given): every answer must be public.

    All addresses are asked for (IPv4 and IPv6) and all are checked, whatever family the caller
    wants, so a name with one public and one private answer is refused. ``private_ok(host,
    port)`` says where private answers are allowed (an origin the operator named on purpose).
    """

    def __init__(
        self,
        inner: AbstractResolver | None = None,
        *,
        private_ok: Callable[[str, int], bool] = _never,
    ) -> None:
        self._inner = inner
        self._private_ok = private_ok

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self._inner is None:
            self._inner = aiohttp.DefaultResolver()  # needs the running loop: built here
        try:
            answers = await self._inner.resolve(host, port, family=socket.AF_UNSPEC)
        except OSError as exc:
            raise LookupFailed(f"could not resolve {host}: {exc}") from None
        if not answers:
            raise LookupFailed(f"could not resolve {host}: no addresses")
        if not self._private_ok(host, port) and not all(
            is_public_address(answer["host"]) for answer in answers
        ):
            raise AddressRefused(host)
        if family != socket.AF_UNSPEC:
            answers = [answer for answer in answers if answer["family"] == family]
            if not answers:
                raise LookupFailed(f"could not resolve {host}: no {family.name} address")
        return answers

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()


def download_private_ok(allowlist: HostAllowlist) -> Callable[[str, int], bool]:
    """Where the downloader may connect to private addresses: hosts admitted by an explicit
    origin of ``DOWNLOAD_ALLOWED_HOSTS`` (``http://sim.local:9100``), and the proxy named by
    ``HTTP(S)_PROXY`` (the operator's own choice; through a proxy, the proxy resolves the
    clip's host)."""
    proxies = set()
    for scheme, proxy in urllib.request.getproxies().items():
        if scheme in ("http", "https", "all"):
            try:
                proxies.add(httpx.URL(proxy).host.lower().rstrip("."))
            except (httpx.InvalidURL, ValueError, UnicodeError):
                continue

    def private_ok(host: str, port: int) -> bool:
        if host.lower().rstrip(".") in proxies:
            return True
        for scheme in ("https", "http"):
            rule = allowlist.match(f"{scheme}://{host}:{port}/")
            if rule is not None and rule.explicit:
                return True
        return False

    return private_ok
