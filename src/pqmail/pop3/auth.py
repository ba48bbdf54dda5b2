"""POP3 logins: which box a login names, and whether the secret is right (qmail-semantics.md §8.1, §8.2).

A login is a box name (``ex1-0001``), or an address (``joe@example.com``) whose domain's
``.qmail-joe`` delivers to exactly one box's Maildir and nothing else. The address is resolved as
qmail routes mail: ``control/virtualdomains`` gives the prefix, ``users/cdb`` the domain's home and
extension, the exact dot-qmail file (never a ``-default``) the Maildir line, whose last component must
be a box in ``users/poppasswd.cdb`` with that same Maildir. Each answer is cached for a few seconds.
Nothing is ever read about other boxes: a login costs a few cdb probes and one small file.

Stored secrets: every scheme of :mod:`pqmail.hashes` (argon2id, crypt(3), bcrypt, ``{PLAIN}``; the
names it exports are re-exported here for the POP3 code and its tests). Verification is the
CPU cost of a login: argon2 and bcrypt run in the server's threads (they release the GIL), crypt(3)
hashes on its event loop (:meth:`Authenticator.check_now`: they hold the GIL, a thread would gain
nothing), and successful ones are remembered for a while under an HMAC, with a per-process random
key, of (box, password, stored hash): the password itself is never kept, and changing the password
invalidates the entry.

Alternatively ``control/pop3checkpassword`` names a program with the checkpassword interface (fd 3:
``login\\0password\\0timestamp\\0``; exit 0 good, 1 bad, 111 temporary); it then decides every login,
and the Maildir is ``$HOME/Maildir`` (or ``$HOME`` itself) as that program sets ``$HOME``.

What it trusts: the password store and the configuration. What it never does: log or keep a password,
tell an unknown login from a wrong password (the caller gets the same :class:`AuthResult` and answers
the same), or let a malformed stored hash raise.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import os
import secrets
import select
import shlex
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from pqmail.config.assign import UsersDB
from pqmail.config.casefold import ascii_lower
from pqmail.config.control import read_lines, read_value
from pqmail.errors import ConfigError
from pqmail.hashes import holds_gil, scheme_of, verify_apop, verify_secret
from pqmail.local.dotqmail import Blank, Comment, Maildir, parse
from pqmail.passwords import PasswordStore
from pqmail.paths import Root
from pqmail.routing import dotqmail_candidates, vdom_keys

__all__ = [
    "AddressResolver",
    "AuthResult",
    "Authenticator",
    "FailureTracker",
    "VerifiedCache",
    "checkpassword_command",
    "holds_gil",
    "scheme_of",
    "verify_secret",
]

CHECKPASSWORD_TIMEOUT = 30.0
CHECKPASSWORD_MAX_INPUT = 512  # the interface: at most 512 bytes on fd 3


# ----------------------------------------------------------------------------- caches and limits

class VerifiedCache:
    """Recently verified (box, password, stored hash) triples, kept as HMACs under a random key."""

    def __init__(self, ttl: float = 300.0, max_entries: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._key = secrets.token_bytes(32)
        self._entries: dict[bytes, float] = {}  # HMAC -> expiry
        self._lock = threading.Lock()

    def key(self, box: str, password: str, stored: str) -> bytes:
        msg = b"\0".join(s.encode("utf-8", "surrogateescape") for s in (box, password, stored))
        return hmac.digest(self._key, msg, "sha256")  # the one-shot C HMAC: no Python objects per call

    def hit(self, key: bytes) -> bool:
        if self.ttl <= 0:
            return False
        expiry = self._entries.get(key)
        if expiry is None:
            return False
        if expiry < self._clock():
            self._entries.pop(key, None)
            return False
        return True

    def add(self, key: bytes) -> None:
        if self.ttl <= 0:
            return
        now = self._clock()
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries = {k: t for k, t in self._entries.items() if t >= now}
                while len(self._entries) >= self.max_entries:
                    self._entries.pop(next(iter(self._entries)))
            self._entries[key] = now + self.ttl

    def __len__(self) -> int:
        return len(self._entries)


class FailureTracker:
    """Failed logins per client address in a sliding window; ``blocked`` once ``limit`` are reached."""

    def __init__(self, limit: int = 10, window: float = 300.0, max_addresses: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.max_addresses = max_addresses
        self._clock = clock
        self._fails: dict[str, deque[float]] = {}

    def _recent(self, ip: str) -> deque[float] | None:
        q = self._fails.get(ip)
        if q is None:
            return None
        cutoff = self._clock() - self.window
        while q and q[0] < cutoff:
            q.popleft()
        if not q:
            del self._fails[ip]
            return None
        return q

    def blocked(self, ip: str) -> bool:
        if self.limit <= 0:
            return False
        q = self._recent(ip)
        return q is not None and len(q) >= self.limit

    def record(self, ip: str) -> None:
        if self.limit <= 0:
            return
        q = self._recent(ip)
        if q is None:
            if len(self._fails) >= self.max_addresses:
                for old in list(self._fails)[: self.max_addresses // 2]:
                    del self._fails[old]
            q = self._fails[ip] = deque(maxlen=self.limit)
        q.append(self._clock())


# ----------------------------------------------------------------------------- address logins

class AddressResolver:
    """``local@domain`` -> the box whose Maildir the domain's ``.qmail-local`` names, or None."""

    def __init__(self, root: Root, store: PasswordStore, ttl: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.root = root
        self.store = store
        self.users = UsersDB(root)
        self.ttl = ttl
        self._clock = clock
        self._cache: dict[str, tuple[float, str | None]] = {}
        self._vd: dict[str, str] = {}
        self._vd_stamp: tuple[int, int, int] | None = None

    def clear(self) -> None:
        self._cache.clear()
        self._vd_stamp = None

    def resolve(self, address: str) -> str | None:
        key = ascii_lower(address)
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        box = self._resolve(address)
        if len(self._cache) > 50_000:
            self._cache.clear()
        self._cache[key] = (now + self.ttl, box)
        return box

    def _virtualdomains(self) -> dict[str, str]:
        path = self.root.control_file("virtualdomains")
        try:
            st = os.stat(path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        if stamp != self._vd_stamp or stamp is None:
            vd: dict[str, str] = {}
            for _, text in read_lines(path):
                k, colon, prefix = text.partition(":")
                if colon:
                    vd[ascii_lower(k)] = prefix  # the later line wins, as in qmail's constmap
            self._vd, self._vd_stamp = vd, stamp
        return self._vd

    def _resolve(self, address: str) -> str | None:
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain:
            return None
        vd = self._virtualdomains()
        prefix = next((vd[k] for k in vdom_keys(address) if k in vd), None)
        if not prefix:
            return None
        entry = self.users.lookup(f"{prefix}-{local}")
        if entry is None or not entry.dash:
            return None
        exact = dotqmail_candidates(entry.dash, entry.ext)[0][0]
        path = Path(entry.home) / exact
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        lines = [i for i in parse(data) if not isinstance(i, (Comment, Blank))]
        if len(lines) != 1 or not isinstance(lines[0], Maildir):
            return None
        target = os.path.normpath(os.path.join(entry.home, os.fsdecode(lines[0].path)))
        box = os.path.basename(target)
        found = self.store.get(box)
        if found is None or os.path.normpath(found[1]) != target:
            return None
        return box


# ----------------------------------------------------------------------------- the authenticator

@dataclass(frozen=True)
class AuthResult:
    """``ok`` with the box and its Maildir; or a failure, ``temporary`` for trouble on our side.

    ``detail`` is for the log only (unknown login, wrong password, ...), never for the client.
    """

    ok: bool
    box: str | None = None
    maildir: str | None = None
    temporary: bool = False
    detail: str = ""
    cached: bool = False


def checkpassword_command(root: Root) -> list[str] | None:
    """The program line of control/pop3checkpassword split into words, or None when not configured."""
    path = root.control_file("pop3checkpassword")
    line = read_value(path)
    if not line or not line.strip():
        return None
    try:
        words = shlex.split(line)
    except ValueError as e:
        raise ConfigError(str(path), f"cannot split the command line: {e}", 1) from None
    if not os.path.isabs(words[0]):
        raise ConfigError(str(path), f"{words[0]!r}: give the program's absolute path", 1)
    return words


class Authenticator:
    """Decides logins for the server.

    :meth:`check` blocks (cdb probes, the hash, a checkpassword program): call it in a thread, as
    :meth:`authenticate` does with ``executor`` (None: the loop's default), or as the server does
    together with opening the box. Safe to call from several threads at once.
    """

    def __init__(self, root: Root | str | os.PathLike[str], *, executor: Executor | None = None,
                 cache_ttl: float = 300.0, checkpassword: list[str] | None = None,
                 resolver_ttl: float = 30.0) -> None:
        self.root = root if isinstance(root, Root) else Root(root)
        self.store = PasswordStore(self.root)
        self.resolver = AddressResolver(self.root, self.store, ttl=resolver_ttl)
        self.cache = VerifiedCache(cache_ttl)
        self.executor = executor
        self.checkpassword = checkpassword

    def lookup(self, login: str) -> tuple[str, str, str] | None:
        """(box, stored hash, maildir) for a login, or None. Raises ConfigError for cdb trouble."""
        if not login or len(login) > 255 or any(ord(c) < 0x21 or c == "\x7f" for c in login):
            return None
        if "@" in login:
            box = self.resolver.resolve(login)
            if box is None:
                return None
        else:
            box = login
        found = self.store.get(box)
        if found is None and box != box.lower():
            box = box.lower()
            found = self.store.get(box)
        if found is None:
            return None
        return box, found[0], found[1]

    async def authenticate(self, login: str, secret: str, *, mechanism: str = "USER", authzid: str = "",
                           apop_timestamp: str | None = None) -> AuthResult:
        """:meth:`check` in ``executor``."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.executor, functools.partial(self.check, login, secret, mechanism=mechanism, authzid=authzid,
                                             apop_timestamp=apop_timestamp))

    def check(self, login: str, secret: str, *, mechanism: str = "USER", authzid: str = "",
              apop_timestamp: str | None = None) -> AuthResult:
        """Check one login attempt (see :class:`AuthResult`). Blocks; never raises."""
        result = self._check(login, secret, mechanism, authzid, apop_timestamp, inline=False)
        assert result is not None
        return result

    def check_now(self, login: str, secret: str, *, mechanism: str = "USER", authzid: str = "",
                  apop_timestamp: str | None = None) -> AuthResult | None:
        """:meth:`check` when a thread would not help, else None (then call :meth:`check` in a thread).

        A thread helps only while it lets others run: a checkpassword program, argon2 and bcrypt release
        the GIL, crypt(3) does not (its 2 ms at 5,000 SHA-512 rounds hold the event loop either way, so
        the hand-off to a thread and back would be pure cost). Unknown logins, remembered verifications,
        plain secrets and APOP need no hash at all.
        """
        return self._check(login, secret, mechanism, authzid, apop_timestamp, inline=True)

    def _check(self, login: str, secret: str, mechanism: str, authzid: str, apop_timestamp: str | None,
               inline: bool) -> AuthResult | None:
        if authzid and authzid != login:
            return AuthResult(False, detail="authorization identity differs from the login")
        if self.checkpassword is not None:
            if inline:
                return None
            return self._checkpassword(login, secret, apop_timestamp if mechanism == "APOP" else None)
        try:
            found = self.lookup(login)
        except ConfigError as e:
            return AuthResult(False, temporary=True, detail=str(e))
        if found is None:
            return AuthResult(False, detail="unknown login")
        box, stored, maildir = found
        if mechanism == "APOP":
            ok = apop_timestamp is not None and verify_apop(stored, apop_timestamp, secret)
            return AuthResult(ok, box, maildir, detail="" if ok else "wrong APOP digest")
        key = self.cache.key(box, secret, stored)
        if self.cache.hit(key):
            return AuthResult(True, box, maildir, cached=True)
        if inline and not holds_gil(stored):
            return None
        if not verify_secret(stored, secret):
            return AuthResult(False, box, detail=f"wrong password ({scheme_of(stored)})")
        self.cache.add(key)
        return AuthResult(True, box, maildir)

    def _checkpassword(self, login: str, secret: str, timestamp: str | None) -> AuthResult:
        assert self.checkpassword is not None
        fields = (login, secret, timestamp or "")
        data = b"".join(s.encode("utf-8", "surrogateescape") + b"\0" for s in fields)
        if len(data) > CHECKPASSWORD_MAX_INPUT:
            return AuthResult(False, detail="login and password longer than checkpassword takes")
        # on success the program execs the rest of its arguments: a shell that prints $HOME
        argv = [*self.checkpassword, "/bin/sh", "-c", 'printf "%s" "$HOME"']
        try:
            code, out = run_checkpassword(argv, data, CHECKPASSWORD_TIMEOUT)
        except OSError as e:
            return AuthResult(False, temporary=True, detail=f"cannot run checkpassword: {e.strerror or e}")
        if code is None:
            return AuthResult(False, temporary=True, detail="checkpassword timed out")
        if code == 1:
            return AuthResult(False, detail="checkpassword: bad password")
        if code != 0:
            return AuthResult(False, temporary=True, detail=f"checkpassword exited {code}")
        home = os.fsdecode(out.strip())
        if not home.startswith("/"):
            return AuthResult(False, temporary=True, detail="checkpassword set no absolute $HOME")
        inner = os.path.join(home, "Maildir")
        return AuthResult(True, login, inner if os.path.isdir(inner) else home)


def run_checkpassword(argv: list[str], data: bytes, timeout: float) -> tuple[int | None, bytes]:
    """Run a checkpassword program with ``data`` on fd 3; (exit code or None on timeout, its stdout).

    posix_spawn, not subprocess: only it can put our pipe on fd 3 in the child without a preexec
    function (unsafe with threads) or a shell (dash cannot name fds above 9). Blocking: run it in a
    thread.
    """
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    fds = [r, w, out_r, out_w]
    try:
        if r == 3:  # dup2(3, 3) would leave close-on-exec set: move it out of the way first
            r = os.dup(r)
            fds.append(r)
        os.write(w, data)  # at most 512 bytes: never blocks on a pipe
        os.close(w)
        fds.remove(w)
        actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, r, 3)]
        pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=actions)
        os.close(out_w)
        fds.remove(out_w)
        return _collect(pid, out_r, time.monotonic() + timeout)
    finally:
        for fd in fds:
            os.close(fd)


def _collect(pid: int, out: int, deadline: float) -> tuple[int | None, bytes]:
    """Read the child's stdout (at most 4 KiB) and its exit status, killing it at ``deadline``."""
    got = b""
    pidfd = os.pidfd_open(pid)
    try:
        open_fds = [out, pidfd]
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return None, got
            ready, _, _ = select.select(open_fds, [], [], left)
            if out in ready:
                block = os.read(out, 4096)
                if block and len(got) < 4096:
                    got += block
                elif not block:
                    open_fds.remove(out)
            if pidfd in ready and out not in open_fds:
                _, status = os.waitpid(pid, 0)
                return os.waitstatus_to_exitcode(status), got
            if pidfd in ready and out in open_fds and not select.select([out], [], [], 0)[0]:
                _, status = os.waitpid(pid, 0)  # exited, and a grandchild may still hold stdout
                return os.waitstatus_to_exitcode(status), got
    finally:
        os.close(pidfd)
