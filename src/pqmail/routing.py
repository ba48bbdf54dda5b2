"""Routing core: where an envelope recipient goes, decided as qmail-send, qmail-lspawn and qmail-local do.

Pure functions over a loaded :class:`~pqmail.config.control.Control` and a users database object
(anything with ``.lookup(local) -> AssignEntry | None``, the only I/O, done by the caller's object);
this module opens no file and no socket and uses no asyncio.
References are to qmail-semantics.md:

* :func:`rewrite_recipient` (§1, qmail-send ``rewrite()``): envnoathost, percenthack, locals,
  virtualdomains; local or remote.
* :func:`route`: that decision plus, for local mail, the users/assign entry (§2.3) and the dot-qmail
  files to try (§3.1). :func:`local_route` is the second half alone, for an address that has already
  been rewritten (what qmail-lspawn sees); never feed a rewritten address back to :func:`route`, which
  would add the virtual-domain prefix a second time.
* :func:`strip_vdom_prefix` (§1, bounces), :func:`verp_expand` (§3.8), and
  :func:`inject_qualify` (§1, qmail-inject's defaulthost/plusdomain/defaultdomain).

**File-name safety rule** (:func:`safe_ext`). qmail lowercases the extension (ASCII only) and turns
every ``.`` into ``:``, so ``..`` can never appear. pqmail additionally turns ``/``, NUL and every
other control character (0x00-0x1f, 0x7f) into ``:``. The mapping is one character for one, so the
DEFAULT value can still be cut from the original-case extension at the same position. Every
candidate therefore is ``.qmail`` + dash + text without ``/`` or NUL: with the usual dash (empty or
``-``) it is a single file name inside the home directory, never ``..``, whatever the remote sender
put in the local part. (A dash containing ``/``, as in qmail's ``-/`` subdirectory convention, comes
from users/assign, which the administrator controls.) Candidates longer than NAME_MAX (255 bytes)
are left out: they cannot exist, and qmail's open() of them fails as "missing" too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pqmail.addresses import inject_qualify as inject_qualify  # re-exported
from pqmail.addresses import split_address
from pqmail.config.casefold import ascii_lower

if TYPE_CHECKING:
    from pqmail.config.assign import AssignEntry
    from pqmail.config.control import Control

NAME_MAX = 255

# ASCII-only lowercase (qmail's case_lowerb) plus the file-name safety mapping, one char for one.
_SAFE = {c: ":" for c in [*range(0x20), 0x7F, ord("."), ord("/")]}
_SAFE.update({c: c + 32 for c in range(ord("A"), ord("Z") + 1)})


class UsersLike(Protocol):
    """What :func:`route` needs from users/cdb (``pqmail.config.assign.UsersDB`` or a test double)."""

    def lookup(self, local: str) -> AssignEntry | None: ...


# ----------------------------------------------------------------------------- qmail-send rewrite()

@dataclass(frozen=True)
class Rewrite:
    """The rewritten recipient and whether it is local.

    ``rule`` says which step decided: ``locals``, ``virtualdomains`` (rewritten to ``prefix-addr``),
    ``exception`` (a virtualdomains line with an empty prefix: remote) or ``remote`` (nothing matched).
    ``key`` is the locals/virtualdomains key that matched; ``steps`` notes envnoathost/percenthack.
    """

    address: str
    is_local: bool
    rule: str = "remote"
    key: str | None = None
    prefix: str | None = None
    steps: tuple[str, ...] = ()


def vdom_keys(addr: str) -> list[str]:
    """virtualdomains keys for ``local@domain`` in qmail-send's order (lowercased for lookup).

    The whole address, the domain, its dot-suffixes longest first, then the empty key.
    """
    _, domain = split_address(addr)
    domain = ascii_lower(domain)
    keys = [ascii_lower(addr), domain]
    keys.extend(domain[i:] for i in range(1, len(domain)) if domain[i] == ".")
    keys.append("")
    return keys


def rewrite_recipient(control: Control, addr: str) -> Rewrite:
    """qmail-send's ``rewrite()``: decide local or remote and apply the virtual-domain prefix (§1).

    The address keeps its case; only lookups ignore (ASCII) case.
    """
    steps: list[str] = []
    at = addr.rfind("@")
    if at < 0:
        at = len(addr)
        addr = f"{addr}@{control.envnoathost}"
        steps.append(f"no @: appended @{control.envnoathost} (envnoathost)")

    while ascii_lower(addr[at + 1:]) in control.percenthack:
        j = addr.rfind("%", 0, at)
        if j < 0:
            break
        before = addr
        addr = f"{addr[:j]}@{addr[j + 1:at]}"
        at = j
        steps.append(f"percenthack: {before} -> {addr}")

    domain = ascii_lower(addr[at + 1:])
    if domain in control.locals:
        return Rewrite(addr, True, "locals", domain, steps=tuple(steps))

    for key in vdom_keys(addr):
        prefix = control.virtualdomains.get(key)
        if prefix is None:
            continue
        if prefix == "":
            return Rewrite(addr, False, "exception", key, "", tuple(steps))
        return Rewrite(f"{prefix}-{addr}", True, "virtualdomains", key, prefix, tuple(steps))
    return Rewrite(addr, False, "remote", steps=tuple(steps))


def strip_vdom_prefix(control: Control, recipient: str) -> str:
    """qmail-send's ``stripvdomprepend``: the original address for a bounce's recipient line.

    Tries the domain, its dot-suffixes and the empty key (never ``user@domain``); the first key
    present decides. If its prefix (compared exactly) plus ``-`` starts the recipient, that is removed.
    """
    at = recipient.rfind("@")
    if at < 0:
        return recipient
    for key in vdom_keys(recipient)[1:]:
        prefix = control.virtualdomains.get(key)
        if prefix is None:
            continue
        if prefix and recipient.startswith(prefix + "-"):
            return recipient[len(prefix) + 1:]
        return recipient
    return recipient


def verp_expand(sender: str, recipient: str) -> str:
    """qmail-send's ``senderadd`` (§3.8): ``pre@host-@[]`` to ``pre`` + box + ``=`` + domain + ``@host``.

    Any other sender, or a recipient without ``@``, leaves the sender unchanged.
    """
    if not sender.endswith("-@[]"):
        return sender
    body = sender[:-4]
    j = body.rfind("@")
    k = recipient.rfind("@")
    if j < 0 or k < 0:
        return sender
    return f"{body[:j]}{recipient[:k]}={recipient[k + 1:]}@{body[j + 1:]}"


# ----------------------------------------------------------------------------- qmail-local qmesearch()

def safe_ext(ext: str) -> str:
    """The extension as used in file names: ASCII-lowercased, ``.``/``/``/NUL/control chars -> ``:``."""
    return ext.translate(_SAFE)


def _fits(name: str) -> bool:
    try:
        size = len(name.encode("latin-1"))
    except UnicodeEncodeError:
        size = len(name.encode("utf-8", "surrogatepass"))
    return size <= NAME_MAX


def dotqmail_candidates(dash: str, ext: str) -> list[tuple[str, str | None]]:
    """Dot-qmail file names to try in the home directory, in order, each with the DEFAULT it sets.

    1. ``.qmail`` + dash + safeext; DEFAULT is None, unless that name itself ends in ``default``
       (then, as qmail does, the original-case part of ext that ``default`` stands for).
    2. ``.qmail`` + dash + safeext[:i] + ``default`` for i from len(safeext) down to 0 where i == 0
       or safeext[i-1] == ``-``; DEFAULT = ext[i:] (original case).

    With an empty dash and ext this gives ``.qmail`` then ``.qmaildefault`` (qmail's quirk). A name
    appearing twice is listed once; names longer than NAME_MAX are left out (see the module doc).
    """
    safe = safe_ext(ext)
    out: list[tuple[str, str | None]] = []
    exact_default = ext[len(safe) - 7:] if len(safe) >= 7 and safe.endswith("default") else None
    out.append((f".qmail{dash}{safe}", exact_default))
    for i in range(len(safe), -1, -1):
        if i == 0 or safe[i - 1] == "-":
            out.append((f".qmail{dash}{safe[:i]}default", ext[i:]))
    seen: set[str] = set()
    result = []
    for name, default in out:
        if name not in seen and _fits(name):
            seen.add(name)
            result.append((name, default))
    return result


def owner_files(dash: str, ext: str) -> tuple[str, str]:
    """The files qmail-local checks for the forwarding sender (§3.7): ``-owner`` and ``-owner-default``."""
    base = f".qmail{dash}{safe_ext(ext)}"
    return f"{base}-owner", f"{base}-owner-default"


# ----------------------------------------------------------------------------- route()

@dataclass(frozen=True)
class LocalRoute:
    """Local delivery of ``address`` (after rewriting), split into ``local`` and ``domain``.

    ``entry`` is the users/assign match, or None: no match (the caller applies qmail-getpw's
    passwd/alias fallback and then :func:`dotqmail_candidates`), or a trash address (``local == ""``:
    delivered nowhere, successfully). ``candidates`` are the dot-qmail names for ``entry``.
    """

    address: str
    local: str
    domain: str
    entry: AssignEntry | None
    candidates: tuple[tuple[str, str | None], ...]
    rewrite: Rewrite | None = None

    @property
    def trash(self) -> bool:
        return self.local == ""


@dataclass(frozen=True)
class RemoteRoute:
    """Remote delivery of ``address`` to the host ``domain`` (smtproutes/MX are decided later)."""

    address: str
    domain: str
    rewrite: Rewrite | None = None


def local_route(users: UsersLike, address: str, rewrite: Rewrite | None = None) -> LocalRoute:
    """qmail-lspawn's half: look up an already rewritten local address in users/cdb."""
    local, domain = split_address(address)
    if local == "":
        return LocalRoute(address, local, domain, None, (), rewrite)
    entry = users.lookup(local)
    candidates = tuple(dotqmail_candidates(entry.dash, entry.ext)) if entry is not None else ()
    return LocalRoute(address, local, domain, entry, candidates, rewrite)


def route(control: Control, users: UsersLike, addr: str) -> LocalRoute | RemoteRoute:
    """The whole decision for an envelope recipient as received (before rewriting)."""
    rw = rewrite_recipient(control, addr)
    if not rw.is_local:
        return RemoteRoute(rw.address, split_address(rw.address)[1], rw)
    return local_route(users, rw.address, rw)
