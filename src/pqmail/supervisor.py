"""``pqmail serve``: the supervisor of design.md.

What it does: binds every listening socket (as root, so ports below 1024 work), then forks each
service — N smtpd workers sharing the SMTP sockets, and one queue manager — restarts a service that
dies (with back-off), forwards SIGHUP (reload) to every service, and on SIGTERM/SIGINT stops
accepting, lets the services finish what they are doing, and exits. Each service's output reaches
our stderr line by line, prefixed with the service's name.

What it trusts: only itself. Network-facing services drop to the mail user (control/mailuser)
right after the fork — setgroups, setgid, setuid, in that order — before they read a byte from the
network. The queue manager keeps root, because it must take each user's uid for deliveries.

Why fork without exec: the interpreter and the package may live where only root can read them (a
pyenv under /root, a virtualenv in a private checkout); a forked child already has every module
it needs. The supervisor itself stays single-threaded so that forking is safe.
"""

from __future__ import annotations

import errno
import os
import pwd
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from pqmail.errors import UsageError
from pqmail.sessioncount import SessionCounter, SessionTable

BACKOFF_MAX = 60.0
STABLE_AFTER = 30.0  # a service that ran this long counts as healthy again
STOP_GRACE = 60.0


@dataclass
class Service:
    """One supervised process: ``target()`` runs in the forked child and should not return early."""

    name: str
    target: Callable[[], None]
    drop_to: tuple[int, int] | None  # (uid, gid) to become, or None to stay as we are
    on_exit: Callable[[], None] | None = None  # run in the supervisor when the process has exited
    pid: int = 0
    started: float = 0.0
    failures: int = 0
    restart_at: float = 0.0
    out_fd: int = -1
    buffer: bytes = field(default=b"")


def worker_services(name: str, count: int, drop_to: tuple[int, int] | None,
                    run: Callable[[SessionCounter], None]) -> list[Service]:
    """``count`` processes ``name-0``.. serving the same sockets: ``run(counter)`` serves with the
    worker's share of one SessionTable, so that session limits count all of them; the share of a
    worker that exits is cleared (its connections went with it)."""
    table = SessionTable(count)
    return [Service(f"{name}-{n}", partial(run, table.counter(n)), drop_to=drop_to,
                    on_exit=partial(table.clear, n)) for n in range(count)]


def parse_hostport(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT``, ``PORT`` or ``[v6]:PORT`` -> (host, port); a clear error otherwise."""
    host, port_text = default_host, text
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1:].startswith(":"):
            raise UsageError(f"{text!r}: expected [IPv6]:PORT")
        host, port_text = text[1:end], text[end + 2:]
    elif ":" in text:
        host, port_text = text.rsplit(":", 1)
        host = host or "0.0.0.0"
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"{text!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)


def bind_listener(host: str, port: int, reuseport: bool = False) -> socket.socket:
    """A listening TCP socket, close-on-exec, with a clear error when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        if e.errno == errno.EACCES:
            raise UsageError(f"cannot listen on {host}:{port}: permission denied "
                             "(ports below 1024 need root)") from None
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    s.listen(1024)
    s.setblocking(False)
    return s


def mail_user_ids(root_control: Path) -> tuple[int, int]:
    """uid/gid of control/mailuser, refusing root; used for privilege drops."""
    path = root_control / "mailuser"
    try:
        name = path.read_text("latin-1").split("\n", 1)[0].strip()
    except FileNotFoundError:
        raise UsageError(f"{path}: missing; it names the user the network services run as") from None
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise UsageError(f"{path}:1: no such user {name!r}") from None
    if pw.pw_uid == 0:
        raise UsageError(f"{path}:1: {name!r} is root; the network services never run as root")
    return pw.pw_uid, pw.pw_gid


def drop_privileges(uid: int, gid: int) -> None:
    from pqmail import syncfs

    syncfs.available()  # loads ctypes while the interpreter's library is still readable
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() == 0 or os.geteuid() == 0:  # belt and braces: never go on as root
        os._exit(111)


class Supervisor:
    """Fork, watch, restart and stop a fixed set of services."""

    def __init__(self, services: list[Service], pidfile: Path | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.services = services
        self.pidfile = pidfile
        self.log = log or _log
        self.stopping = False
        self.stop_deadline = 0.0
        self.sel = selectors.DefaultSelector()
        self.sig_r, self.sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def run(self) -> int:
        if self.pidfile is not None:
            _write_pidfile(self.pidfile)
        signal.set_wakeup_fd(self.sig_w)
        for sig in (signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
            signal.signal(sig, lambda *_: None)  # the wakeup fd carries the signal number
        self.sel.register(self.sig_r, selectors.EVENT_READ, None)
        for svc in self.services:
            self._start(svc)
        try:
            while True:
                self._restart_due()
                if self.stopping and not any(s.pid for s in self.services):
                    break
                timeout = self._timeout()
                for key, _ in self.sel.select(timeout):
                    if key.fd == self.sig_r:
                        self._signals()
                    else:
                        self._read_output(key.data)
                self._reap()
                if self.stopping and time.monotonic() > self.stop_deadline:
                    for s in self.services:
                        if s.pid:
                            self.log(f"serve: {s.name} did not stop in {STOP_GRACE:.0f}s; killing it")
                            _kill(s.pid, signal.SIGKILL)
        finally:
            for s in self.services:
                if s.out_fd >= 0:
                    self._flush_output(s, final=True)
            if self.pidfile is not None:
                try:
                    self.pidfile.unlink()
                except FileNotFoundError:
                    pass
        self.log("serve: stopped")
        return 0

    # ------------------------------------------------------------------ children

    def _start(self, svc: Service) -> None:
        r, w = os.pipe2(os.O_CLOEXEC)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(r)
                os.close(self.sig_r)
                os.close(self.sig_w)
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                # A reload or flush forwarded while the service starts must not kill it (their default
                # action) before it installs its own handlers; a handler, unlike SIG_IGN, is reset by
                # exec, so programs the service runs still get the default.
                for sig in (signal.SIGHUP, signal.SIGALRM):
                    signal.signal(sig, _ignore)
                os.dup2(w, 1)
                os.dup2(w, 2)
                os.close(w)
                os.environ["PQMAIL_SERVICE"] = svc.name
                if svc.drop_to is not None:
                    drop_privileges(*svc.drop_to)
                svc.target()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException as e:  # the parent logs and restarts us
                print(f"fatal: {type(e).__name__}: {e}", file=sys.stderr)
                code = 111
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(w)
        svc.pid = pid
        svc.started = time.monotonic()
        svc.out_fd = r
        os.set_blocking(r, False)
        self.sel.register(r, selectors.EVENT_READ, svc)
        self.log(f"serve: started {svc.name} (pid {pid})")

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for svc in self.services:
                if svc.pid == pid:
                    self._exited(svc, status)

    def _exited(self, svc: Service, status: int) -> None:
        svc.pid = 0
        if svc.on_exit is not None:
            svc.on_exit()
        how = (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"status {os.waitstatus_to_exitcode(status)}")
        if self.stopping:
            self.log(f"serve: {svc.name} stopped ({how})")
            return
        ran = time.monotonic() - svc.started
        svc.failures = 0 if ran > STABLE_AFTER else svc.failures + 1
        delay = min(BACKOFF_MAX, 0.5 * (2 ** max(0, svc.failures - 1))) if svc.failures else 0.1
        svc.restart_at = time.monotonic() + delay
        self.log(f"serve: {svc.name} exited ({how}) after {ran:.1f}s; restarting in {delay:.1f}s")

    def _restart_due(self) -> None:
        if self.stopping:
            return
        now = time.monotonic()
        for svc in self.services:
            if not svc.pid and svc.restart_at and now >= svc.restart_at:
                svc.restart_at = 0.0
                self._start(svc)

    def _timeout(self) -> float | None:
        pending = [s.restart_at for s in self.services if not s.pid and s.restart_at]
        if self.stopping:
            return max(0.0, min(1.0, self.stop_deadline - time.monotonic()))
        if pending:
            return max(0.0, min(pending) - time.monotonic())
        return None

    def _signals(self) -> None:
        try:
            data = os.read(self.sig_r, 512)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
                self.stopping = True
                self.stop_deadline = time.monotonic() + STOP_GRACE
                self.log("serve: stopping: services finish what they are doing")
                self._broadcast(signal.SIGTERM)
            elif signum == signal.SIGHUP:
                self.log("serve: reloading (SIGHUP to every service)")
                self._broadcast(signal.SIGHUP)
            elif signum == signal.SIGALRM:
                self._broadcast(signal.SIGALRM)

    def _broadcast(self, sig: int) -> None:
        for s in self.services:
            if s.pid:
                _kill(s.pid, sig)

    # ------------------------------------------------------------------ logs

    def _read_output(self, svc: Service) -> None:
        try:
            data = os.read(svc.out_fd, 65536)
        except BlockingIOError:
            return
        if not data:
            self._flush_output(svc, final=True)
            return
        svc.buffer += data
        self._flush_output(svc, final=False)

    def _flush_output(self, svc: Service, final: bool) -> None:
        *lines, rest = svc.buffer.split(b"\n")
        if final and rest:
            lines.append(rest)
            rest = b""
        svc.buffer = rest
        for line in lines:
            self.log(f"{svc.name}: {line.decode('utf-8', 'replace')}")
        if final:
            self.sel.unregister(svc.out_fd)
            os.close(svc.out_fd)
            svc.out_fd = -1


def _ignore(_signum: int, _frame: object) -> None:
    pass


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _write_pidfile(path: Path) -> None:
    try:
        old = int(path.read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        old = 0
    if old and old != os.getpid():
        try:
            os.kill(old, 0)
            raise UsageError(f"{path}: pqmail serve is already running as pid {old}")
        except ProcessLookupError:
            pass
        except PermissionError:
            raise UsageError(f"{path}: pqmail serve is already running as pid {old}") from None
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)


def _log(line: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    sys.stderr.write(f"{stamp} {line}\n")
    sys.stderr.flush()
