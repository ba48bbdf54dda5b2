"""The queue's directories, their modes and owner: creating them, repairing them, checking them.

One table (:data:`LAYOUT`) says what ``ROOT/queue`` must hold. :func:`make_queue` creates or
repairs it (``pqmail init``, ``pqmail queue fix``); :func:`layout_problems` reports how a queue
differs from it (``pqmail check``), so that a wrong mode or owner is found before smtpd answers 451
to every message or the manager stops.

Imported by the queue store, hence by inject: only os and stat at module level.
"""

from __future__ import annotations

import os
import stat

from pqmail.errors import UsageError

SPLIT = 23  # qmail's conf-split

# (relative path, mode). Writers (smtpd, inject, sendmail) create files in the group-writable
# ones: setgid so that every file gets the queue's group, sticky so that no writer can remove
# another's files. Everything else is the queue manager's alone.
WRITER_DIR = 0o3770
LAYOUT: list[tuple[str, int]] = [
    ("", 0o750),
    ("pid", WRITER_DIR),
    ("intd", WRITER_DIR),
    ("todo", WRITER_DIR),
    ("mess", 0o750),
    *((f"mess/{n}", WRITER_DIR) for n in range(SPLIT)),
    *((sub, 0o700) for sub in ("info", "local", "remote")),
    *((f"{sub}/{n}", 0o700) for sub in ("info", "local", "remote") for n in range(SPLIT)),
    ("bounce", 0o700),
    ("status", 0o700),
    ("lock", 0o750),
    ("pool", WRITER_DIR),
]
SENDMUTEX = ("lock/sendmutex", 0o600)
TRIGGER = ("lock/trigger", 0o622)


def make_queue(path: str | os.PathLike[str], uid: int | None = None, gid: int | None = None) -> None:
    """Create (or repair) the queue layout under ``path``; idempotent.

    Modes, as qmail's install but without setuid programs: the directories a writer creates
    files in (``pid``, ``intd``, ``todo``, ``mess/N``, ``pool``) are ``3770``, so any process
    running as the owner or in the group ``gid`` can inject (that is how smtpd, cron and PHP reach
    the queue); setgid gives every queued file that group (read access for the manager and the
    queue tools), and the sticky bit keeps one writer from removing another's files; ``info``,
    ``local``, ``remote`` and ``bounce`` are ``0700`` (the manager's). ``lock/sendmutex`` is
    ``0600`` and ``lock/trigger`` a FIFO ``0622``. ``uid``/``gid`` (when given) own everything.
    """
    from pathlib import Path

    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    for rel, mode in LAYOUT:
        p = base / rel if rel else base
        try:
            p.mkdir(mode=0o700)
        except FileExistsError:
            if not p.is_dir():
                raise UsageError(f"{p}: exists and is not a directory") from None
        _own(p, mode, uid, gid)

    mutex = base / SENDMUTEX[0]
    os.close(os.open(mutex, os.O_WRONLY | os.O_CREAT, SENDMUTEX[1]))
    _own(mutex, SENDMUTEX[1], uid, gid)

    trigger = base / TRIGGER[0]
    try:
        os.mkfifo(trigger, 0o600)
    except FileExistsError:
        if not stat.S_ISFIFO(os.lstat(trigger).st_mode):
            raise UsageError(f"{trigger}: exists and is not a FIFO") from None
    _own(trigger, TRIGGER[1], uid, gid)

    for p in (base / "lock", base / "mess", base, base.parent):
        fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _own(p: os.PathLike[str], mode: int, uid: int | None, gid: int | None) -> None:
    if uid is not None or gid is not None:
        os.chown(p, -1 if uid is None else uid, -1 if gid is None else gid, follow_symlinks=False)
    os.chmod(p, mode)  # after chown, which may clear the sticky/setgid bits


def layout_problems(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """(path, problem) for every way the queue at ``path`` differs from :data:`LAYOUT`.

    The owner and group of ``path`` itself are the queue's; every directory, the lock files and the
    spare files in ``pool/`` must have them (a spare of another owner cannot be claimed by smtpd).
    An empty list means the layout is right. Messages are not read.
    """
    base = os.fspath(path)
    try:
        top = os.lstat(base)
    except OSError as e:
        return [(base, f"unusable: {e.strerror or e}")]
    owner = (top.st_uid, top.st_gid)
    problems: list[tuple[str, str]] = []

    def want(rel: str, mode: int, kind: int, what: str) -> None:
        p = os.path.join(base, rel) if rel else base
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            problems.append((p, f"missing (a {what}, mode {mode:04o})"))
            return
        except OSError as e:
            problems.append((p, f"unusable: {e.strerror or e}"))
            return
        if stat.S_IFMT(st.st_mode) != kind:
            problems.append((p, f"not a {what}"))
            return
        if stat.S_IMODE(st.st_mode) != mode:
            problems.append((p, f"mode {stat.S_IMODE(st.st_mode):04o}, should be {mode:04o}"))
        if (st.st_uid, st.st_gid) != owner:
            problems.append((p, f"owned by {st.st_uid}:{st.st_gid}, "
                                f"not by the queue's {owner[0]}:{owner[1]}"))

    for rel, mode in LAYOUT:
        want(rel, mode, stat.S_IFDIR, "directory")
    want(SENDMUTEX[0], SENDMUTEX[1], stat.S_IFREG, "regular file")
    want(TRIGGER[0], TRIGGER[1], stat.S_IFIFO, "FIFO")
    problems += _pool_problems(os.path.join(base, "pool"), owner)
    return problems


def layout_report(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """:func:`layout_problems`, followed (when there are any) by the command that repairs them."""
    found = layout_problems(path)
    if found:
        found.append((os.fspath(path), "`pqmail queue fix` restores the layout, modes and owner"))
    return found


def _pool_problems(pool: str, owner: tuple[int, int]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    try:
        entries = list(os.scandir(pool))
    except OSError:
        return out  # reported above as a directory problem
    for e in entries:
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue  # claimed by a writer meanwhile
        if not stat.S_ISREG(st.st_mode):
            out.append((e.path, "not a regular file (pool/ holds spare message files only)"))
        elif (st.st_uid, st.st_gid) != owner:
            out.append((e.path, f"spare owned by {st.st_uid}:{st.st_gid}, not by the queue's "
                                f"{owner[0]}:{owner[1]}: writers cannot reuse it"))
    return out
