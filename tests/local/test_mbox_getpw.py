"""mbox locking and error recovery, and qmail-getpw's passwd/alias fallback."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from pqmail.config.assign import AssignEntry
from pqmail.errors import TemporaryFailure
from pqmail.local import mbox
from pqmail.local.getpw import getpw

# ---------------------------------------------------------------------------- mbox


def test_format_message():
    assert mbox.format_message(b"U\n", b"R\n", b"D\n", b"From a\nb") == b"U\nR\nD\n>From a\nb\n\n"


def test_locked_mbox_times_out_and_is_left_untouched(tmp_path):
    path = tmp_path / "Mailbox"
    path.write_bytes(b"old\n")
    with open(path, "ab") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        with pytest.raises(TemporaryFailure) as e:
            mbox.append(os.fsencode(path), "./Mailbox", b"new\n", lock_timeout=0.2)
    assert str(e.value) == "File has been locked for 30 seconds straight. (#4.3.0)"
    assert path.read_bytes() == b"old\n"


def test_mbox_waits_for_a_lock_released_in_time(tmp_path):
    path = tmp_path / "Mailbox"
    errors: list[BaseException] = []

    def deliver() -> None:
        try:
            mbox.append(os.fsencode(path), "./Mailbox", b"new\n", lock_timeout=30)
        except BaseException as e:
            errors.append(e)

    with open(path, "ab") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        t = threading.Thread(target=deliver)
        t.start()
        holder.write(b"held\n")  # written while we hold the lock: the delivery must come after it
    t.join(60)
    assert errors == []
    assert path.read_bytes() == b"held\nnew\n"


_FSIZE_CHILD = r"""
import os, resource, signal, sys
from pqmail.errors import TemporaryFailure
from pqmail.local import mbox
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (150, 150))
try:
    mbox.append(os.fsencode(sys.argv[1]), "./Mailbox", b"x" * 200)
except TemporaryFailure as e:
    print(e)
"""


def test_write_error_truncates_back_to_the_old_length(tmp_path):
    path = tmp_path / "Mailbox"
    path.write_bytes(b"o" * 100)
    p = subprocess.run([sys.executable, "-c", _FSIZE_CHILD, str(path)], capture_output=True, check=True)
    assert p.stdout.decode() == "Unable to write ./Mailbox: file too big. (#4.3.0)\n"
    assert path.read_bytes() == b"o" * 100


# ---------------------------------------------------------------------------- qmail-getpw


@dataclass
class Pw:
    pw_name: str
    pw_uid: int
    pw_gid: int
    pw_dir: str


@pytest.fixture
def passwd(tmp_path):
    """A passwd table whose homes exist and belong to the right uid (chowned when we are root)."""
    uid = os.getuid() or 65534
    table: dict[str, Pw] = {}

    def add(name: str, *, uid: int = uid, home: Path | None = None, own: bool = True) -> Pw:
        if home is None:
            home = tmp_path / f"home-{name}"
            home.mkdir()
            if os.geteuid() == 0:
                os.chown(home, uid if own else 4242, -1)
            elif not own:
                pytest.skip("needs root to own a directory as someone else")
        table[name] = Pw(name, uid, 100, str(home))
        return table[name]

    add.table = table  # type: ignore[attr-defined]
    add.lookup = table.get  # type: ignore[attr-defined]
    return add


def test_exact_account(passwd):
    pw = passwd("joe")
    assert getpw("joe", lookup=passwd.lookup) == AssignEntry("joe", pw.pw_uid, 100, pw.pw_dir, "", "")


def test_account_with_extension(passwd):
    pw = passwd("joe")
    assert getpw("joe-foo-Bar", lookup=passwd.lookup) == AssignEntry("joe", pw.pw_uid, 100, pw.pw_dir, "-",
                                                                     "foo-Bar")


def test_longest_account_name_wins(passwd):
    passwd("joe")
    pw = passwd("joe-foo")
    assert getpw("joe-foo-bar", lookup=passwd.lookup) == AssignEntry("joe-foo", pw.pw_uid, 100, pw.pw_dir,
                                                                     "-", "bar")


def test_lookup_is_lowercased_but_ext_keeps_case(passwd):
    pw = passwd("joe")
    assert getpw("JOE-Foo", lookup=passwd.lookup) == AssignEntry("joe", pw.pw_uid, 100, pw.pw_dir, "-", "Foo")


def test_trailing_dash_gives_empty_ext(passwd):
    passwd("joe")
    e = getpw("joe-", lookup=passwd.lookup)
    assert (e.user, e.dash, e.ext) == ("joe", "-", "")


def test_uid_0_account_is_skipped_for_alias(passwd):
    passwd("boss", uid=0)
    alias = passwd("alias")
    assert getpw("boss", lookup=passwd.lookup) == AssignEntry("alias", alias.pw_uid, 100, alias.pw_dir, "-",
                                                              "boss")


def test_home_missing_or_not_owned_is_skipped(passwd, tmp_path):
    passwd("gone", home=tmp_path / "nonexistent")
    passwd("alias")
    assert getpw("gone-x", lookup=passwd.lookup).user == "alias"
    passwd("other", own=False)
    assert getpw("other", lookup=passwd.lookup).user == "alias"


def test_names_of_32_characters_or_more_are_never_tried(passwd):
    passwd("a" * 31)
    passwd("b" * 32)
    passwd("alias")
    assert getpw("a" * 31, lookup=passwd.lookup).user == "a" * 31
    assert getpw("b" * 32, lookup=passwd.lookup) .user == "alias"
    e = getpw("a" * 31 + "-x", lookup=passwd.lookup)
    assert (e.user, e.ext) == ("a" * 31, "x")


def test_alias_gets_the_whole_local_part_in_original_case(passwd):
    alias = passwd("alias")
    assert getpw("Postmaster", lookup=passwd.lookup) == AssignEntry("alias", alias.pw_uid, 100, alias.pw_dir,
                                                                    "-", "Postmaster")


def test_no_alias_user_gives_none(passwd):
    passwd("joe")
    assert getpw("nobody-here", lookup=passwd.lookup) is None


def test_real_passwd_without_the_alias_user():
    # root exists everywhere but has uid 0, so it never matches; the alias user is absent.
    assert getpw("root", alias_user="pqmail-test-no-such-alias") is None
    assert getpw("zz-pqmail-no-such-user-ext", alias_user="pqmail-test-no-such-alias") is None


def test_real_passwd_alias_fallback_uses_the_named_account():
    e = getpw("Some-Thing", alias_user="root")
    assert (e.user, e.uid, e.dash, e.ext) == ("root", 0, "-", "Some-Thing")
