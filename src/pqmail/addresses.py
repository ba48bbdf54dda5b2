"""Helpers that need no other module: split at the last ``@``, qmail-inject's qualification, and
qmail's date822fmt.

Kept apart from pqmail.routing (which re-exports them) so that ``pqmail inject`` and ``sendmail``,
run once per message by cron jobs and web applications, import nothing heavier than this.
"""

from __future__ import annotations

import time

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def date822(when: float | None = None) -> str:
    """qmail's date822fmt: ``24 Nov 2026 23:59:59 -0000`` (UTC, day not padded)."""
    t = time.gmtime(time.time() if when is None else when)
    return (f"{t.tm_mday} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} -0000")


def split_address(addr: str) -> tuple[str, str]:
    """(local part, domain) split at the **last** ``@``; an address without ``@`` has domain ``""``."""
    at = addr.rfind("@")
    return (addr, "") if at < 0 else (addr[:at], addr[at + 1:])


def inject_qualify(addr: str, defaulthost: str, defaultdomain: str, plusdomain: str) -> str:
    """qmail-inject's ``rwgeneric`` for one plain address (§1); only inject applies it.

    ``<>`` and ``x@[]`` stay as they are. A final ``.`` and then a final ``@`` are dropped. Then, in
    order: no ``@`` gets ``@defaulthost``; a host ending in ``+`` loses it and gets ``.plusdomain``;
    a host that still has no dot and is not a ``[literal]`` gets ``.defaultdomain``. The caller
    resolves the QMAILDEFAULTHOST/QMAILPLUSDOMAIN/QMAILDEFAULTDOMAIN overrides first. qmail works on
    RFC 822 tokens; this works on the address text, so comments and source routes must be gone.
    """
    if addr == "" or addr.endswith("@[]"):
        return addr
    if addr.endswith("."):
        addr = addr[:-1]
    if addr.endswith("@"):
        addr = addr[:-1]
    if addr == "":
        return ""
    if "@" not in addr:
        addr = f"{addr}@{defaulthost}"
    local, host = split_address(addr)
    if host.endswith("+"):
        host = f"{host[:-1]}.{plusdomain}"
    if "." not in host and not (host.startswith("[") and host.endswith("]")):
        host = f"{host}.{defaultdomain}"
    return f"{local}@{host}"
