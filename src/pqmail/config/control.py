"""control/: read qmail's control files and resolve every setting with qmail's defaults.

Same files, same meanings (qmail-semantics.md §0, §1, §5.3, §6.1): a missing file gives qmail's
default, most host names default to ``control/me``, list files follow ``control_readfile`` (trailing
space, tab and LF stripped; empty lines and lines whose first character is ``#`` skipped; leading
whitespace kept), lookups ignore ASCII case and a later line beats an earlier one.

Where qmail is silent or sloppy, pqmail is strict or at least loud:

* A NUL byte, an unreadable file (permissions, a directory in its place) or an unusable smtproutes line
  is a :class:`~pqmail.errors.ConfigError` naming ``file:line``.
* What qmail quietly ignores or misreads (a number with no leading digit, a virtualdomains line without
  ``:``, a CR at the end of a line, a stale morercpthosts.cdb) still loads as qmail would, and is
  recorded in :attr:`Control.warnings` for ``pqmail showctl`` and ``pqmail check``.
* A missing ``control/rcpthosts`` makes qmail an open relay. pqmail never is one:
  :func:`rcpthosts_allows` then refuses every domain.

What it trusts: nothing in the files. What it never does: write a file, open a socket, or look at
anything outside ``control/`` (plus the morercpthosts cdb when asked about a domain).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pqmail.config import smtproutes as _smtproutes
from pqmail.config.casefold import ascii_lower
from pqmail.config.smtproutes import Route
from pqmail.errors import ConfigError
from pqmail.paths import Root

__all__ = [
    "CONF_SPAWN",
    "Control",
    "Route",
    "badmailfrom_matches",
    "control_stamp",
    "load_control",
    "rcpthosts_allows",
    "read_lines",
    "read_lines_or_none",
    "read_value",
    "smtproute_for",
    "smtproute_match",
]

# qmail's conf-spawn: the silent cap on concurrencylocal and concurrencyremote.
CONF_SPAWN = 120

# Single-value settings that default to control/me (qmail-showctl's flagme), with the literal
# placeholder qmail falls back to when me is missing too.
ME_DERIVED = (
    "bouncehost", "doublebouncehost", "envnoathost", "helohost", "localiphost", "smtpgreeting",
    "defaultdomain", "defaulthost", "idhost", "plusdomain",
)
STRING_DEFAULTS = {"bouncefrom": "MAILER-DAEMON", "doublebounceto": "postmaster"}
INT_DEFAULTS = {
    "concurrencylocal": 10, "concurrencyremote": 20, "databytes": 0, "queuelifetime": 604800,
    "timeoutconnect": 60, "timeoutremote": 1200, "timeoutsmtpd": 1200,
}
LIST_FILES = ("locals", "rcpthosts", "morercpthosts", "percenthack", "virtualdomains", "smtproutes",
              "badmailfrom")
# Every name load_control reads: what control_stamp watches.
LOADED_FILES = frozenset(("me", *ME_DERIVED, *STRING_DEFAULTS, *INT_DEFAULTS, *LIST_FILES,
                          "morercpthosts.cdb"))


def __getattr__(name: str) -> frozenset[str]:
    """``KNOWN_FILES``: every control file some part of pqmail reads, for showctl's "other files".

    Derived from config/reference.py (which documents each one) on first use, so that services that
    import this module do not pay for building the reference (a few ms).
    """
    if name == "KNOWN_FILES":
        from pqmail.config.reference import control_names

        known = LOADED_FILES | control_names()
        globals()["KNOWN_FILES"] = known
        return known
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- reading files

def _read_bytes(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(path, f"unable to read: {e.strerror or e}") from None


def _split(data: bytes, path: Path) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    pieces = data.split(b"\n")
    if pieces and pieces[-1] == b"":
        pieces.pop()  # the text after the final LF is not a line
    for lineno, raw in enumerate(pieces, 1):
        if b"\0" in raw:
            raise ConfigError(path, "contains a NUL byte", lineno)
        line = raw.rstrip(b" \t").decode("latin-1")
        if line and not line.startswith("#"):
            out.append((lineno, line))
    return out


def read_lines_or_none(path: Path | str) -> list[tuple[int, str]] | None:
    """control_readfile: the (line number, text) pairs that count, or None when the file is missing."""
    path = Path(path)
    data = _read_bytes(path)
    return None if data is None else _split(data, path)


def read_lines(path: Path | str) -> list[tuple[int, str]]:
    """control_readfile: like :func:`read_lines_or_none`, but a missing file gives ``[]``."""
    return read_lines_or_none(path) or []


def read_value(path: Path | str) -> str | None:
    """control_readline: the first line with trailing space, tab and LF removed; None when missing.

    Like qmail, only the first line counts and it is taken as it is (an empty first line gives ``""``;
    ``#`` is not a comment here).
    """
    path = Path(path)
    data = _read_bytes(path)
    if data is None:
        return None
    first = data.split(b"\n", 1)[0]
    if b"\0" in first:
        raise ConfigError(path, "contains a NUL byte", 1)
    return first.rstrip(b" \t").decode("latin-1")


# ----------------------------------------------------------------------------- the settings

@dataclass(frozen=True)
class Control:
    """Every control setting, resolved. Lists are lowercased sets; maps have lowercased keys.

    ``sources[name]`` says where a value came from: ``control/<name>``, ``control/me`` (derived),
    ``default`` (qmail's built-in value) or ``missing`` (a list file that is absent).
    ``unset`` names settings that hold only a placeholder because neither their file nor ``me``
    exists; qmail would refuse to run the service that needs them (helohost: qmail-remote defers;
    smtpgreeting: qmail-smtpd answers 421; locals: qmail-send does not start; localiphost: the
    ``box@[ip]`` rewrite is off).
    """

    control_dir: Path
    me: str | None
    locals: frozenset[str]
    locals_present: bool
    rcpthosts: frozenset[str] | None
    morercpthosts: frozenset[str] | None
    morercpthosts_cdb: Path | None
    virtualdomains: dict[str, str]
    smtproutes: dict[str, Route | None]
    percenthack: frozenset[str]
    badmailfrom: frozenset[str]
    bouncefrom: str
    bouncehost: str
    doublebounceto: str
    doublebouncehost: str
    envnoathost: str
    helohost: str
    localiphost: str
    smtpgreeting: str
    defaultdomain: str
    defaulthost: str
    idhost: str
    plusdomain: str
    queuelifetime: int
    concurrencylocal: int
    concurrencyremote: int
    databytes: int
    timeoutconnect: int
    timeoutremote: int
    timeoutsmtpd: int
    warnings: tuple[str, ...] = ()
    sources: dict[str, str] = field(default_factory=dict)
    unset: frozenset[str] = frozenset()


def _parse_uint(text: str) -> tuple[int | None, int]:
    """qmail's scan_ulong: (the unsigned decimal prefix or None without a leading digit, digits used)."""
    digits = 0
    while digits < len(text) and "0" <= text[digits] <= "9":
        digits += 1
    return (int(text[:digits]) if digits else None), digits


class _Loader:
    """Collects values, sources and warnings while reading one control directory."""

    def __init__(self, control_dir: Path) -> None:
        self.dir = control_dir
        self.warnings: list[str] = []
        self.sources: dict[str, str] = {}
        self.unset: set[str] = set()

    def path(self, name: str) -> Path:
        return self.dir / name

    def warn(self, name: str, text: str, line: int | None = None) -> None:
        where = f"{self.path(name)}:{line}" if line is not None else str(self.path(name))
        self.warnings.append(f"{where}: {text}")

    def value(self, name: str) -> str | None:
        v = read_value(self.path(name))
        if v is not None and "\r" in v:
            self.warn(name, "line contains a carriage return (CR); qmail keeps it as part of the value", 1)
        return v

    def string(self, name: str, me: str | None, default: str | None) -> str:
        v = self.value(name)
        if v is not None:
            self.sources[name] = f"control/{name}"
            return v
        if default is None:  # derived from me
            if me is not None:
                self.sources[name] = "control/me"
                return me
            self.sources[name] = "default"
            self.unset.add(name)
            return name  # qmail's literal placeholder
        self.sources[name] = "default"
        return default

    def number(self, name: str, default: int) -> int:
        v = self.value(name)
        if v is None:
            self.sources[name] = "default"
            return default
        n, used = _parse_uint(v)
        if n is None:
            self.warn(name, f"{v!r} is not a number; using the default {default}", 1)
            self.sources[name] = "default"
            return default
        if used < len(v):
            self.warn(name, f"{v!r} read as {n} (qmail reads only the leading digits)", 1)
        self.sources[name] = f"control/{name}"
        return n

    def lines(self, name: str) -> list[tuple[int, str]] | None:
        lines = read_lines_or_none(self.path(name))
        self.sources[name] = f"control/{name}" if lines is not None else "missing"
        for lineno, text in lines or []:
            if "\r" in text:
                self.warn(name, "line contains a carriage return (CR); qmail keeps it as part of the entry",
                          lineno)
            if text[0] in " \t":
                self.warn(name, f"leading whitespace in {text!r} is part of the entry (qmail keeps it)",
                          lineno)
        return lines

    def name_set(self, name: str) -> frozenset[str] | None:
        lines = self.lines(name)
        if lines is None:
            return None
        for lineno, text in lines:
            if any(c in text.strip() for c in " \t"):
                self.warn(name, f"{text!r} contains whitespace; qmail takes the whole line as one name",
                          lineno)
        return frozenset(ascii_lower(text) for _, text in lines)

    def colon_map(self, name: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for lineno, text in self.lines(name) or []:
            key, colon, value = text.partition(":")
            if not colon:
                self.warn(name, f"no ':' in {text!r}; qmail ignores this line", lineno)
                continue
            out.pop(ascii_lower(key), None)  # later line wins
            out[ascii_lower(key)] = value
        return out


def load_control(root: Root) -> Control:
    """Read ``root/control`` once and resolve every setting (qmail-semantics.md §0).

    Raises ConfigError (naming file and line) for NUL bytes, unreadable files and unusable
    smtproutes lines; everything else qmail tolerates loads, with a warning where qmail is sloppy.
    """
    ld = _Loader(root.control)
    me = ld.value("me")
    ld.sources["me"] = "control/me" if me is not None else "missing"
    if me is None:
        ld.warn("me", "missing: the host names derived from it fall back to placeholders")
        ld.unset.add("me")
    elif me == "":
        ld.warn("me", "empty: every host name derived from it is empty", 1)

    strings = {name: ld.string(name, me, None) for name in ME_DERIVED}
    strings.update({name: ld.string(name, me, default) for name, default in STRING_DEFAULTS.items()})
    numbers = {name: ld.number(name, default) for name, default in INT_DEFAULTS.items()}
    for name in ("concurrencylocal", "concurrencyremote"):
        if numbers[name] > CONF_SPAWN:
            ld.warn(name, f"{numbers[name]} is above the limit {CONF_SPAWN}; using {CONF_SPAWN}", 1)
            numbers[name] = CONF_SPAWN

    locals_ = ld.name_set("locals")
    locals_present = locals_ is not None
    if locals_ is None:
        if me is not None:
            locals_ = frozenset({ascii_lower(me)}) if me else frozenset()
            ld.sources["locals"] = "control/me"
        else:
            locals_ = frozenset()
            ld.unset.add("locals")
            ld.warn("locals", "missing, and so is control/me: no domain is local")

    rcpthosts = ld.name_set("rcpthosts")
    if rcpthosts is None:
        ld.warn("rcpthosts", "missing: qmail would relay for anyone; pqmail accepts no recipient domain")
    morercpthosts = ld.name_set("morercpthosts")
    cdb_path = ld.path("morercpthosts.cdb")
    cdb = _morercpthosts_cdb_state(ld, cdb_path, morercpthosts is not None)

    virtualdomains = ld.colon_map("virtualdomains")
    routes, route_warnings = _smtproutes.parse_smtproutes(ld.lines("smtproutes") or [],
                                                          ld.path("smtproutes"))
    ld.warnings.extend(route_warnings)

    return Control(
        control_dir=root.control,
        me=me,
        locals=locals_,
        locals_present=locals_present,
        rcpthosts=rcpthosts,
        morercpthosts=morercpthosts,
        morercpthosts_cdb=cdb_path if cdb else None,
        virtualdomains=virtualdomains,
        smtproutes=routes,
        percenthack=ld.name_set("percenthack") or frozenset(),
        badmailfrom=ld.name_set("badmailfrom") or frozenset(),
        **strings,
        **numbers,
        warnings=tuple(ld.warnings),
        sources=ld.sources,
        unset=frozenset(ld.unset),
    )


def _morercpthosts_cdb_state(ld: _Loader, cdb_path: Path, text_present: bool) -> bool:
    """Whether morercpthosts.cdb exists; warn as qmail-showctl does when it disagrees with the text."""
    cdb_mtime = _mtime(cdb_path)
    ld.sources["morercpthosts.cdb"] = "control/morercpthosts.cdb" if cdb_mtime is not None else "missing"
    if text_present and cdb_mtime is None:
        ld.warn("morercpthosts", "exists but morercpthosts.cdb does not: run pqmail newmrh")
    elif cdb_mtime is not None and not text_present:
        ld.warn("morercpthosts.cdb", "exists but morercpthosts does not")
    elif cdb_mtime is not None and (_mtime(ld.path("morercpthosts")) or 0) > cdb_mtime:
        ld.warn("morercpthosts.cdb", "is older than morercpthosts: run pqmail newmrh")
    return cdb_mtime is not None


def _mtime(path: Path) -> float | None:
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(path, f"unable to read: {e.strerror or e}") from None


def control_stamp(root: Root) -> tuple[tuple[str, int, int, int], ...]:
    """(name, inode, size, mtime_ns) of every control file load_control reads that exists.

    Cheap (one stat per file): a long-running service compares stamps to notice that an
    administrator changed control/ (rcpthosts is re-read without restart) and calls load_control again.
    """
    out = []
    for name in sorted(LOADED_FILES):
        try:
            st = os.stat(root.control / name)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise ConfigError(root.control / name, f"unable to read: {e.strerror or e}") from None
        out.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


# ----------------------------------------------------------------------------- lookups

def _domain_keys(domain: str) -> list[str]:
    """rcpthosts keys: the domain, then each dot-suffix (``.example.com``), longest first."""
    return [domain[i:] for i in range(len(domain)) if i == 0 or domain[i] == "."]


def rcpthosts_allows(control: Control, domain: str) -> bool:
    """qmail-smtpd's rcpthosts check for the domain of a recipient (after its last ``@``).

    The domain (lowercased) or any dot-suffix of it in ``rcpthosts``, then the same keys in
    ``morercpthosts.cdb`` when that exists. An empty domain is never allowed.

    Deviation from qmail, on purpose: without ``control/rcpthosts`` qmail accepts everything (an open
    relay); here every domain is refused. A recipient without ``@`` is the caller's business (qmail
    accepts it; envnoathost applies later). Raises ConfigError if the cdb exists but cannot be read.
    """
    if control.rcpthosts is None:
        return False
    keys = _domain_keys(ascii_lower(domain))
    if any(k in control.rcpthosts for k in keys):
        return True
    path = control.morercpthosts_cdb
    if path is None or not keys:
        return False
    import cdbx  # only here: the pure part of this module needs no cdb

    try:
        db = cdbx.CDB(str(path))
    except FileNotFoundError:
        return False  # removed since load_control: no entries
    except OSError as e:
        raise ConfigError(path, f"unable to read: {e.strerror or e}") from None
    try:
        return any(k.encode("latin-1", "replace") in db for k in keys)
    finally:
        db.close()


def badmailfrom_matches(control: Control, sender: str) -> bool:
    """qmail-smtpd's bmfcheck: the whole sender, or its ``@domain`` (after the last @), ignoring case."""
    s = ascii_lower(sender)
    if s in control.badmailfrom:
        return True
    at = s.rfind("@")
    return at >= 0 and s[at:] in control.badmailfrom


def smtproute_match(control: Control, host: str) -> tuple[str, Route | None] | None:
    """The smtproutes key that decides ``host`` and its value (None value = exception), or None."""
    return _smtproutes.match(control.smtproutes, host)


def smtproute_for(control: Control, host: str) -> Route | None:
    """Relay for ``host`` per smtproutes (host, dot-suffixes, ``:`` default); None = use MX as usual."""
    return _smtproutes.lookup(control.smtproutes, host)
