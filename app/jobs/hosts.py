"""``DOWNLOAD_ALLOWED_HOSTS``: which URLs the downloader may fetch.

Entries are comma-separated. ``*.hiapi.ai`` admits any subdomain of hiapi.ai over https
on port 443; ``temp.hiapi.ai`` admits exactly that host; an entry with a scheme and port,
such as ``http://127.0.0.1:9100``, admits exactly that origin (used for a local simulator).
Hosts admitted by name must resolve to public addresses only; an origin or IP literal
written into the list is taken as an explicit permission for that address.

Hosts are compared in one spelling (``canonical_host``): lower case, no trailing dot, IDNA
``xn--`` labels, IPv6 compressed. An IPv4 address must be written as four decimal numbers;
``0177.0.0.1``, ``0x7f.1``, ``127.1`` or ``2130706433`` are refused as unreadable rather than
guessed at, so no spelling of an address can pass where another is refused. An admitted URL is
fetched in its canonical spelling (``HostAllowlist.check``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import string
from dataclasses import dataclass

import httpx

from app.net import is_public_address

__all__ = ["HostAllowlist", "Refused", "canonical_host", "resolves_to_public"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class _Rule:
    scheme: str
    host: str  # canonical (``canonical_host``); a leading "*." means any subdomain
    port: int
    explicit: bool  # an origin or IP literal named on purpose: private addresses allowed

    def admits(self, scheme: str, host: str, port: int) -> bool:
        if scheme != self.scheme or port != self.port:
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and len(host) > len(self.host) - 1
        return host == self.host


class Refused(ValueError):
    """A URL the downloader will not fetch. ``code`` is ``bad_output_url`` (not a URL we can
    read, not http(s), credentials in it) or ``host_not_allowed`` (not on the list)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class HostAllowlist:
    def __init__(self, rules: list[_Rule]) -> None:
        self._rules = rules

    @classmethod
    def parse(cls, spec: str) -> HostAllowlist:
        rules = []
        for raw in spec.split(","):
            entry = raw.strip()
            if not entry:
                continue
            try:
                rules.append(_rule_of(entry))
            except (httpx.InvalidURL, ValueError, UnicodeError) as exc:
                raise ValueError(
                    f"DOWNLOAD_ALLOWED_HOSTS: cannot read entry {entry!r}: {exc}"
                ) from None
        return cls(rules)

    def allows(self, url: str | httpx.URL) -> bool:
        return self.match(url) is not None

    def match(self, url: str | httpx.URL) -> _Rule | None:
        """The rule admitting ``url``, or None."""
        try:
            return self.check(url)[1]
        except Refused:
            return None

    def check(self, url: str | httpx.URL) -> tuple[httpx.URL, _Rule]:
        """``url`` in its canonical spelling, and the rule admitting it; ``Refused`` if none
        does or ``url`` is not an http(s) URL we can read."""
        if isinstance(url, str) and len(url) > MAX_URL_LENGTH:
            raise Refused("bad_output_url", f"the URL is longer than {MAX_URL_LENGTH} characters")
        try:
            parsed = httpx.URL(url) if isinstance(url, str) else url
            host = _url_host(parsed) if parsed.raw_host else ""
            port = parsed.port
        except (httpx.InvalidURL, ValueError, UnicodeError) as exc:
            raise Refused("bad_output_url", f"not a URL that can be fetched: {exc}") from None
        scheme = parsed.scheme
        if scheme not in _DEFAULT_PORTS:
            raise Refused(
                "bad_output_url", f"the URL must be http(s), not {scheme or 'relative'!r}"
            )
        if not host:
            raise Refused("bad_output_url", "the URL has no host")
        if parsed.userinfo:
            raise Refused("bad_output_url", "the URL carries a user name or password")
        if port is not None and not 0 < port < 65536:
            raise Refused("bad_output_url", f"port {port} is out of range")
        port = port or _DEFAULT_PORTS[scheme]
        rule = next((rule for rule in self._rules if rule.admits(scheme, host, port)), None)
        if rule is None:
            shown = f"[{host}]" if ":" in host else host
            raise Refused(
                "host_not_allowed",
                f"download host not allowed: {scheme}://{shown}:{port} is not on "
                "DOWNLOAD_ALLOWED_HOSTS",
            )
        if parsed.raw_host != host.encode("ascii"):
            parsed = parsed.copy_with(host=host)  # path and query keep their exact escapes
        return parsed, rule


# Longer than any presigned URL; a callback is capped at 256 KiB, a URL need not take all of it.
MAX_URL_LENGTH = 8192
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
_HEX = frozenset(string.hexdigits)


def canonical_host(host: str) -> str:
    """The one spelling of ``host`` that rules are matched against and that is fetched.

    ``host`` is ASCII, as a URL carries it (IDNA ``xn--`` labels; IPv6 without brackets).
    Lower case, one trailing dot dropped, IPv6 compressed. Raises ``ValueError`` for a host
    that is no valid name, and for an IPv4 address not written as four decimal numbers (the
    resolver reads ``0177.0.0.1``, ``0x7f.1``, ``127.1`` and ``2130706433`` as 127.0.0.1;
    refusing those spellings keeps one address from having several names here).
    """
    if ":" in host:
        try:
            if "%" in host:
                raise ValueError("an IPv6 zone names an interface of this machine")
            return str(ipaddress.IPv6Address(host.strip("[]")))
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    name = host.lower()
    if name.endswith("."):
        name = name[:-1]
    labels = name.split(".")
    last = labels[-1]
    if last.isascii() and (
        last.isdigit() or (last.startswith("0x") and all(c in _HEX for c in last[2:]))
    ):
        # Ends in a number: an IPv4 address, as a resolver would read it.
        try:
            return str(ipaddress.IPv4Address(name))
        except ValueError:
            pass
        try:
            meant = socket.inet_ntoa(socket.inet_aton(name))
        except OSError:
            raise ValueError(f"{name!r} is neither a host name nor an IPv4 address") from None
        raise ValueError(
            f"{name!r} is the IPv4 address {meant} in a non-standard spelling; write it as {meant}"
        )
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"{name!r} is not a valid host name")
    return name


def _url_host(url: httpx.URL) -> str:
    """The canonical host of a parsed URL (its IDNA labels checked: decoding a bad one raises)."""
    _ = url.host
    return canonical_host(url.raw_host.decode("ascii"))


def _rule_of(entry: str) -> _Rule:
    if "://" in entry:
        url = httpx.URL(entry)
        if url.scheme not in _DEFAULT_PORTS or not url.raw_host:
            raise ValueError("an origin is http(s)://host[:port]")
        return _Rule(url.scheme, _url_host(url), url.port or _DEFAULT_PORTS[url.scheme], True)
    wildcard = entry.startswith("*.")
    url = httpx.URL("https://" + entry.removeprefix("*."))
    if not url.raw_host or url.port is not None or url.path != "/" or url.query or url.userinfo:
        raise ValueError(
            "write a host (temp.hiapi.ai, *.hiapi.ai) or an origin (https://host:port)"
        )
    host = _url_host(url)
    return _Rule("https", f"*.{host}" if wildcard else host, 443, not wildcard and _is_ip(host))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


async def resolves_to_public(host: str, port: int) -> bool:
    """True if every address ``host`` resolves to is a public one (see ``is_public_address``).

    A failed lookup raises (``OSError``): it is neither a pass nor a refusal. This checks a
    name; it does not pin it: the service connects through ``app.jobs.resolve``, which checks
    the very addresses it connects to.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return bool(infos) and all(is_public_address(str(info[4][0])) for info in infos)
