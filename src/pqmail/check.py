"""``pqmail check``: read the whole tree and report what qmail would trip on, one problem a line.

Each problem is ``file:line: text`` (or ``file: text`` when no line applies), in the order the files
are read: control/ (everything :func:`pqmail.config.control.load_control` warns about, and files it
cannot read), ``control/mailuser``, ``users/assign`` and ``users/cdb`` (missing, stale, unparsable;
uid 0, homes that are missing, relative, sticky or group/world-writable), ``control/virtualdomains``
(a domain SMTP refuses because rcpthosts lacks it, a domain that locals overrides, a domain whose
postmaster has no mailbox or loops to itself), and the dot-qmail files in every assign home
(group/world-writable files, Maildir lines whose target is not a Maildir or belongs to another uid,
delivery lines in a forward-only file), and ``queue/`` (directories, modes and owner as ``pqmail init``
makes them, spare files in ``pool/``, and whether the user of ``control/mailuser``, which smtpd runs
as, may write the queue).

Modes follow pqmail's conf-patrn 022: a home or dot-qmail file writable by group or others makes
qmail-local defer its mail, and check lists it.

What it trusts: nothing in the tree. What it never does: change a file, follow a dot-qmail program
line, or stop at the first problem (a broken file is reported and the rest still checked).
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from pqmail.config.assign import AssignLine, parse_assign
from pqmail.config.casefold import ascii_lower
from pqmail.config.control import Control, load_control, rcpthosts_allows, read_lines, read_value
from pqmail.errors import ConfigError
from pqmail.maildir import is_maildir
from pqmail.paths import Root
from pqmail.provision import assign_lookup
from pqmail.queue.layout import layout_report
from pqmail.routing import dotqmail_candidates

UNSAFE_BITS = 0o022  # pqmail's conf-patrn: group- or world-writable


@dataclass(frozen=True)
class Problem:
    """One finding: ``where`` is ``path`` or ``path:line``."""

    where: str
    text: str

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


def _at(path: Path | str, line: int | None = None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


def _from_message(message: str) -> Problem:
    """A ``where: text`` message (a ConfigError or a load_control warning) as a Problem."""
    where, _, text = message.partition(": ")
    return Problem(where, text)


def is_maildir_line(line: str) -> bool:
    """dot-qmail(5): a line starting with ``/`` or ``.`` and ending with ``/`` is a Maildir."""
    return line[:1] in ("/", ".") and line.endswith("/")


def is_delivery_line(line: str) -> bool:
    """Program, mbox or Maildir lines: what a forward-only (user-executable) dot-qmail file refuses."""
    return line[:1] in ("|", "/", ".")


def forwards_to(lines: list[str], address: str) -> bool:
    """Whether dot-qmail ``lines`` forward to ``address`` (``&address`` or a bare address line)."""
    want = ascii_lower(address)
    for line in lines:
        target = line[1:] if line.startswith("&") else line
        if line[:1] not in ("#", "|", "/", ".", "+") and ascii_lower(target) == want:
            return True
    return False


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


class _Checker:
    """Collects the problems of one tree."""

    def __init__(self, root: Root) -> None:
        self.root = root
        self.problems: list[Problem] = []

    def add(self, where: str, text: str) -> None:
        self.problems.append(Problem(where, text))

    # -- control/

    def control(self) -> Control | None:
        try:
            control = load_control(self.root)
        except ConfigError as e:
            self.problems.append(_from_message(str(e)))
            return None
        self.problems.extend(_from_message(w) for w in control.warnings)
        return control

    def mailuser(self) -> None:
        path = self.root.control_file("mailuser")
        try:
            name = read_value(path)
        except ConfigError as e:
            self.problems.append(_from_message(str(e)))
            return
        if name is None:
            return
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            self.add(_at(path, 1), f"no such user {name!r}: the services cannot drop to it")
            return
        if pw.pw_uid == 0:
            self.add(_at(path, 1), f"{name!r} is root: pqmail never runs its services or deliveries as root")

    # -- queue/

    def queue(self) -> None:
        queue = self.root.queue
        if not queue.exists():
            self.add(str(queue), "missing: nothing can be queued (pqmail init creates it)")
            return
        for where, text in layout_report(queue):
            self.add(where, text)
        self._mailuser_writes_queue(queue)

    def _mailuser_writes_queue(self, queue: Path) -> None:
        """smtpd runs as control/mailuser: it must own the queue or be in the queue's group."""
        try:
            name = read_value(self.root.control_file("mailuser"))
            pw = pwd.getpwnam(name) if name else None
            st = queue.stat()
        except (ConfigError, KeyError, OSError):
            return  # reported by mailuser() or above
        if pw is None or pw.pw_uid in (0, st.st_uid) or pw.pw_gid == st.st_gid:
            return
        try:
            members = grp.getgrgid(st.st_gid).gr_mem
        except KeyError:
            members = []
        if name not in members:
            self.add(str(queue), f"the mail user {name!r} (control/mailuser) is neither its owner (uid "
                                 f"{st.st_uid}) nor in its group ({st.st_gid}): smtpd could not queue mail")

    # -- users/

    def assign(self) -> list[AssignLine] | None:
        path, cdb = self.root.assign, self.root.users_cdb
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self.add(str(path), "missing: every address falls back to qmail-getpw (system accounts)")
            return None
        except OSError as e:
            self.add(str(path), f"unable to read: {e.strerror or e}")
            return None
        try:
            cdb_st = os.stat(cdb)
        except FileNotFoundError:
            self.add(str(cdb), "missing: deliveries ignore users/assign until you run pqmail newu")
        else:
            if cdb_st.st_mtime_ns < os.stat(path).st_mtime_ns:
                self.add(str(cdb), "older than users/assign: deliveries use the old entries; run pqmail newu")
        try:
            lines = parse_assign(data, path)
        except ConfigError as e:
            self.problems.append(_from_message(str(e)))
            return None
        seen: set[str] = set()
        for line in lines:
            self._assign_line(path, line, seen)
        return lines

    def _assign_line(self, path: Path, line: AssignLine, seen: set[str]) -> None:
        where, e = _at(path, line.lineno), line.entry
        if e.uid == 0:
            self.add(where, f"uid 0 for {line.kind}{line.key}: qmail-lspawn never delivers as root, "
                            "so every message for it is deferred")
        if not os.path.isabs(e.home):
            self.add(where, f"home {e.home!r} is not an absolute path")
            return
        if e.home in seen:
            return
        seen.add(e.home)
        try:
            st = os.stat(e.home)
        except FileNotFoundError:
            self.add(where, f"home {e.home} does not exist: its mail is deferred")
            return
        except OSError as err:
            self.add(where, f"home {e.home}: {err.strerror or err}")
            return
        if not stat.S_ISDIR(st.st_mode):
            self.add(where, f"home {e.home} is not a directory")
        elif st.st_mode & UNSAFE_BITS:
            self.add(where, f"home {e.home} is group- or world-writable (mode {_mode(st)}): "
                            "qmail-local defers its mail (#4.7.0)")
        elif st.st_mode & stat.S_ISVTX:
            self.add(where, f"home {e.home} is sticky (mode {_mode(st)}): qmail-local defers its mail "
                            "(#4.2.1)")

    # -- control/virtualdomains

    def virtualdomains(self, control: Control, lines: list[AssignLine] | None) -> None:
        path = self.root.control_file("virtualdomains")
        try:
            entries = read_lines(path)
        except ConfigError:
            return  # load_control has reported it
        for lineno, text in entries:
            key, colon, prefix = text.partition(":")
            if not colon or not prefix or not key:
                continue  # no colon (warned), an exception, or the catch-all
            where, key = _at(path, lineno), ascii_lower(key)
            domain = key.rpartition("@")[2]
            probe = f"a{domain}" if domain.startswith(".") else domain
            if control.rcpthosts is not None and not rcpthosts_allows(control, probe):
                self.add(where, f"{domain} is not in rcpthosts: SMTP refuses mail for it")
            if key in control.locals:
                self.add(where, f"{key} is also in locals: qmail delivers it as local and ignores this line")
            elif "@" not in key and not key.startswith(".") and lines is not None:
                self._postmaster(where, key, prefix, lines)

    def _postmaster(self, where: str, domain: str, prefix: str, lines: list[AssignLine]) -> None:
        address = f"postmaster@{domain}"
        entry = assign_lookup(lines, f"{prefix}-postmaster")
        if entry is None:
            self.add(where, f"{address} has no users/assign entry ({prefix}-postmaster): it falls back to "
                            "qmail-getpw")
            return
        if not entry.dash:
            return  # a user's own address: defaultdelivery applies
        for name, default in dotqmail_candidates(entry.dash, entry.ext):
            path = Path(entry.home) / name
            if path.is_file():
                if default is not None and forwards_to(_dotqmail_lines(path), address):
                    self.add(where, f"{address} loops: there is no .qmail{entry.dash}postmaster and "
                                    f"{path} forwards it to itself")
                return
        self.add(where, f"{address} has no mailbox: no .qmail{entry.dash}postmaster or default file in "
                        f"{entry.home}")

    # -- dot-qmail files

    def homes(self, lines: list[AssignLine]) -> None:
        uid_of: dict[str, tuple[int, str]] = {}
        for line in lines:
            uid_of.setdefault(line.entry.home, (line.entry.uid, line.entry.user))
        for home, (uid, user) in uid_of.items():
            if os.path.isabs(home) and os.path.isdir(home):
                self._home_files(Path(home), uid, user)

    def _home_files(self, home: Path, uid: int, user: str) -> None:
        try:
            names = sorted(n for n in os.listdir(home) if n.startswith(".qmail"))
        except OSError as e:
            self.add(str(home), f"unable to list: {e.strerror or e}")
            return
        for name in names:
            path = home / name
            try:
                st = os.stat(path)
            except OSError:
                continue  # a dangling link or a file removed meanwhile: qmail-local treats it as missing
            if not stat.S_ISREG(st.st_mode):
                continue
            if st.st_mode & UNSAFE_BITS:
                self.add(str(path), f"group- or world-writable (mode {_mode(st)}): qmail-local defers "
                                    "deliveries through it (#4.7.0)")
            forward_only = bool(st.st_mode & stat.S_IXUSR)
            for lineno, line in _numbered_lines(path):
                self._dotqmail_line(home, _at(path, lineno), line, forward_only, uid, user)

    def _dotqmail_line(self, home: Path, where: str, line: str, forward_only: bool, uid: int,
                       user: str) -> None:
        if forward_only and is_delivery_line(line):
            self.add(where, "the file is executable (forward-only): this delivery line is deferred (#4.7.0)")
        if not is_maildir_line(line):
            return
        target = Path(line) if line.startswith("/") else home / line
        if not is_maildir(target):
            self.add(where, f"{line} is not a Maildir (it needs tmp/, new/ and cur/): its mail is deferred")
            return
        try:
            owner = os.stat(target / "new").st_uid
        except OSError:
            return
        if owner != uid and uid != 0:
            self.add(where, f"{line} belongs to uid {owner}, but deliveries run as uid {uid} ({user}): "
                            "its mail is deferred")


def _numbered_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of a dot-qmail file's non-empty, non-comment lines, trailing blanks removed."""
    try:
        data = path.read_bytes()
    except OSError:
        return []
    out = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        line = raw.decode("latin-1").rstrip(" \t")
        if line and not line.startswith("#"):
            out.append((n, line))
    return out


def _dotqmail_lines(path: Path) -> list[str]:
    return [line for _, line in _numbered_lines(path)]


def check_tree(root: Root) -> list[Problem]:
    """Every problem found in the tree, in file order; an empty list means clean."""
    if not root.control.is_dir():
        return [Problem(str(root.path), "not a pqmail tree: no control/ directory")]
    c = _Checker(root)
    control = c.control()
    c.mailuser()
    lines = c.assign()
    if control is not None:
        c.virtualdomains(control, lines)
    if lines is not None:
        c.homes(lines)
    c.queue()
    return c.problems
