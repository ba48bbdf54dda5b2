"""control/smtproutes: parse artificial SMTP routes and pick the route for a host (qmail-remote).

Format, one route a line (qmail-semantics.md §6.1)::

    example.com:relay.isp.net          relay on port 25
    example.com:relay.isp.net:2525     relay on port 2525
    example.com:10.0.0.5               relay given as an IPv4 address ([10.0.0.5] works too)
    .example.com:relay                 every host *below* example.com
    :smarthost.isp.net                 default route for everything else
    example.com:                       exception: no route, look up MX as usual

The key runs to the first ``:`` and is matched ignoring ASCII case; a later line with the same key
wins (qmail's constmap). A line without ``:`` is ignored, with a warning.

The relay part is where pqmail has to go beyond qmail, which splits it at its *first* colon and so
cannot name an IPv6 relay. pqmail's rule, chosen so that every line qmail accepts means the same:

* ``[literal]`` or ``[literal]:port``: the bracketed text is an IP address (IPv4, IPv6, or
  ``IPv6:``-tagged as in RFC 5321). Brackets are removed in :attr:`Route.host`.
* otherwise, with no colon: the relay host, port 25.
* otherwise, when the text is a valid IPv6 address (``2001:db8::1``): that address, port 25. An
  unbracketed IPv6 relay can never carry a port; write ``[2001:db8::1]:2525``.
* otherwise split at the **last** colon: host, then the port, which must be decimal 1-65535.

Anything else (an empty host, a bad or out-of-range port, whitespace in the relay, a bracket that is not
an IP address) is a :class:`~pqmail.errors.ConfigError` naming the file and line: a route that cannot
work must not silently send mail to the wrong place.

Pure: parses text handed to it; reads no file and opens no socket.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pqmail.config.casefold import ascii_lower
from pqmail.errors import ConfigError

SMTP_PORT = 25


@dataclass(frozen=True)
class Route:
    """Send to ``host`` (a name or a bare IP address, never bracketed) on ``port``, without an MX lookup."""

    host: str
    port: int = SMTP_PORT

    @property
    def is_ip(self) -> bool:
        """True when ``host`` is an IP address literal (use it directly, no DNS)."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == SMTP_PORT else f"{host}:{self.port}"


def _port(text: str, path: Path | str, lineno: int) -> int:
    if not text.isascii() or not text.isdigit():
        raise ConfigError(path, f"bad port {text!r} (want a decimal number 1-65535)", lineno)
    port = int(text)
    if not 1 <= port <= 65535:
        raise ConfigError(path, f"port {port} out of range (want 1-65535)", lineno)
    return port


def parse_relay(text: str, path: Path | str, lineno: int) -> Route | None:
    """The value part of one smtproutes line: ``None`` for an exception (empty), else a Route."""
    if text == "":
        return None
    if any(c.isspace() for c in text):
        raise ConfigError(path, f"relay {text!r} contains whitespace", lineno)
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(path, f"relay {text!r}: '[' without ']'", lineno)
        literal, rest = text[1:end], text[end + 1:]
        if ascii_lower(literal[:5]) == "ipv6:":
            literal = literal[5:]
        try:
            ipaddress.ip_address(literal)
        except ValueError:
            raise ConfigError(path, f"relay {text!r}: [{literal}] is not an IP address", lineno) from None
        if rest == "":
            return Route(literal)
        if not rest.startswith(":"):
            raise ConfigError(path, f"relay {text!r}: unexpected text after ']'", lineno)
        return Route(literal, _port(rest[1:], path, lineno))
    if ":" not in text:
        return Route(text)
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        pass
    else:
        return Route(text)
    host, port = text.rsplit(":", 1)
    if ":" in host:
        raise ConfigError(path, f"relay {text!r}: too many colons (write an IPv6 relay as [address]:port)",
                          lineno)
    if host == "":
        raise ConfigError(path, f"relay {text!r}: empty host name", lineno)
    return Route(host, _port(port, path, lineno))


def parse_smtproutes(lines: Iterable[tuple[int, str]], path: Path | str
                     ) -> tuple[dict[str, Route | None], list[str]]:
    """Lines as given by ``control.read_lines`` -> (key -> Route or None, warnings)."""
    routes: dict[str, Route | None] = {}
    warnings: list[str] = []
    for lineno, line in lines:
        key, colon, value = line.partition(":")
        if not colon:
            warnings.append(f"{path}:{lineno}: no ':' in {line!r}; qmail ignores this line")
            continue
        route = parse_relay(value, path, lineno)
        routes.pop(ascii_lower(key), None)  # later line wins, and shows last in the order of the file
        routes[ascii_lower(key)] = route
    return routes, warnings


def host_keys(host: str) -> list[str]:
    """Keys tried for ``host``, in qmail-remote's order: whole host, dot-suffixes longest first, ``""``."""
    host = ascii_lower(host)
    keys = [host]
    keys.extend(host[i:] for i in range(1, len(host)) if host[i] == ".")
    keys.append("")
    return keys


def match(routes: Mapping[str, Route | None], host: str) -> tuple[str, Route | None] | None:
    """The first key of :func:`host_keys` present in ``routes`` with its value, or None for no line."""
    for key in host_keys(host):
        if key in routes:
            return key, routes[key]
    return None


def lookup(routes: Mapping[str, Route | None], host: str) -> Route | None:
    """The relay for ``host``; None means "look up MX as usual" (no route, or an exception line)."""
    found = match(routes, host)
    return None if found is None else found[1]
