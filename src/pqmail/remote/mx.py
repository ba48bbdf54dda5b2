"""Where mail for a host goes: smtproutes, MX records, the A/AAAA fall-back and the backup-MX rule.

qmail-remote's routing (qmail-semantics.md §6.1, §6.2), with what a 2020s MTA must add:

1. ``control/smtproutes`` first, keys in qmail's order (the host, its dot-suffixes, the empty key). A
   relay is used by its A/AAAA records only (no MX lookup), is the only "MX", and the backup-MX check is
   off (a route to ourselves loops, as in qmail). An empty relay (``domain:``) means: look up MX.
2. An IP literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``) is used directly.
3. MX records in preference order, random order among equal preferences; each MX name is resolved to
   its A and then AAAA addresses. No MX at all: the host's own A/AAAA records, preference 0.
   NXDOMAIN is permanent (``#5.1.2``); SERVFAIL, REFUSED and time-outs are temporary (``#4.1.2``); a
   null MX (RFC 7505, ``0 .``) is permanent at once (``#5.1.10``).
4. The backup-MX rule: when this host is among the MX hosts, by name (``control/me`` or a
   ``control/locals`` entry) or by address (see :class:`Mine`), only strictly better preferences are
   tried; none left is qmail's permanent ``#5.4.6``. Mail is never sent to ourselves through MX.

``control/resolvers`` (``IP`` or ``IP:port`` or ``[IPv6]:port``, one a line), when present, replaces the
system's resolvers. Lookups give up after ``timeoutconnect`` seconds in all.

The decisions (ordering, null MX, backup-MX filtering, turning lookups into a list of addresses) are
pure functions of their arguments; :func:`resolve` and :class:`DnsClient` do the I/O. Trusts: nothing
that DNS says beyond what it is asked. Never: connects anywhere but to the resolvers, or raises for a
DNS problem (every problem becomes a :class:`Resolution` with a Z or D report).
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver

from pqmail.config.casefold import ascii_lower
from pqmail.config.control import Control, smtproute_for
from pqmail.config.smtproutes import Route
from pqmail.errors import ConfigError

SMTP_PORT = 25

# qmail-remote's words (qmail-remote.c temp_dns, perm_dns, perm_nomx, perm_ambigmx).
TEMP_DNS = "Sorry, I couldn't find any host by that name. (#4.1.2)"
PERM_NOMX = "Sorry, I couldn't find a mail exchanger or IP address. (#5.4.4)"
PERM_AMBIGMX = ("Sorry. Although I'm listed as a best-preference MX or A for that host,\n"
                "it isn't in my control/locals file, so I don't treat it as local. (#5.4.6)")


def perm_dns(host: str) -> str:
    return f"Sorry, I couldn't find any host named {host}. (#5.1.2)"


def perm_null_mx(host: str) -> str:
    return f"Sorry, {host} does not accept mail: it publishes a null MX record (RFC 7505). (#5.1.10)"


# ----------------------------------------------------------------------------- results

@dataclass(frozen=True)
class Target:
    """One address to try: ``name`` is the MX or relay name (or the literal itself)."""

    preference: int
    name: str
    address: str
    port: int = SMTP_PORT

    @property
    def label(self) -> str:
        """``mx1.example.net [192.0.2.1]``, with ``:port`` when it is not 25: for logs and reports."""
        text = f"[{self.address}]" if self.name == self.address else f"{self.name} [{self.address}]"
        return text if self.port == SMTP_PORT else f"{text}:{self.port}"


@dataclass(frozen=True)
class MxHost:
    """One MX (or relay, or A fall-back) host with the addresses its lookups gave."""

    preference: int
    name: str
    addresses: tuple[str, ...] = ()
    soft_failed: bool = False  # an address lookup failed temporarily


@dataclass(frozen=True)
class Resolution:
    """Either the addresses to try, in order, or a failure: ``status`` "Z"/"D" with qmail's report."""

    targets: tuple[Target, ...] = ()
    status: str = ""
    report: str = ""
    how: str = ""  # "smtproutes", "literal", "mx" or "a": for logs

    @property
    def ok(self) -> bool:
        return not self.status


# ----------------------------------------------------------------------------- who we are

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Always ours, like qmail's ipme.c adds 0.0.0.0: the loopback networks and the unspecified addresses.
ALWAYS_MINE: tuple[Network, ...] = tuple(ipaddress.ip_network(n) for n in
                                         ("127.0.0.0/8", "0.0.0.0/32", "::1/128", "::/128"))


@dataclass(frozen=True)
class Mine:
    """What counts as "this host" for the backup-MX rule.

    ``names``: control/me and control/locals (lowercase, no trailing dot). An address is ours when it is
    in ``extra`` (control/ipme: always ours), or in ``detected`` (interface addresses and
    :data:`ALWAYS_MINE`) and not in ``excluded`` (control/notipme, as in qmail's moreipme patch: e.g. a
    NAT address, or loopback addresses that are other MTAs in a test).
    """

    names: frozenset[str] = frozenset()
    detected: tuple[Network, ...] = ALWAYS_MINE
    extra: tuple[Network, ...] = ()
    excluded: tuple[Network, ...] = ()

    def address(self, text: str) -> bool:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self.extra):
            return True
        return any(ip in net for net in self.detected) and not any(ip in net for net in self.excluded)

    def host(self, host: MxHost) -> bool:
        return normalize_name(host.name) in self.names or any(self.address(a) for a in host.addresses)


def mine_from(control: Control, interfaces: Iterable[Network], ipme: Iterable[Network],
              notipme: Iterable[Network]) -> Mine:
    names = {normalize_name(n) for n in control.locals}
    if control.me:
        names.add(normalize_name(control.me))
    names.discard("")
    return Mine(names=frozenset(names), detected=(*ALWAYS_MINE, *interfaces), extra=tuple(ipme),
                excluded=tuple(notipme))


def parse_fib_trie(text: str) -> list[Network]:
    """IPv4 networks the kernel delivers locally: the ``host LOCAL`` entries of /proc/net/fib_trie."""
    out: list[Network] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|--"):
            current = stripped[3:].strip()
        elif stripped.startswith("/") and stripped.endswith("host LOCAL") and current:
            try:
                net = ipaddress.ip_network(f"{current}{stripped.split()[0]}", strict=False)
            except ValueError:
                continue
            if net not in out:
                out.append(net)
    return out


def parse_if_inet6(text: str) -> list[Network]:
    """This host's IPv6 addresses, from /proc/net/if_inet6 (32 hex digits first on each line)."""
    out: list[Network] = []
    for line in text.splitlines():
        fields = line.split()
        if fields and len(fields[0]) == 32:
            try:
                out.append(ipaddress.ip_network(ipaddress.IPv6Address(bytes.fromhex(fields[0]))))
            except ValueError:
                continue
    return out


def interface_networks(proc: Path = Path("/proc/net")) -> list[Network]:
    """Local addresses as the kernel sees them (Linux); nothing beyond ALWAYS_MINE elsewhere."""
    out: list[Network] = []
    for name, parse in (("fib_trie", parse_fib_trie), ("if_inet6", parse_if_inet6)):
        try:
            out.extend(parse((proc / name).read_text("ascii", "replace")))
        except OSError:
            continue
    return out


def parse_networks(lines: Iterable[tuple[int, str]], path: Path | str) -> list[Network]:
    """control/ipme and control/notipme: an address or ``address/bits`` a line."""
    out: list[Network] = []
    for lineno, line in lines:
        text = line.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        try:
            out.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ConfigError(path, f"{line!r} is not an IP address or network", lineno) from None
    return out


def parse_resolvers(lines: Iterable[tuple[int, str]], path: Path | str) -> list[tuple[str, int]]:
    """control/resolvers: ``192.0.2.53``, ``192.0.2.53:5353``, ``2001:db8::53``, ``[2001:db8::53]:5353``."""
    out: list[tuple[str, int]] = []
    for lineno, line in lines:
        text = line.strip()
        host, port = text, "53"
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            if rest:
                if not rest.startswith(":"):
                    raise ConfigError(path, f"{line!r}: unexpected text after ']'", lineno)
                port = rest[1:]
        elif text.count(":") == 1:
            host, port = text.split(":")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(path, f"{line!r}: {host!r} is not an IP address", lineno) from None
        if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            raise ConfigError(path, f"{line!r}: bad port {port!r} (want 1-65535)", lineno)
        out.append((host, int(port)))
    return out


# ----------------------------------------------------------------------------- pure decisions

def normalize_name(name: str) -> str:
    """Lowercase (ASCII only, as qmail) and without the trailing dot; the root becomes ``""``."""
    return ascii_lower(name).rstrip(".")


def ip_literal(host: str) -> str | None:
    """The address in ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``, or None for a domain name."""
    if not (host.startswith("[") and host.endswith("]")):
        return None
    text = host[1:-1]
    if ascii_lower(text[:5]) == "ipv6:":
        text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def order_mx(records: Iterable[tuple[int, str]], rng: random.Random) -> list[tuple[int, str]]:
    """Sort by preference, ascending; shuffle records of equal preference (qmail's dns_mxip)."""
    groups: dict[int, list[str]] = {}
    for pref, name in records:
        groups.setdefault(pref, []).append(name)
    out: list[tuple[int, str]] = []
    for pref in sorted(groups):
        names = groups[pref]
        rng.shuffle(names)
        out.extend((pref, name) for name in names)
    return out


def is_null_mx(records: Sequence[tuple[int, str]]) -> bool:
    """RFC 7505: the MX RRset is only ``.`` targets (names already normalized: the root is ``""``)."""
    return bool(records) and all(name == "" for _, name in records)


def filter_backup_mx(hosts: Sequence[MxHost], is_mine: Callable[[MxHost], bool]) -> list[MxHost] | None:
    """The hosts strictly better than the best one that is us; None when that leaves nothing.

    When no host is us, all of them. None is qmail's "I'm listed as a best-preference MX" (#5.4.6).
    """
    prefme = min((h.preference for h in hosts if is_mine(h)), default=None)
    if prefme is None:
        return list(hosts)
    better = [h for h in hosts if h.preference < prefme]
    return better or None


def plan(hosts: Sequence[MxHost], port: int, how: str,
         is_mine: Callable[[MxHost], bool] | None) -> Resolution:
    """Turn looked-up hosts into the addresses to try (``is_mine`` None: no backup-MX check).

    No address left: temporary when some lookup failed temporarily, else permanent (#5.4.4). A better
    MX whose lookup failed temporarily defers the mail rather than bouncing it as qmail would.
    """
    kept: Sequence[MxHost] | None = hosts
    if is_mine is not None:
        kept = filter_backup_mx(hosts, is_mine)
        if kept is None:
            return Resolution(status="D", report=PERM_AMBIGMX, how=how)
    targets = tuple(Target(h.preference, h.name, a, port) for h in kept for a in h.addresses)
    if targets:
        return Resolution(targets=targets, how=how)
    if any(h.soft_failed for h in kept):
        return Resolution(status="Z", report=TEMP_DNS, how=how)
    return Resolution(status="D", report=PERM_NOMX, how=how)


# ----------------------------------------------------------------------------- DNS I/O

@dataclass(frozen=True)
class Lookup:
    """One DNS answer, classified: ``kind`` is "ok", "nodata", "nxdomain" or "soft" (try later)."""

    kind: str
    records: tuple = ()
    why: str = ""


class DnsClient:
    """dnspython's asyncio resolver with our servers (or the system's) and a total time limit."""

    def __init__(self, nameservers: Sequence[tuple[str, int]] | None, lifetime: float) -> None:
        self.error = ""
        try:
            resolver = dns.asyncresolver.Resolver(configure=nameservers is None)
        except dns.exception.DNSException as e:  # no /etc/resolv.conf: every lookup is temporary
            self.error = f"no usable resolver: {e}"
            resolver = dns.asyncresolver.Resolver(configure=False)
        if nameservers is not None:
            resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in nameservers]
        resolver.lifetime = max(1.0, float(lifetime))
        resolver.timeout = min(resolver.lifetime, 5.0)
        resolver.cache = dns.resolver.Cache()
        self.resolver = resolver

    async def lookup(self, name: str, rdtype: str) -> Lookup:
        if self.error:
            return Lookup("soft", why=self.error)
        try:
            qname = dns.name.from_text(name)
        except (dns.exception.DNSException, UnicodeError, ValueError) as e:
            return Lookup("nxdomain", why=f"bad name: {e}")
        try:
            answer = await self.resolver.resolve(qname, rdtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return Lookup("nxdomain")
        except dns.resolver.NoNameservers as e:  # SERVFAIL, REFUSED, ... from every server
            return Lookup("soft", why=str(e))
        except dns.exception.Timeout:
            return Lookup("soft", why="time-out")
        except dns.exception.DNSException as e:
            return Lookup("soft", why=f"{type(e).__name__}: {e}")
        if answer.rrset is None:
            return Lookup("nodata")
        if rdtype == "MX":
            return Lookup("ok", tuple((r.preference, normalize_name(r.exchange.to_text())) for r in answer))
        return Lookup("ok", tuple(r.address for r in answer))


async def _host(dns_client: DnsClient, pref: int, name: str) -> tuple[MxHost, bool]:
    """A then AAAA addresses of ``name``; the flag says the name does not exist (NXDOMAIN)."""
    a, aaaa = await asyncio.gather(dns_client.lookup(name, "A"), dns_client.lookup(name, "AAAA"))
    addresses = tuple(dict.fromkeys((*a.records, *aaaa.records)))  # IPv4 first, no duplicates
    soft = "soft" in (a.kind, aaaa.kind)
    return MxHost(pref, name, addresses, soft), a.kind == aaaa.kind == "nxdomain"


async def _relay(dns_client: DnsClient, route: Route) -> Resolution:
    if route.is_ip:
        return Resolution(targets=(Target(0, route.host, route.host, route.port),), how="smtproutes")
    host, missing = await _host(dns_client, 0, route.host)
    if missing:
        return Resolution(status="D", report=perm_dns(route.host), how="smtproutes")
    return plan([host], route.port, "smtproutes", None)


async def resolve(host: str, control: Control, dns_client: DnsClient, mine: Mine,
                  port: int = SMTP_PORT, rng: random.Random | None = None) -> Resolution:
    """Where to deliver mail for ``host`` (a domain or an IP literal), as qmail-remote decides it."""
    route = smtproute_for(control, host)
    if route is not None:
        return await _relay(dns_client, route)
    literal = ip_literal(host)
    if literal is not None:
        return plan([MxHost(0, literal, (literal,))], port, "literal", mine.host)
    if normalize_name(host) == "":
        return Resolution(status="D", report=perm_dns(host), how="mx")
    mx = await dns_client.lookup(host, "MX")
    if mx.kind == "soft":
        return Resolution(status="Z", report=TEMP_DNS, how="mx")
    if mx.kind == "nxdomain":
        return Resolution(status="D", report=perm_dns(host), how="mx")
    if is_null_mx(mx.records):
        return Resolution(status="D", report=perm_null_mx(host), how="mx")
    records = [(pref, name) for pref, name in mx.records if name]  # "." mixed with real MXes: skip it
    if not records:
        fallback, missing = await _host(dns_client, 0, host)
        if missing:
            return Resolution(status="D", report=perm_dns(host), how="a")
        return plan([fallback], port, "a", mine.host)
    ordered = order_mx(records, rng or random.Random())
    looked_up = await asyncio.gather(*(_host(dns_client, pref, name) for pref, name in ordered))
    return plan([h for h, _ in looked_up], port, "mx", mine.host)


__all__ = [
    "ALWAYS_MINE",
    "PERM_AMBIGMX",
    "PERM_NOMX",
    "SMTP_PORT",
    "TEMP_DNS",
    "DnsClient",
    "Lookup",
    "Mine",
    "MxHost",
    "Resolution",
    "Target",
    "filter_backup_mx",
    "interface_networks",
    "ip_literal",
    "is_null_mx",
    "mine_from",
    "normalize_name",
    "order_mx",
    "parse_fib_trie",
    "parse_if_inet6",
    "parse_networks",
    "parse_resolvers",
    "perm_dns",
    "perm_null_mx",
    "plan",
    "resolve",
]
