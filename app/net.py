"""Which addresses are on the public internet: the one classification that the download
allowlist, the checked resolver, the notifier and the ``PUBLIC_BASE_URL`` check share.

It imports nothing else of ours, so the settings can use it without reaching into the jobs.
"""

from __future__ import annotations

import ipaddress

__all__ = ["is_ip_literal", "is_public_address"]

# IPv6 forms that carry an IPv4 address in their last 32 bits (RFC 4291, RFC 6052): such an
# address is public only if the IPv4 address it carries is.
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated; ``::`` and ``::1`` are in it
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # the well-known NAT64 prefix
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # local-use NAT64 (RFC 8215)


def is_public_address(address: str) -> bool:
    """True for an address on the public internet; False for loopback, private, link-local
    (cloud metadata), shared, reserved, documentation and multicast addresses, for anything
    that is not an address, and for the IPv6 forms that reach such an IPv4 address:
    IPv4-mapped (``::ffff:127.0.0.1``), IPv4-compatible (``::127.0.0.1``), NAT64
    (``64:ff9b::7f00:1``; all of the local-use ``64:ff9b:1::/48``), 6to4 (``2002:7f00:1::``)
    and Teredo (``2001::/32``, refused whole: it tunnels to any IPv4 host)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # a zone (``fe80::1%eth0``) aside
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.teredo is not None or ip in _NAT64_LOCAL:
            return False
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and (ip in _IPV4_COMPATIBLE or ip in _NAT64):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return embedded.is_global and not embedded.is_multicast
    return ip.is_global and not ip.is_multicast


def is_ip_literal(host: str) -> bool:
    """True when ``host`` is written as an IP address rather than a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
