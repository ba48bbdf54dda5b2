"""One local delivery, exactly as qmail-local performs it (qmail-semantics.md §3).

:func:`deliver_local` takes a :class:`LocalJob` (the queued message, envelope sender, the rewritten
recipient ``local@domain`` and the users/assign entry) and returns a :class:`LocalResult` with
qmail-lspawn's report letter: ``K`` delivered, ``Z`` try again later, ``D`` bounce. In order:

1. the home directory must be absolute, a directory, neither group- nor world-writable (pqmail
   builds with conf-patrn 022) and not sticky;
2. loop detection: a header line equal to our own ``Delivered-To`` line bounces (#5.4.6);
3. the dot-qmail search (:func:`pqmail.routing.dotqmail_candidates`); a writable file fails, a
   user-x bit makes it forward-only; nothing found with a non-empty dash bounces (#5.1.1); an
   empty file, or nothing found with an empty dash, means ``defaultdelivery``;
4. the lines, top to bottom: Maildir, mbox, ``|program`` (``/bin/sh -c`` in the home directory,
   message on stdin, §3.6's environment), forwards collected. The first failure stops everything
   and cancels the forwards; a program's exit 99 stops after that line, keeping earlier forwards.

Forwards are not queued here: the result lists them with ``forward_prefix`` (our DTLINE) and
``new_sender`` (NEWSENDER, §3.7), and the queue manager enqueues ``forward_prefix`` + the message.
The report text is what qmail-local and its programs print (programs' stdout and stderr, qmail's
own one-line messages, ``did F+W+P`` on success), cut at 3000 bytes as qmail-lspawn does.

What it trusts: the job (from the queue manager) and the files of the home directory it is told
about; it already runs as the box owner. What it never does: change directory, umask or signal
handlers of the process (deliveries run in threads side by side), read outside the home directory
for a dot-qmail name, or interpret sender/recipient text anywhere but in the lines qmail writes.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pqmail import maildir, routing
from pqmail.config.assign import AssignEntry
from pqmail.errors import PermanentFailure, TemporaryFailure
from pqmail.local import dotqmail, mbox
from pqmail.local.env import addr_bytes, addr_text, dtline, program_env, rpline, to_bytes, ufline
from pqmail.local.syserr import error_str, is_temporary

PATRN = 0o022  # conf-patrn: group- or world-writable home or dot-qmail file is refused
TRUNCREPORT = 3000  # qmail-lspawn keeps this much of the report
_TRUNCMESS = b"\nError report too long, sorry.\n"
_PERMANENT_EXITS = frozenset({100, 64, 65, 70, 76, 77, 78, 112})
_BOUNCE_SENDERS = ("", "#@[]")
_OPEN_DOTQMAIL = os.O_RDONLY | os.O_NONBLOCK  # a FIFO named .qmail-x must not hang the delivery

# The same boxes receive mail over and over: keep their candidate lists (pure function of dash, ext).
_candidates = functools.lru_cache(maxsize=16384)(routing.dotqmail_candidates)


_PROC_FD = "/proc/self/fd/"


def _slurp(fd: int, size_hint: int) -> bytes:
    """The whole file; ``size_hint`` (its fstat size) makes it one read that also sees EOF."""
    chunks = []
    while chunk := os.read(fd, max(size_hint + 1, 4096)):  # usually one read, and EOF with it
        chunks.append(chunk)
        if len(chunk) <= size_hint:
            break
    return b"".join(chunks)


def _pslurp(fd: int) -> bytes:
    """The whole file from offset 0, leaving the descriptor's offset alone."""
    size = os.fstat(fd).st_size
    data = os.pread(fd, size + 1, 0)  # a queued message never changes: one read, EOF seen at once
    if len(data) <= size:
        return data
    chunks = [data]
    pos = len(data)
    while chunk := os.pread(fd, 65536, pos):
        chunks.append(chunk)
        pos += len(chunk)
    return b"".join(chunks)


def _open_message(path: Path) -> tuple[int, bool]:
    """(descriptor, ours to close) for the queued message.

    The delivery workers get the message as a descriptor passed from the queue manager and named
    ``/proc/self/fd/N``: re-opening that path would need read permission on the queue file, which
    the box owner does not have, so the descriptor itself is used (and left to its owner to close).
    """
    name = os.fspath(path)
    if name.startswith(_PROC_FD) and name[len(_PROC_FD):].isdigit():
        return int(name[len(_PROC_FD):]), False
    return os.open(name, os.O_RDONLY), True


@dataclass(frozen=True)
class LocalJob:
    """What qmail-lspawn hands qmail-local: the message, envelope, recipient and assign entry."""

    message_path: Path | str
    sender: str
    recipient: str  # local@domain after virtual-domain rewriting; local includes the prefix
    entry: AssignEntry
    default_delivery: str  # qmail's aliasempty: dot-qmail text used for an empty or missing file


@dataclass
class LocalResult:
    """The report letter (``K``/``Z``/``D``), its text, and the forwards the manager must queue."""

    status: str
    report: str
    forwards: list[str]
    new_sender: str
    forward_prefix: bytes


class _Report:
    """qmail-lspawn's report buffer: everything printed, truncated past TRUNCREPORT bytes."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data = bytearray()

    def add(self, text: bytes) -> None:
        self.data += text
        if len(self.data) > TRUNCREPORT:
            del self.data[TRUNCREPORT - len(_TRUNCMESS) - 3:]
            self.data += _TRUNCMESS

    def text(self) -> str:
        end = self.data.find(0)  # report() stops at a NUL byte
        data = self.data if end < 0 else self.data[:end]
        return data.decode("utf-8", "surrogateescape")


def deliver_local(job: LocalJob, group: maildir.SyncGroup | None = None, tag: object = None) -> LocalResult:
    """Deliver one message to one local recipient, qmail-local style; never raises for a delivery error.

    With a ``group``, Maildir deliveries are written at once but made durable (and linked into
    ``new/``) by ``group.commit()``, under ``tag``: a ``K`` result stands only if ``tag`` is then
    not in ``group.failed``. Before a program runs, the group is committed, so a program sees the
    deliveries of the lines above it on disk, as under qmail-local.
    """
    report = _Report()
    d = _Delivery(job, report, group, tag)
    try:
        forwards = d.run()
    except (TemporaryFailure, PermanentFailure) as e:
        if str(e):  # a failing program's own output is the whole report
            report.add(str(e).encode("utf-8", "surrogateescape") + b"\n")
        return LocalResult("D" if isinstance(e, PermanentFailure) else "Z", report.text(), [], "", b"")
    except OSError as e:  # a system error no step above words itself: retry, as qmail-local would
        report.add(f"Unable to deliver: {error_str(e.errno)}. (#4.3.0)\n".encode())
        return LocalResult("Z", report.text(), [], "", b"")
    report.add(b"did %d+%d+%d\n" % (d.count_file, d.count_forward, d.count_program))
    if not forwards:
        return LocalResult("K", report.text(), [], "", b"")
    return LocalResult("K", report.text(), forwards, d.new_sender, d.dtline)


class _Delivery:
    """State of one qmail-local run; :meth:`run` raises Temporary/PermanentFailure on failure."""

    def __init__(self, job: LocalJob, report: _Report, group: maildir.SyncGroup | None = None,
                 tag: object = None) -> None:
        self.job = job
        self.group = group
        self.tag = tag
        self.entry = job.entry
        self.report = report
        self.start = time.time()
        self.local, self.host = routing.split_address(job.recipient)
        self.home = to_bytes(job.entry.home)
        self.sender_b = addr_bytes(job.sender)
        self.dtline = dtline(addr_bytes(self.local) + b"@" + addr_bytes(self.host))
        self.default: str | None = None
        self.new_sender = job.sender
        self.count_file = self.count_forward = self.count_program = 0
        self.message = b""
        self.msg_fd = -1
        self._rpline: bytes | None = None
        self._env: dict[bytes, bytes] | None = None

    # ------------------------------------------------------------------ the steps

    def run(self) -> list[str]:
        self.check_home()
        try:
            self.msg_fd, own = _open_message(self.job.message_path)
        except OSError as e:
            raise TemporaryFailure(f"Unable to read message: {error_str(e.errno)}. (#4.3.0)") from None
        try:
            return self._run()
        finally:
            if own:
                os.close(self.msg_fd)

    def _run(self) -> list[str]:
        self.message = self.read_message()
        self.check_loop()
        data, forward_only = self.search()
        if not data:
            data, forward_only = to_bytes(self.job.default_delivery), False
        lines = dotqmail.parse(data)
        if any(isinstance(x, dotqmail.Program | dotqmail.Forward) for x in lines):
            self.new_sender = self.forwarding_sender()
        return self.execute(lines, forward_only)

    def check_home(self) -> None:
        home = self.entry.home
        if not self.home.startswith(b"/"):
            raise PermanentFailure(f"Home directory {home} is not an absolute path (users/assign). (#5.3.5)")
        try:
            st = os.stat(self.home)
        except OSError as e:
            raise TemporaryFailure(f"Unable to switch to {home}: {error_str(e.errno)}. (#4.3.0)") from None
        if not stat.S_ISDIR(st.st_mode):
            raise TemporaryFailure(f"Unable to switch to {home}: {error_str(errno.ENOTDIR)}. (#4.3.0)")
        if st.st_mode & PATRN:
            raise TemporaryFailure("Uh-oh: home directory is writable. (#4.7.0)")
        if st.st_mode & stat.S_ISVTX:
            raise TemporaryFailure("Home directory is sticky: user is editing his .qmail file. (#4.2.1)")

    def read_message(self) -> bytes:
        try:
            return _pslurp(self.msg_fd)
        except OSError as e:
            raise TemporaryFailure(f"Unable to read message: {error_str(e.errno)}. (#4.3.0)") from None

    def check_loop(self) -> None:
        """bouncexf: a header line (up to the first empty line) equal to our DTLINE is a loop."""
        msg, dt = self.message, self.dtline
        if msg.startswith(b"\n"):
            return
        end = msg.find(b"\n\n")
        header = msg if end < 0 else msg[:end + 1]
        if header.startswith(dt) or (b"\n" + dt) in header:
            raise PermanentFailure("This message is looping: it already has my Delivered-To line. (#5.4.6)")

    def search(self) -> tuple[bytes, bool]:
        """qmesearch: the first candidate that is a regular file -> (contents, forward-only)."""
        for name, default in _candidates(self.entry.dash, self.entry.ext):
            found = self._open_dotqmail(name)
            if found is not None:
                self.default = default
                return found
        if self.entry.dash:
            raise PermanentFailure("Sorry, no mailbox here by that name. (#5.1.1)")
        return b"", False

    def _open_dotqmail(self, name: str) -> tuple[bytes, bool] | None:
        try:
            fd = os.open(self.home + b"/" + to_bytes(name), _OPEN_DOTQMAIL)
        except OSError as e:
            if is_temporary(e.errno) or e.errno in (errno.EPERM, errno.EACCES):
                raise TemporaryFailure(f"Unable to open {name}: {error_str(e.errno)}. (#4.3.0)") from None
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            if st.st_mode & PATRN:
                raise TemporaryFailure("Uh-oh: .qmail file is writable. (#4.7.0)")
            return _slurp(fd, st.st_size), bool(st.st_mode & stat.S_IXUSR)
        except OSError as e:
            raise TemporaryFailure(f"Unable to read {name}: {error_str(e.errno)}. (#4.3.0)") from None
        finally:
            os.close(fd)

    def forwarding_sender(self) -> str:
        """NEWSENDER (§3.7): ``local-owner@host`` or the VERP form when the -owner files exist."""
        sender = self.job.sender
        if sender in _BOUNCE_SENDERS:
            return sender
        owner, owner_default = routing.owner_files(self.entry.dash, self.entry.ext)
        if not self._exists(owner):
            return sender
        if self._exists(owner_default):
            return f"{self.local}-owner-@{self.host}-@[]"
        return f"{self.local}-owner@{self.host}"

    def _exists(self, name: str) -> bool:
        try:
            os.stat(self.home + b"/" + to_bytes(name))
        except OSError as e:
            if is_temporary(e.errno):
                raise TemporaryFailure(f"Unable to open {name}: {error_str(e.errno)}. (#4.3.0)") from None
            return False
        return True

    # ------------------------------------------------------------------ the lines

    def execute(self, lines: list[dotqmail.Instruction], forward_only: bool) -> list[str]:
        forwards: list[str] = []
        for ins in lines:
            if isinstance(ins, dotqmail.Maildir | dotqmail.Mbox):
                self.count_file += 1
                if forward_only:
                    raise TemporaryFailure("Uh-oh: .qmail has file delivery but has x bit set. (#4.7.0)")
                if isinstance(ins, dotqmail.Maildir):
                    self.to_maildir(ins.path)
                else:
                    self.to_mbox(ins.path)
            elif isinstance(ins, dotqmail.Forward):
                self.count_forward += 1
                forwards.append(addr_text(ins.address))
            elif isinstance(ins, dotqmail.Program):
                self.count_program += 1
                if forward_only:
                    raise TemporaryFailure("Uh-oh: .qmail has prog delivery but has x bit set. (#4.7.0)")
                if self.to_program(ins.command) == 99:
                    break
            elif isinstance(ins, dotqmail.ForwardOnly):
                forward_only = True
            elif isinstance(ins, dotqmail.Blank) and ins.lineno == 1:
                raise TemporaryFailure("Uh-oh: first line of .qmail file is blank. (#4.2.1)")
        return forwards

    def _path(self, line: bytes) -> bytes:
        return line if line.startswith(b"/") else self.home + b"/" + line

    @property
    def rpline(self) -> bytes:
        if self._rpline is None:
            self._rpline = rpline(self.sender_b)
        return self._rpline

    def to_maildir(self, line: bytes) -> None:
        chunks = (self.rpline, self.dtline, self.message)
        try:
            if self.group is None:
                maildir.deliver(os.fsdecode(self._path(line)), chunks)
            else:
                self.group.add(os.fsdecode(self._path(line)), chunks, self.tag)
        except OSError:
            raise TemporaryFailure("Temporary error on maildir delivery. (#4.3.0)") from None

    def to_mbox(self, line: bytes) -> None:
        data = mbox.format_message(ufline(self.sender_b, self.start), self.rpline, self.dtline, self.message)
        mbox.append(self._path(line), os.fsdecode(line), data)

    def environment(self) -> dict[bytes, bytes]:
        if self._env is None:
            e = self.entry
            self._env = program_env(
                os.environb, sender=self.sender_b, newsender=addr_bytes(self.new_sender),
                local=addr_bytes(self.local), host=addr_bytes(self.host), user=to_bytes(e.user),
                home=self.home, ext=to_bytes(e.ext),
                default=None if self.default is None else to_bytes(self.default),
                dtline=self.dtline, rpline=self.rpline, ufline=ufline(self.sender_b, self.start),
            )
        return self._env

    def to_program(self, command: bytes) -> int:
        """Run ``/bin/sh -c command``; its output joins the report. Returns 0 or 99, else raises."""
        group = self.group
        if group is not None and len(group):
            group.commit()
            failure = group.failed.get(self.tag)
            if failure is not None:
                raise failure
        try:  # programs share the message descriptor, rewound for each, as qmail-local's fd 0
            os.lseek(self.msg_fd, 0, os.SEEK_SET)
        except OSError:
            raise TemporaryFailure("Unable to rewind message. (#4.3.0)") from None
        try:
            child = subprocess.Popen(
                [b"/bin/sh", b"-c", command], stdin=self.msg_fd, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, cwd=self.home, env=self.environment(), umask=0o077,
            )
        except (OSError, ValueError) as e:
            code = getattr(e, "errno", None)
            raise TemporaryFailure(f"Unable to run /bin/sh: {error_str(code)}. (#4.3.0)") from None
        assert child.stdout is not None
        with child.stdout:
            fd = child.stdout.fileno()
            while chunk := os.read(fd, 65536):
                self.report.add(chunk)
        code = child.wait()
        if code < 0:
            raise TemporaryFailure("Aack, child crashed. (#4.3.0)")
        if code in (0, 99):
            return code
        if code in _PERMANENT_EXITS:
            raise PermanentFailure("")
        raise TemporaryFailure("")
