"""ETRN (RFC 1985) for pqmail smtpd: a customer asks us to push its waiting mail now.

``ETRN some.example.com`` names one node (a dial-up customer's domain), ``ETRN @example.com`` a domain
and every dial-up domain below it, ``ETRN #queue`` a queue name (not supported here: 458). The reply
comes at once; the mail goes later, over a *new* outgoing connection to the customer's RELAYHOST, by a
flush started in the background (:func:`start_flush`), never over the requesting connection
(qmail-semantics.md §7.6).

Who may ask for a node: a client whose IP address is listed in the customer's ``DIR/ETRNCLIENTS`` (one
IP address or CIDR network a line; ``#`` comments), or a client that authenticated (SMTP AUTH) as the
customer, i.e. with the dial-up password set by ``pqmail serialmail passwd DOMAIN``, whose login is the
domain itself.

Replies (RFC 1985 §5; enhanced status codes as pqmail smtpd gives them everywhere):

* ``253 2.0.0 OK, <n> pending messages for node <x> started``: a flush was started;
* ``252 2.0.0 OK, pending messages for node <x> started``: mail waits and a transfer is already under
  way (its lock is held), so the count would be stale;
* ``250 2.0.0 OK, queuing for node <x> started``: the count could not be taken; a flush was started;
* ``251 2.0.0 OK, no messages waiting for node <x>``;
* ``458 4.3.0 Unable to queue messages for node <x>``: ``#queue`` names, or our configuration failed;
* ``459 4.7.1 Node <x> not allowed: <reason>``: not a dial-up customer here, or the client may not ask;
* ``501 5.5.4 ...``: no argument, or more than one. (``500`` is the server's, for an unknown command.)

What it trusts: provisioning's files, ETRNCLIENTS, and the AUTH identity the server established. What it
never does: deliver on the requesting connection, block the SMTP worker on a transfer, or tell a client
that may not ask anything about a customer's mail.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from pqmail.config.casefold import ascii_lower
from pqmail.config.control import load_control, read_lines
from pqmail.errors import PqmailError
from pqmail.maildir import scan
from pqmail.paths import Root, default_root
from pqmail.queue.store import Queue
from pqmail.serialmail.flush import DirLock, flush
from pqmail.serialmail.runner import find_dialups, load_settings

# Every import is at the top: the SMTP worker that calls us runs after a privilege drop (see flush.py).

__all__ = ["Candidate", "EtrnDecision", "decide", "etrn_decision", "handle_etrn", "parse_etrn", "start_flush"]

ETRNCLIENTS = "ETRNCLIENTS"
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class EtrnDecision(NamedTuple):
    """The reply, and the dial-up directories to flush (empty for every refusal)."""

    code: int
    text: str
    dirs: tuple[Path, ...]

    @property
    def reply(self) -> str:
        return f"{self.code} {self.text}"


@dataclass(frozen=True)
class Request:
    node: str  # as given, for the reply
    domain: str  # lowercased, without '@'
    subdomains: bool  # '@domain' form


@dataclass(frozen=True)
class Candidate:
    """A dial-up customer matching the request, with what the caller found out about it."""

    domain: str
    dir: Path
    allowed: bool
    waiting: int | None  # None: could not be counted
    busy: bool = False


# ----------------------------------------------------------------------------- pure

def _clean(text: str) -> str:
    return "".join(c if " " < c <= "~" else "?" for c in text[:200])


def parse_etrn(argument: str | None) -> Request | EtrnDecision:
    """The ETRN argument: ``host``, ``@domain`` or ``#queue``; a refusal when it is unusable."""
    arg = (argument or "").strip()
    if not arg or len(arg.split()) != 1:
        return EtrnDecision(501, "5.5.4 Syntax: ETRN [@]node (one node)", ())
    if arg.startswith("#"):
        return EtrnDecision(458, f"4.3.0 Unable to queue messages for node {_clean(arg)}: queue names "
                                 "are not supported here", ())
    subdomains = arg.startswith("@")
    domain = ascii_lower(arg[1:] if subdomains else arg).rstrip(".")
    if not domain or any(not (c.isalnum() or c in "-._[]:") for c in domain):
        return EtrnDecision(501, f"5.5.4 Syntax error in node {_clean(arg)}", ())
    return Request(arg, domain, subdomains)


def matches(request: Request, domain: str) -> bool:
    """``host`` names exactly that domain; ``@domain`` the domain and everything below it."""
    d = ascii_lower(domain)
    return d == request.domain or (request.subdomains and d.endswith("." + request.domain))


def client_allowed(client_ip: str | None, networks: Sequence[_Network], authenticated_as: str | None,
                   domain: str) -> bool:
    """Authenticated as the customer (login = its domain), or connecting from a listed address."""
    if authenticated_as and ascii_lower(authenticated_as) == ascii_lower(domain):
        return True
    if not client_ip:
        return False
    try:
        ip = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in networks)


def decide(request: Request, candidates: Sequence[Candidate]) -> EtrnDecision:
    """RFC 1985's reply for the customers matching ``request``."""
    node = _clean(request.node)
    if not candidates:
        return EtrnDecision(459, f"4.7.1 Node {node} not allowed: not a dial-up customer of this server", ())
    allowed = [c for c in candidates if c.allowed]
    if not allowed:
        return EtrnDecision(459, f"4.7.1 Node {node} not allowed: ask from an address listed in its "
                                 f"{ETRNCLIENTS}, or authenticate as the customer", ())
    dirs = tuple(c.dir for c in allowed if c.waiting != 0)
    if not dirs:
        return EtrnDecision(251, f"2.0.0 OK, no messages waiting for node {node}", ())
    if any(c.waiting is None for c in allowed):
        return EtrnDecision(250, f"2.0.0 OK, queuing for node {node} started", dirs)
    if any(c.busy for c in allowed if c.waiting):
        return EtrnDecision(252, f"2.0.0 OK, pending messages for node {node} started", dirs)
    total = sum(c.waiting or 0 for c in allowed)
    return EtrnDecision(253, f"2.0.0 OK, {total} pending messages for node {node} started", dirs)


# ----------------------------------------------------------------------------- gathering the facts

def read_networks(dir: Path) -> list[_Network]:
    """DIR/ETRNCLIENTS: one IP address or CIDR network a line; unusable lines are ignored."""
    out: list[_Network] = []
    for _, text in read_lines(dir / ETRNCLIENTS):
        try:
            out.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            continue
    return out


def _waiting(dir: Path) -> tuple[int | None, bool]:
    """(messages waiting or None, whether a transfer holds the customer's lock now)."""
    try:
        n = len(scan(dir / "Maildir"))
    except OSError:
        return None, False
    busy = False
    if n:
        try:
            lock = DirLock.try_lock(dir)
        except PqmailError:
            lock = None
        else:
            busy = lock is None
        if lock is not None:
            lock.release()
    return n, busy


def etrn_decision(argument: str | None, client_ip: str | None, authenticated_as: str | None,
                  root: Root) -> EtrnDecision:
    """Everything ETRN decides: parse, find the customers, check the client, count the mail."""
    parsed = parse_etrn(argument)
    if isinstance(parsed, EtrnDecision):
        return parsed
    try:
        dialups = [d for d in find_dialups(root) if matches(parsed, d.domain)]
    except (PqmailError, OSError):
        return EtrnDecision(458, f"4.3.0 Unable to queue messages for node {_clean(parsed.node)}", ())
    candidates = []
    for d in dialups:
        try:
            ok = client_allowed(client_ip, read_networks(d.dir), authenticated_as, d.domain)
        except (PqmailError, OSError):
            ok = False
        waiting, busy = _waiting(d.dir) if ok else (None, False)
        candidates.append(Candidate(d.domain, d.dir, ok, waiting, busy))
    return decide(parsed, candidates)


# ----------------------------------------------------------------------------- acting on it

def start_flush(dir: str | os.PathLike[str], root: Root | None = None) -> int:
    """Start ``pqmail serialmail flush DIR`` detached from us; return at once (with a pid, for logs).

    Normally a new interpreter (``python -m pqmail.cli.serialmail_cmd flush DIR``) in its own session,
    with our stderr so that its log reaches ours, reaped by a daemon thread. When we cannot read our
    own interpreter's files (a service after its privilege drop, with Python installed where only root
    may read: see pqmail.supervisor), a double fork runs the flush with the modules already loaded.
    The flush takes the customer's lock itself, so a flush already running makes this one exit at once.
    """
    root = root or Root(default_root())
    if not _can_exec():
        return _fork_flush(Path(dir), root)
    cmd = [sys.executable, "-m", "pqmail.cli.serialmail_cmd", "flush", os.fspath(dir),
           "--root", os.fspath(root.path)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)
    threading.Thread(target=proc.wait, name=f"etrn-flush-{proc.pid}", daemon=True).start()
    return proc.pid


def _can_exec() -> bool:
    paths = (sys.executable, os.path.dirname(os.__file__), os.path.dirname(os.path.dirname(__file__)))
    return all(os.access(p, os.R_OK | os.X_OK) for p in paths)


def _fork_flush(dir: Path, root: Root) -> int:
    """Run the flush in a grandchild adopted by init, so that we never have a zombie to reap."""
    pid = os.fork()
    if pid == 0:
        code = 111
        try:
            os.setsid()
            if os.fork() > 0:
                os._exit(0)
            # The worker's sockets (listeners, client connections) must not live on in the flush.
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))
            asyncio._set_running_loop(None)  # forked from a loop's thread, we run our own loop
            queue = Queue(root.queue)
            result = flush(dir, lifetime=load_settings(root).lifetime, control=load_control(root),
                           queue=queue)
            code = 111 if result.status in ("deferred", "failed", "interrupted") else 0
        except BaseException:
            code = 111
        finally:
            os._exit(code)
    os.waitpid(pid, 0)  # the middle child exits at once
    return pid


def handle_etrn(argument: str | None, client_ip: str | None, authenticated_as: str | None,
                root: Root) -> str:
    """The whole ETRN command for an SMTP server: decide, start the flushes, return the reply line.

    Blocking (it reads files and forks): call it in a thread from an event loop.
    """
    decision = etrn_decision(argument, client_ip, authenticated_as, root)
    try:
        for d in decision.dirs:
            start_flush(d, root)
    except OSError:
        return f"458 4.3.0 Unable to queue messages for node {_clean(argument or '')}"
    return decision.reply
