"""POP box passwords: argon2id hashing, and the users/poppasswd store with its cdb."""

from __future__ import annotations

import os
import pwd
import stat
import string
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import mail_owner, require_tool
from pqmail.errors import ConfigError, UsageError
from pqmail.passwords import PasswordStore, hash_password, needs_rehash, random_password, verify_password
from pqmail.paths import Root


@pytest.fixture(scope="module")
def hashed() -> str:
    return hash_password("correct horse")  # argon2 is slow on purpose: hash once per module


@pytest.fixture
def root(tmp_path: Path) -> Root:
    r = Root(tmp_path / "root")
    r.users.mkdir(parents=True)
    return r


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


# ----------------------------------------------------------------------------- hashing

def test_hash_is_argon2id_and_salted(hashed: str) -> None:
    assert hashed.startswith("$argon2id$v=19$")
    assert "correct horse" not in hashed
    assert hash_password("correct horse") != hashed  # a fresh salt each time


def test_verify(hashed: str) -> None:
    assert verify_password(hashed, "correct horse")
    assert not verify_password(hashed, "Correct horse")
    assert not verify_password(hashed, "")
    assert not needs_rehash(hashed)


@pytest.mark.parametrize("stored", [
    "", "x", "*", "!", "$argon2id$", "$argon2id$v=19$m=65536,t=3,p=4$notbase64!$zz",
    "$argon2id$v=19$m=1,t=1,p=1$c2FsdHNhbHQ$aGFzaA",  # parameters argon2 refuses
    "$1$salt$hash", "$2b$12$abcdefghijklmnopqrstuuOk0mQ8a6rUjJ7kqz6kTgU5w0u9WQzfi",
    "\0", "$argon2id$v=19$m=65536,t=3,p=4$\udcff$x",
])
def test_verify_malformed_stored_hash_is_false(stored: str) -> None:
    assert verify_password(stored, "correct horse") is False


def test_verify_wrong_types_are_false(hashed: str) -> None:
    assert verify_password(None, "x") is False  # type: ignore[arg-type]
    assert verify_password(hashed, None) is False  # type: ignore[arg-type]


def test_random_password() -> None:
    pws = {random_password() for _ in range(100)}
    assert len(pws) == 100
    for pw in pws:
        assert len(pw) == 16
        assert set(pw) <= set(string.ascii_letters + string.digits + "-_")


# ----------------------------------------------------------------------------- the store

def test_set_get_remove_survive_reload(root: Root, hashed: str) -> None:
    store = PasswordStore(root)
    assert store.get("ex1-0000") is None and store.boxes() == []
    store.set("ex1-0000", hashed, "/m/e/ex1/POP/ex1-0000/")
    store.set("ex1-0001", hashed, Path("/m/e/ex1/POP/ex1-0001"))
    again = PasswordStore(root)
    assert again.get("ex1-0000") == (hashed, "/m/e/ex1/POP/ex1-0000/")
    assert again.get("ex1-0001") == (hashed, "/m/e/ex1/POP/ex1-0001")
    assert again.boxes() == ["ex1-0000", "ex1-0001"]
    assert again.remove("ex1-0000") is True
    assert again.remove("ex1-0000") is False
    assert PasswordStore(root).get("ex1-0000") is None
    assert store.get("ex1-0000") is None  # the first instance sees the new cdb too
    assert store.boxes() == ["ex1-0001"]


def test_files_are_private_and_readable(root: Root, hashed: str) -> None:
    store = PasswordStore(root)
    store.set("ex1-0000", hashed, "/m/ex1-0000/")
    text = root.users / "poppasswd"
    assert text.read_text() == f"ex1-0000:{hashed}:/m/ex1-0000/\n"
    assert mode(text) == 0o600 and mode(root.users / "poppasswd.cdb") == 0o600
    assert not (root.users / "poppasswd.cdb.tmp").exists()


def test_cdb_layout(root: Root, hashed: str) -> None:
    PasswordStore(root).set("ex1-0000", hashed, "/m/ex1-0000/")
    out = subprocess.run([require_tool("cdb"), "-q", str(root.users / "poppasswd.cdb"), "ex1-0000"],
                         check=True, capture_output=True).stdout
    assert out == f"{hashed}\0/m/ex1-0000/".encode()


def test_get_reads_the_cdb_only(root: Root, hashed: str) -> None:
    store = PasswordStore(root)
    store.set("ex1-0000", hashed, "/m/ex1-0000/")
    (root.users / "poppasswd").write_text("ex1-0000:changed-by-hand:/elsewhere/\n")
    assert store.get("ex1-0000") == (hashed, "/m/ex1-0000/")  # not compiled yet
    (root.users / "poppasswd").unlink()
    assert store.get("ex1-0000") == (hashed, "/m/ex1-0000/")
    # a cdb made by another tool is served as is
    cdb = root.users / "poppasswd.cdb"
    cdb.unlink()
    subprocess.run([require_tool("cdb"), "-c", str(cdb)], input=b"+3,9:box->hash\0/md/\n\n", check=True)
    assert store.get("box") == ("hash", "/md/")
    assert store.get("ex1-0000") is None


def test_compile_after_hand_edit(root: Root, hashed: str) -> None:
    store = PasswordStore(root)
    store.set("ex1-0000", hashed, "/m/ex1-0000/")
    (root.users / "poppasswd").write_text(f"ex1-0000:{hashed}:/m/moved/\n")
    assert store.compile() == 1
    assert store.get("ex1-0000") == (hashed, "/m/moved/")


def test_edits_keep_comments_and_order(root: Root, hashed: str) -> None:
    text = root.users / "poppasswd"
    text.write_text("# POP boxes of ex1\n"
                    "ex1-0002:old:/m/2/\n"
                    "\n"
                    "# the boss\n"
                    "ex1-0001:old:/m/1/\n"
                    "ex1-0002:dup:/m/2b/\n")
    store = PasswordStore(root)
    store.set("ex1-0002", hashed, "/m/2/")
    store.set("ex1-0003", hashed, "/m/3/")
    assert text.read_text() == ("# POP boxes of ex1\n"
                                f"ex1-0002:{hashed}:/m/2/\n"
                                "\n"
                                "# the boss\n"
                                "ex1-0001:old:/m/1/\n"
                                f"ex1-0003:{hashed}:/m/3/\n")
    store.remove("ex1-0001")
    assert "ex1-0001" not in text.read_text() and "# the boss\n" in text.read_text()
    assert store.boxes() == ["ex1-0002", "ex1-0003"]


def test_maildir_may_contain_colons(root: Root, hashed: str) -> None:
    store = PasswordStore(root)
    store.set("b", hashed, "/m/odd:name/")
    assert store.get("b") == (hashed, "/m/odd:name/")


@pytest.mark.parametrize(("box", "hash_", "maildir"), [
    ("", "h", "/m/"), ("a:b", "h", "/m/"), ("a\nb", "h", "/m/"), ("#a", "h", "/m/"),
    ("a", "", "/m/"), ("a", "h:x", "/m/"), ("a", "h", ""), ("a", "h", "/m\n/"), ("a", "h", "/m\0"),
])
def test_set_rejects_what_would_break_the_file(root: Root, box: str, hash_: str, maildir: str) -> None:
    with pytest.raises(UsageError):
        PasswordStore(root).set(box, hash_, maildir)
    assert not (root.users / "poppasswd").exists()


def test_malformed_text_line_is_named(root: Root, hashed: str) -> None:
    (root.users / "poppasswd").write_text("ok:h:/m/\nbroken line\n")
    store = PasswordStore(root)
    with pytest.raises(ConfigError) as exc:
        store.set("x", hashed, "/m/x/")
    assert exc.value.line == 2 and exc.value.path == str(root.users / "poppasswd")
    assert (root.users / "poppasswd").read_text() == "ok:h:/m/\nbroken line\n"


def test_unreadable_cdb_is_a_config_error(root: Root) -> None:
    (root.users / "poppasswd.cdb").mkdir()
    with pytest.raises(ConfigError, match=r"Trouble reading users/poppasswd\.cdb"):
        PasswordStore(root).get("x")


def test_owner(root: Root, hashed: str) -> None:
    pw = pwd.getpwnam(mail_owner())
    store = PasswordStore(root, uid=pw.pw_uid, gid=pw.pw_gid)
    store.set("ex1-0000", hashed, "/m/")
    for name in ("poppasswd", "poppasswd.cdb"):
        st = (root.users / name).stat()
        assert (st.st_uid, st.st_gid) == (pw.pw_uid, pw.pw_gid)


def test_concurrent_sets_lose_nothing(root: Root) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            store = PasswordStore(root)
            for i in range(10):
                store.set(f"box-{n}-{i}", "h", f"/m/{n}/{i}/")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    store = PasswordStore(root)
    assert len(store.boxes()) == 40
    assert all(store.get(f"box-{n}-{i}") == ("h", f"/m/{n}/{i}/") for n in range(4) for i in range(10))


def test_many_boxes_lookup(root: Root) -> None:
    text = "".join(f"ex{n // 100}-{n % 100:04d}:h{n}:/m/{n}/\n" for n in range(10000))
    (root.users / "poppasswd").write_text(text)
    store = PasswordStore(root)
    assert store.compile() == 10000
    assert store.get("ex99-0099") == ("h9999", "/m/9999/")
    assert os.path.getsize(root.users / "poppasswd.cdb") > 0
