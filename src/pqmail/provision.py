"""Provisioning in the classic ISP layout: customer handles, virtual domains, POP boxes, aliases, dial-ups.

A customer handle ``ex1`` lives under ``BASE/e/ex1/``: its POP boxes are Maildirs ``POP/ex1-NNNN`` and
each of its domains has a home ``DOMAINS/<domain>/`` holding that domain's dot-qmail files. A domain
is wired up exactly as a qmail administrator does it by hand:

* ``control/rcpthosts``: ``example.com`` and ``.example.com`` (SMTP accepts them);
* ``control/virtualdomains``: ``example.com:example.com`` and ``.example.com:example.com``, so
  ``joe@example.com`` becomes the local address ``example.com-joe``;
* ``users/assign``: ``+example.com-:OWNER:UID:GID:BASE/e/ex1/DOMAINS/example.com:-::``, compiled to
  ``users/cdb`` (newu), so ``example.com-joe`` is delivered by ``DOMAINS/example.com/.qmail-joe``;
* ``.qmail-postmaster`` (the handle's first box) and ``.qmail-default`` (``&postmaster@example.com``).

A dial-up customer gets ``BASE/<domain>/`` with ``RELAYHOST``, ``Maildir/`` and a ``.qmail-default``
of ``./Maildir/``; a relayed domain is a line in rcpthosts and smtproutes. ``users/handles`` records
each handle's BASE (``handle:base``) the first time it is used.

What it trusts: the operator who runs it (it runs as root to chown), nothing in the arguments (every
name is validated before it reaches a file name or a configuration line). What it never does: leave a
domain accepted by SMTP before it can be delivered (files first, then assign, virtualdomains, and
rcpthosts last; removal in the reverse order), overwrite a dot-qmail file or configuration entry an
administrator wrote (a clash is an error naming the file and line), make anything group- or
world-writable, or give a mailbox to root.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pqmail.config.assign import AssignEntry, AssignLine, compile_assign, parse_assign
from pqmail.config.casefold import ascii_lower
from pqmail.config.control import read_value
from pqmail.config.edit import ASSIGN, COLON, NAMES, LineFile
from pqmail.config.smtproutes import parse_relay
from pqmail.errors import ConfigError, UsageError
from pqmail.fsutil import atomic_write, fsync_dir
from pqmail.paths import Root
from pqmail.routing import safe_ext

if TYPE_CHECKING:
    from pqmail.passwords import PasswordStore

DEFAULT_POP_BASE = Path("/home/popmail")
DEFAULT_SERIAL_BASE = Path("/home/serialmail")
MAX_BOX = 9999
DIR_MODE = 0o755
FILE_MODE = 0o644

_HANDLE = re.compile(r"[a-z0-9][a-z0-9_]{0,31}")
_BOX = re.compile(r"([a-z0-9][a-z0-9_]{0,31})-([0-9]{4})")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-=?^_`{|}~")


# ----------------------------------------------------------------------------- validation (pure)

def domain_problem(d: str, min_labels: int = 2) -> str | None:
    """Why ``d`` (already lowercased) is not a usable mail domain, or None."""
    if not d:
        return "empty"
    if len(d) > 253:
        return "longer than 253 characters"
    if d.endswith("."):
        return "remove the trailing dot"
    if d.count(".") + 1 < min_labels:
        return "needs at least two labels (like example.com)"
    bad = next((label for label in d.split(".") if not _LABEL.fullmatch(label)), None)
    if bad == "":
        return "empty label (two dots in a row, or a leading dot)"
    if bad is not None:
        return f"label {bad!r} is not letters, digits and inner hyphens (at most 63)"
    return None


def local_problem(text: str) -> str | None:
    """Why ``text`` is not a usable local part, or None.

    A local part must be a dot-atom (RFC 5322 atext with inner dots) of at most 64 characters. That
    excludes ``/``, ``:``, ``@``, white space and control characters, so the dot-qmail file name made
    from it stays inside the home directory and cannot collide with another address's (``.`` maps to
    ``:`` in file names).
    """
    if not text:
        return "empty"
    if len(text) > 64:
        return "longer than 64 characters"
    if text.startswith(".") or text.endswith(".") or ".." in text:
        return "a dot may not start or end it, or follow another dot"
    bad = next((c for c in text if c not in _ATEXT and c != "."), None)
    return f"character {bad!r} is not allowed" if bad is not None else None


def validate_domain(text: str, what: str = "domain", min_labels: int = 2) -> str:
    """A mail domain, ASCII-lowercased: letters, digits and inner hyphens, labels of 1-63, at most 253."""
    d = ascii_lower(text)
    why = domain_problem(d, min_labels)
    if why:
        raise UsageError(f"invalid {what} {text!r}: {why}")
    return d


def validate_address(text: str, what: str = "address") -> tuple[str, str]:
    """``local@domain`` split at the last ``@``, both parts checked; the domain lowercased."""
    local, at, domain = text.rpartition("@")
    d = ascii_lower(domain)
    if not at:
        why = "no '@' (want local@domain)"
    elif (why := local_problem(local)) is not None:
        why = f"local part {local!r}: {why}"
    elif (why := domain_problem(d)) is not None:
        why = f"domain {domain!r}: {why}"
    if why:
        raise UsageError(f"invalid {what} {text!r}: {why}")
    return local, d


def validate_handle(text: str) -> str:
    """A customer handle: lowercase letters, digits and ``_``, starting with a letter or digit, at most 32."""
    if not _HANDLE.fullmatch(text):
        raise UsageError(f"invalid handle {text!r}: use lowercase letters, digits and '_' (at most 32, "
                         "starting with a letter or digit)")
    return text


def parse_box(text: str) -> tuple[str, int]:
    """``ex1-0001`` -> (``ex1``, 1)."""
    m = _BOX.fullmatch(text)
    if not m:
        raise UsageError(f"invalid box name {text!r}: want HANDLE-NNNN, like ex1-0001")
    return m.group(1), int(m.group(2))


def validate_relay(text: str, what: str = "relay") -> str:
    """``host[:port]`` as smtproutes and RELAYHOST take it; returned as given."""
    try:
        route = parse_relay(text, what, 0)
    except ConfigError as e:
        raise UsageError(f"invalid {what} {text!r}: {e.message}") from None
    if route is None:
        raise UsageError(f"invalid {what}: empty")
    return text


def absolute_base(text: str | os.PathLike[str]) -> Path:
    """An absolute BASE usable in users/assign and dot-qmail lines: no ``:``, white space or controls."""
    raw = os.fspath(text)
    if not raw or any(c == ":" or c.isspace() or not c.isprintable() for c in raw):
        raise UsageError(f"invalid base directory {raw!r}: it goes into users/assign and dot-qmail files, "
                         "so it may not contain ':', white space or control characters")
    return Path(os.path.abspath(raw))


def dotqmail_name(entry: AssignEntry) -> str:
    """The dot-qmail file qmail-local tries first for an assign answer (ext lowercased, `.` -> `:`)."""
    return f".qmail{entry.dash}{safe_ext(entry.ext)}"


def assign_lookup(lines: list[AssignLine], local: str) -> AssignEntry | None:
    """qmail-lspawn's lookup over parsed assign lines: exact, else the longest wildcard; first line wins."""
    key = ascii_lower(local)
    for line in lines:
        if line.kind == "=" and ascii_lower(line.key) == key:
            return line.entry
    best: AssignLine | None = None
    for line in lines:
        lk = ascii_lower(line.key)
        if line.kind == "+" and key.startswith(lk) and (best is None or len(lk) > len(best.key)):
            best = line
    if best is None:
        return None
    e = best.entry
    return AssignEntry(e.user, e.uid, e.gid, e.home, e.dash, e.ext + local[len(best.key):])


# ----------------------------------------------------------------------------- owner and layout

@dataclass(frozen=True)
class Owner:
    """The system user that owns mailboxes and dot-qmail files, and whose uid deliveries run as."""

    name: str
    uid: int
    gid: int

    def ids(self) -> tuple[int | None, int | None]:
        """uid/gid to chown to: only root changes owners (otherwise we are the owner already)."""
        return (self.uid, self.gid) if os.geteuid() == 0 else (None, None)


def lookup_owner(name: str) -> Owner:
    """The mail user ``name``: must exist, must not be root, and must be us unless we are root."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise UsageError(f"no such user {name!r} (the mail user must be a system account)") from None
    if pw.pw_uid == 0:
        raise UsageError(f"{name!r} is root: qmail never delivers as root; name an unprivileged user")
    if os.geteuid() != 0 and pw.pw_uid != os.geteuid():
        me = pwd.getpwuid(os.geteuid()).pw_name
        raise UsageError(f"only root can give mailboxes to {name!r}; run as root, or as {name!r} "
                         f"(running as {me!r})")
    return Owner(pw.pw_name, pw.pw_uid, pw.pw_gid)


def default_owner(root: Root) -> Owner:
    """control/mailuser; without it, the invoking user (never root)."""
    path = root.control_file("mailuser")
    name = read_value(path)
    if name:
        return lookup_owner(name)
    if os.geteuid() == 0:
        raise UsageError(f"{path}: missing; name the mail user with --owner USER")
    return lookup_owner(pwd.getpwuid(os.geteuid()).pw_name)


@dataclass(frozen=True)
class HandleLayout:
    """Where a handle's things live: ``BASE/<first letter>/<handle>/{POP,DOMAINS}``."""

    base: Path
    handle: str

    @property
    def home(self) -> Path:
        return self.base / self.handle[0] / self.handle

    @property
    def pop(self) -> Path:
        return self.home / "POP"

    @property
    def domains(self) -> Path:
        return self.home / "DOMAINS"

    def box_name(self, n: int) -> str:
        return f"{self.handle}-{n:04d}"

    def box(self, n: int) -> Path:
        return self.pop / self.box_name(n)


def handle_of_home(home: str | Path) -> str | None:
    """The handle of a domain home in the layout (``…/<h>/DOMAINS/<domain>``), else None."""
    parts = Path(home).parts
    return parts[-3] if len(parts) >= 4 and parts[-2] == "DOMAINS" else None


# ----------------------------------------------------------------------------- results

@dataclass(frozen=True)
class DomainInfo:
    domain: str
    kind: str  # "virtual", "dialup" or "relay"
    handle: str | None
    target: str  # the home directory, or the relay
    in_rcpthosts: bool


@dataclass(frozen=True)
class BoxInfo:
    box: str
    path: Path
    new: int
    cur: int
    size: int
    aliases: tuple[str, ...]
    has_password: bool
    is_maildir: bool


@dataclass(frozen=True)
class AliasInfo:
    address: str
    path: Path
    targets: tuple[str, ...]


@dataclass(frozen=True)
class DialupInfo:
    domain: str
    home: Path
    relayhost: str
    waiting: int


@dataclass
class Report:
    """What a command did, as lines for the operator."""

    lines: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.lines.append(text)


# ----------------------------------------------------------------------------- file helpers

def _makedirs(path: Path, ids: tuple[int | None, int | None]) -> None:
    """Create ``path`` and its missing parents, 0755 and owned by the owner; existing ones are left alone."""
    missing = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        os.mkdir(d, DIR_MODE)
        os.chmod(d, DIR_MODE)  # exact, whatever the umask
        if ids != (None, None):
            os.chown(d, -1 if ids[0] is None else ids[0], -1 if ids[1] is None else ids[1])
        fsync_dir(d.parent)
    if not path.is_dir():
        raise UsageError(f"{path}: exists and is not a directory")


def _write_file(path: Path, text: str, ids: tuple[int | None, int | None]) -> None:
    atomic_write(path, text.encode("latin-1"), mode=FILE_MODE, uid=ids[0], gid=ids[1])


def _first_line(path: Path) -> str:
    try:
        return path.read_bytes().split(b"\n", 1)[0].decode("latin-1").rstrip(" \t")
    except FileNotFoundError:
        return ""


def _read_lines(path: Path) -> list[str]:
    """A dot-qmail file's lines as qmail-local sees them (trailing space and tab removed)."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return []
    return [raw.decode("latin-1").rstrip(" \t") for raw in data.split(b"\n") if raw.strip()]


# ----------------------------------------------------------------------------- the provisioner

class Provisioner:
    """Every provisioning operation on one tree. Changes hold ``users/provision.lock``."""

    def __init__(self, root: Root, owner: str | None = None) -> None:
        if not root.control.is_dir() or not root.users.is_dir():
            raise UsageError(f"{root.path}: not a pqmail tree (no control/ or users/); "
                             "create one with pqmail init")
        self.root = root
        self._owner_name = owner
        self._owner: Owner | None = None
        self.rcpthosts = LineFile(root.control_file("rcpthosts"), NAMES)
        self.virtualdomains = LineFile(root.control_file("virtualdomains"), COLON)
        self.smtproutes = LineFile(root.control_file("smtproutes"), COLON)
        self.locals = LineFile(root.control_file("locals"), NAMES)
        self.assign = LineFile(root.assign, ASSIGN)
        self.handles = LineFile(root.users / "handles", COLON)

    @property
    def owner(self) -> Owner:
        if self._owner is None:
            self._owner = (lookup_owner(self._owner_name) if self._owner_name
                           else default_owner(self.root))
        return self._owner

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One provisioning change at a time: each one reads and rewrites several files."""
        fd = os.open(self.root.users / "provision.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _passwords(self) -> PasswordStore:
        """The password store, writing files owned by the mail user (imported late: argon2 is heavy)."""
        from pqmail.passwords import PasswordStore

        return PasswordStore(self.root, *self.owner.ids())

    # -- handles

    def handle_base(self, handle: str) -> tuple[int, Path] | None:
        """(line in users/handles, BASE) recorded for ``handle``, or None."""
        found = self.handles.find(handle)
        if not found:
            return None
        lineno, text = found[-1]
        return lineno, Path(text.split(":", 1)[1])

    def _base_for(self, handle: str, base: str | os.PathLike[str] | None) -> Path:
        recorded = self.handle_base(handle)
        if base is not None:
            wanted = absolute_base(base)
            if recorded is not None and recorded[1] != wanted:
                raise UsageError(f"{self.handles.path}:{recorded[0]}: {handle} lives under {recorded[1]}, "
                                 f"not {wanted}; leave out --base")
            return wanted
        return recorded[1] if recorded is not None else DEFAULT_POP_BASE

    def _layout(self, handle: str) -> HandleLayout:
        recorded = self.handle_base(handle)
        if recorded is None:
            raise UsageError(f"unknown handle {handle!r}: not in {self.handles.path}")
        return HandleLayout(recorded[1], handle)

    def _record_handle(self, handle: str, base: Path) -> None:
        self.handles.add(f"{handle}:{base}")

    # -- checks shared by the domain commands

    def _refuse_local(self, domain: str) -> None:
        found = self.locals.find(domain)
        if found:
            raise UsageError(f"{self.locals.path}:{found[0][0]}: {domain} is a local domain "
                             "(qmail never treats it as virtual); remove it there first")
        if not self.locals.path.exists() and ascii_lower(read_value(self.root.control_file("me")) or "") \
                == domain:
            raise UsageError(f"{domain} is this host's name (control/me), a local domain")

    def _refuse_key(self, lf: LineFile, key: str, why: str) -> None:
        found = lf.find(key)
        if found:
            raise UsageError(f"{lf.path}:{found[0][0]}: {found[0][1]!r}: {why}")

    def _assign_lines(self) -> list[AssignLine]:
        try:
            data = self.root.assign.read_bytes()
        except FileNotFoundError:
            return []
        return parse_assign(data, self.root.assign)

    def _newu(self) -> None:
        compile_assign(self.root)

    def _assign_line(self, prefix: str, home: Path) -> str:
        o = self.owner
        return f"+{prefix}-:{o.name}:{o.uid}:{o.gid}:{home}:-::"

    # -- domains

    def domain_add(self, domain: str, handle: str, base: str | os.PathLike[str] | None = None,
                   postmaster: str | None = None) -> Report:
        """A virtual domain of ``handle``: home, postmaster and default, assign, virtualdomains, rcpthosts."""
        d = validate_domain(domain)
        h = validate_handle(handle)
        pm = None if postmaster is None else "@".join(validate_address(postmaster, "postmaster address"))
        rep = Report()
        with self._locked():
            self._refuse_local(d)
            self._refuse_key(self.smtproutes, d, f"{d} is relayed to another server; remove it first")
            self._assign_lines()  # a malformed assign fails here, before anything changes
            lay = HandleLayout(self._base_for(h, base), h)
            home = lay.domains / d
            vd_lines = [f"{d}:{d}", f".{d}:{d}"]
            assign_line = self._assign_line(d, home)
            for lf, line in [(self.virtualdomains, ln) for ln in vd_lines] + [(self.assign, assign_line)]:
                lf.check_add(line)
            ids = self.owner.ids()
            _makedirs(lay.pop, ids)
            _makedirs(home, ids)
            pm_text = f"&{pm}" if pm else f"{lay.box(0)}/"
            for name, text in ((".qmail-postmaster", pm_text), (".qmail-default", f"&postmaster@{d}")):
                path = home / name
                if os.path.lexists(path):
                    rep.note(f"kept {path}")
                else:
                    _write_file(path, text + "\n", ids)
            self._record_handle(h, lay.base)
            if self.assign.add(assign_line):
                self._newu()
            for line in vd_lines:
                self.virtualdomains.add(line)
            self.rcpthosts.add(d)
            self.rcpthosts.add(f".{d}")
        rep.note(f"{d}: virtual domain of {h} in {home}")
        return rep

    def relay_add(self, domain: str, relay: str, handle: str | None = None) -> Report:
        """A domain we accept and pass on to the customer's own server (rcpthosts + smtproutes)."""
        d = validate_domain(domain)
        if handle is not None:
            validate_handle(handle)
        r = validate_relay(relay, "--relay")
        with self._locked():
            self._refuse_local(d)
            self._refuse_key(self.virtualdomains, d, f"{d} is a virtual domain; remove it first")
            self.smtproutes.check_add(f"{d}:{r}")
            self.smtproutes.add(f"{d}:{r}")
            self.rcpthosts.add(d)
        return Report([f"{d}: relayed to {r}"])

    def domain_remove(self, domain: str, purge: bool = False) -> Report:
        """Undo domain add / relay add / dialup add: rcpthosts first, then the routing, then the files."""
        d = validate_domain(domain)
        rep = Report()
        with self._locked():
            lines = self._assign_lines()  # a malformed assign fails here, before anything changes
            vd = self.virtualdomains.find(d)
            prefix = vd[-1][1].split(":", 1)[1] if vd else None
            home = self._home_for_prefix(lines, prefix) if prefix else None
            if purge and home is not None:
                self._check_purge(d, home)
            n = self.rcpthosts.remove(d) + self.rcpthosts.remove(f".{d}")
            n += self.virtualdomains.remove(d) + self.virtualdomains.remove(f".{d}")
            n += self.smtproutes.remove(d)
            if prefix and not any(text.split(":", 1)[1] == prefix
                                  for _, _, text in self.virtualdomains.entries()):
                removed = self.assign.remove(f"+{prefix}-")
                if removed:
                    self._newu()
                n += removed
            if n == 0:
                raise UsageError(f"{d} is not provisioned (not in rcpthosts, virtualdomains, smtproutes "
                                 "or users/assign)")
            rep.note(f"{d}: removed ({n} configuration lines)")
            if purge and home is not None and home.is_dir():
                shutil.rmtree(home)
                fsync_dir(home.parent)
                rep.note(f"deleted {home}")
            elif home is not None and home.is_dir():
                rep.note(f"kept {home} (use --purge to delete it)")
        return rep

    @staticmethod
    def _home_for_prefix(lines: list[AssignLine], prefix: str) -> Path | None:
        for line in lines:
            if line.kind == "+" and ascii_lower(line.key) == ascii_lower(f"{prefix}-"):
                return Path(line.entry.home)
        return None

    def _check_purge(self, domain: str, home: Path) -> None:
        if home.name != domain:
            raise UsageError(f"not purging {home}: it is not {domain}'s own directory")
        maildir = home / "Maildir"
        if maildir.is_dir():
            from pqmail.maildir import scan

            waiting = len(scan(maildir))
            if waiting:
                raise UsageError(f"not purging {home}: {maildir} holds {waiting} undelivered messages")

    def domains(self) -> list[DomainInfo]:
        """Every virtual, dial-up and relayed domain, from virtualdomains, users/assign and smtproutes."""
        rcpt = {k for _, k, _ in self.rcpthosts.entries()}
        lines = self._assign_lines()
        out: dict[str, DomainInfo] = {}
        for _, key, text in self.virtualdomains.entries():
            prefix = text.split(":", 1)[1]
            if not key or key.startswith(".") or "@" in key or not prefix:
                continue
            entry = assign_lookup(lines, f"{prefix}-")
            home = entry.home if entry else ""
            kind = "dialup" if home and os.path.exists(os.path.join(home, "RELAYHOST")) else "virtual"
            out[key] = DomainInfo(key, kind, handle_of_home(home) if home else None,
                                  home or f"(no users/assign entry for {prefix}-)", key in rcpt)
        for _, key, text in self.smtproutes.entries():
            relay = text.split(":", 1)[1]
            if key and not key.startswith(".") and relay and key not in out:
                out[key] = DomainInfo(key, "relay", None, relay, key in rcpt)
        return [out[k] for k in sorted(out)]

    # -- boxes

    def box_add(self, handle: str, password: str, base: str | os.PathLike[str] | None = None) -> str:
        """Create the next box ``handle-NNNN`` (a Maildir) with ``password`` hashed; return its name."""
        from pqmail.maildir import maildirmake
        from pqmail.passwords import hash_password

        h = validate_handle(handle)
        if not password or any(c in password for c in "\0\r\n"):
            raise UsageError("invalid password: empty, or contains a NUL, CR or LF")
        hashed = hash_password(password)
        with self._locked():
            lay = HandleLayout(self._base_for(h, base), h)
            store = self._passwords()
            n = self._next_box(lay, store.boxes())
            ids = self.owner.ids()
            _makedirs(lay.pop, ids)
            path = maildirmake(lay.box(n), *ids)
            try:
                store.set(lay.box_name(n), hashed, path)
            except BaseException:
                shutil.rmtree(path, ignore_errors=True)
                raise
            self._record_handle(h, lay.base)
        return lay.box_name(n)

    @staticmethod
    def _next_box(lay: HandleLayout, stored: list[str]) -> int:
        names = stored + (os.listdir(lay.pop) if lay.pop.is_dir() else [])
        used = {int(m.group(2)) for name in names if (m := _BOX.fullmatch(name)) and m.group(1) == lay.handle}
        n = max(used) + 1 if used else 0
        if n > MAX_BOX:
            raise UsageError(f"{lay.handle} has box number {MAX_BOX} already; no four-digit number is left")
        return n

    def _aliases_of(self, lay: HandleLayout) -> dict[str, list[str]]:
        """Maildir line (``…/ex1-0001/``) -> addresses whose dot-qmail file delivers there."""
        out: dict[str, list[str]] = {}
        if not lay.domains.is_dir():
            return out
        for domain in sorted(os.listdir(lay.domains)):
            home = lay.domains / domain
            if not home.is_dir():
                continue
            for name in sorted(os.listdir(home)):
                if not name.startswith(".qmail-"):
                    continue
                local = name[len(".qmail-"):].replace(":", ".")
                address = f"{'*' if local == 'default' else local}@{domain}"
                for line in _read_lines(home / name):
                    out.setdefault(line, []).append(address)
        return out

    def boxes(self, handle: str) -> list[BoxInfo]:
        """The handle's boxes with message counts, sizes and the addresses that reach them."""
        from pqmail.maildir import is_maildir, scan

        lay = self._layout(validate_handle(handle))
        stored = {b for b in self._passwords_readonly().boxes() if b.startswith(f"{lay.handle}-")}
        names = set(stored)
        if lay.pop.is_dir():
            names |= {n for n in os.listdir(lay.pop) if (m := _BOX.fullmatch(n)) and m.group(1) == lay.handle}
        aliases = self._aliases_of(lay)
        out = []
        for name in sorted(names):
            path = lay.pop / name
            ok = is_maildir(path)
            msgs = scan(path) if ok else []
            new = sum(m.in_new for m in msgs)
            out.append(BoxInfo(name, path, new, len(msgs) - new, sum(m.size for m in msgs),
                               tuple(aliases.get(f"{path}/", ())), name in stored, ok))
        return out

    def _passwords_readonly(self) -> PasswordStore:
        """The password store for reading: no mail user needed."""
        from pqmail.passwords import PasswordStore

        return PasswordStore(self.root)

    def box_remove(self, box: str, force: bool = False) -> Report:
        """Delete a box: refused while an address delivers to it, or while it holds mail (unless force)."""
        from pqmail.maildir import is_maildir, scan

        h, _ = parse_box(box)
        lay = self._layout(h)
        path = lay.pop / box
        with self._locked():
            store = self._passwords_readonly()
            known = box in store.boxes()
            if not known and not os.path.lexists(path):
                raise UsageError(f"no such box {box} ({path} does not exist)")
            users = self._aliases_of(lay).get(f"{path}/", [])
            if users:
                raise UsageError(f"{box} still receives mail for {', '.join(users)}; point those addresses "
                                 "elsewhere first (pqmail alias add ... --replace, or alias remove)")
            waiting = len(scan(path)) if is_maildir(path) else 0
            if waiting and not force:
                raise UsageError(f"{box} holds {waiting} messages; use --force to delete them with the box")
            if known:
                self._passwords().remove(box)
            if os.path.lexists(path):
                shutil.rmtree(path)
                fsync_dir(path.parent)
        return Report([f"{box}: removed" + (f" with {waiting} messages" if waiting else "")])

    # -- aliases

    def _domain_entry(self, domain: str, local: str) -> tuple[AssignEntry, str | None]:
        """The assign answer for ``local@domain`` (a virtual POP domain) and the domain's handle."""
        vd = self.virtualdomains.find(domain)
        prefix = vd[-1][1].split(":", 1)[1] if vd else ""
        if not prefix:
            raise UsageError(f"{domain} is not a virtual domain (no {domain}:prefix line in "
                             f"{self.virtualdomains.path})")
        entry = assign_lookup(self._assign_lines(), f"{prefix}-{local}")
        if entry is None or not entry.dash:
            raise UsageError(f"{domain}: no users/assign wildcard entry for {prefix}- with dash '-'")
        if os.path.exists(os.path.join(entry.home, "RELAYHOST")):
            raise UsageError(f"{domain} is a dial-up domain: all its mail goes to the customer's Maildir")
        return entry, handle_of_home(entry.home)

    def alias_add(self, address: str, box: str | None = None, forward: str | None = None,
                  replace: bool = False) -> Report:
        """``.qmail-<local>`` delivering to a box's Maildir, or forwarding (``&address``)."""
        from pqmail.maildir import is_maildir

        local, d = validate_address(address)
        if (box is None) == (forward is None):
            raise UsageError("give either a BOX or --forward ADDRESS")
        with self._locked():
            entry, dom_handle = self._domain_entry(d, local)
            if box is not None:
                h, _ = parse_box(box)
                if dom_handle is not None and h != dom_handle:
                    raise UsageError(f"{box} belongs to {h}, but {d} belongs to {dom_handle}")
                path = self._layout(h).pop / box
                if not is_maildir(path):
                    raise UsageError(f"no such box {box} ({path} is not a Maildir)")
                text = f"{path}/"
            else:
                fl, fd = validate_address(forward or "", "forward address")
                text = f"&{fl}@{fd}"
            path = Path(entry.home) / dotqmail_name(entry)
            if os.path.lexists(path):
                current = _read_lines(path)
                if current == [text]:
                    return Report([f"{local}@{d}: already {text}"])
                if not replace:
                    shown = "; ".join(current) or "empty"
                    raise UsageError(f"{path}: already exists ({shown}); use --replace to change it")
            _write_file(path, text + "\n", self.owner.ids())
        return Report([f"{local}@{d}: {text}"])

    def aliases(self, domain: str) -> list[AliasInfo]:
        """Every dot-qmail file of a virtual domain, with what it delivers to (boxes by name)."""
        d = validate_domain(domain)
        entry, handle = self._domain_entry(d, "")
        home = Path(entry.home)
        stem = dotqmail_name(entry)
        pop = f"{self._layout(handle).pop}/" if handle and self.handle_base(handle) else None
        out = []
        for name in sorted(os.listdir(home)):
            if not name.startswith(stem) or not (home / name).is_file():
                continue
            local = name[len(stem):].replace(":", ".")
            targets = []
            for line in _read_lines(home / name):
                if pop and line.startswith(pop) and _BOX.fullmatch(line[len(pop):].rstrip("/")):
                    targets.append(line[len(pop):].rstrip("/"))
                else:
                    targets.append(line)
            out.append(AliasInfo(f"{'*' if local == 'default' else local}@{d}", home / name, tuple(targets)))
        return out

    def alias_remove(self, address: str) -> Report:
        local, d = validate_address(address)
        if ascii_lower(local) == "postmaster":
            raise UsageError(f"postmaster@{d} must exist (RFC 5321); point it elsewhere with "
                             "pqmail alias add ... --replace")
        with self._locked():
            entry, _ = self._domain_entry(d, local)
            path = Path(entry.home) / dotqmail_name(entry)
            if not os.path.lexists(path):
                raise UsageError(f"no alias {local}@{d} ({path} does not exist)")
            path.unlink()
            fsync_dir(path.parent)
        return Report([f"{local}@{d}: removed {path}"])

    # -- dial-up

    def dialup_add(self, domain: str, handle: str, relayhost: str,
                   base: str | os.PathLike[str] | None = None) -> Report:
        """``BASE/<domain>/`` (RELAYHOST, Maildir/, .qmail-default); assign, virtualdomains, rcpthosts."""
        from pqmail.maildir import is_maildir, maildirmake

        d = validate_domain(domain)
        validate_handle(handle)
        relay = validate_relay(relayhost, "--relayhost")
        home = (absolute_base(base) if base is not None else DEFAULT_SERIAL_BASE) / d
        rep = Report()
        with self._locked():
            self._refuse_local(d)
            self._refuse_key(self.smtproutes, d, f"{d} is relayed to another server; remove it first")
            self._assign_lines()  # a malformed assign fails here, before anything changes
            assign_line = self._assign_line(d, home)
            self.virtualdomains.check_add(f"{d}:{d}")
            self.assign.check_add(assign_line)
            ids = self.owner.ids()
            _makedirs(home, ids)
            maildir = home / "Maildir"
            if not os.path.lexists(maildir):
                maildirmake(maildir, *ids)
            elif not is_maildir(maildir):
                raise UsageError(f"{maildir}: exists and is not a Maildir")
            if _first_line(home / "RELAYHOST") != relay:
                _write_file(home / "RELAYHOST", relay + "\n", ids)
            if not os.path.lexists(home / ".qmail-default"):
                _write_file(home / ".qmail-default", "./Maildir/\n", ids)
            if self.assign.add(assign_line):
                self._newu()
            self.virtualdomains.add(f"{d}:{d}")
            self.rcpthosts.add(d)
        rep.note(f"{d}: dial-up customer {handle} in {home}, flushed to {relay}")
        return rep

    def dialups(self) -> list[DialupInfo]:
        from pqmail.maildir import is_maildir, scan

        out = []
        for info in self.domains():
            if info.kind != "dialup":
                continue
            home = Path(info.target)
            maildir = home / "Maildir"
            out.append(DialupInfo(info.domain, home, _first_line(home / "RELAYHOST"),
                                  len(scan(maildir)) if is_maildir(maildir) else 0))
        return out
