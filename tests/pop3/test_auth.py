"""POP3 logins: box and address logins, checkpassword, the caches, pqmail passwd (the hash schemes:
test_hashes.py)."""

from __future__ import annotations

import asyncio
import hashlib
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pqmail.cli.passwd_cmd import passwd
from pqmail.hashes import holds_gil
from pqmail.passwords import PasswordStore, hash_password
from pqmail.paths import Root
from pqmail.pop3.auth import Authenticator, FailureTracker, VerifiedCache
from test_hashes import PW, VECTORS

# ----------------------------------------------------------------------------- caches and limits

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_verified_cache_keys_hide_the_password_and_expire() -> None:
    clock = Clock()
    cache = VerifiedCache(ttl=60, clock=clock)
    k = cache.key("ex1-0001", PW, "$6$x$y")
    assert PW.encode() not in k and len(k) == 32
    assert k != VerifiedCache().key("ex1-0001", PW, "$6$x$y")  # a random key per process
    assert not cache.hit(k)
    cache.add(k)
    assert cache.hit(k)
    assert not cache.hit(cache.key("ex1-0001", PW, "$6$other$hash"))  # a changed password
    assert not cache.hit(cache.key("ex1-0001", PW + "x", "$6$x$y"))
    clock.now += 61
    assert not cache.hit(k)


def test_verified_cache_is_bounded_and_can_be_off() -> None:
    cache = VerifiedCache(ttl=60, max_entries=10)
    for i in range(25):
        cache.add(cache.key("b", str(i), "h"))
    assert len(cache) <= 10
    off = VerifiedCache(ttl=0)
    off.add(off.key("b", "p", "h"))
    assert not off.hit(off.key("b", "p", "h"))


def test_failure_tracker_window() -> None:
    clock = Clock()
    t = FailureTracker(limit=3, window=60, clock=clock)
    for _ in range(2):
        t.record("192.0.2.1")
    assert not t.blocked("192.0.2.1")
    t.record("192.0.2.1")
    assert t.blocked("192.0.2.1") and not t.blocked("192.0.2.2")
    clock.now += 61
    assert not t.blocked("192.0.2.1")


# ----------------------------------------------------------------------------- logins on the seed tree

@pytest.fixture
def tree(seed: dict) -> dict:
    """The seed, with known secrets: ex1-0001 sha512-crypt, ex1-0002 argon2id."""
    root = Root(seed["root"])
    store = PasswordStore(root)
    for box, stored in (("ex1-0001", VECTORS["sha512-crypt"]), ("ex1-0002", hash_password("other pw"))):
        _, maildir = store.get(box)
        store.set(box, stored, maildir)
    return {**seed, "root": root, "store": store}


def auth(tree: dict, login: str, secret: str, **kw) -> object:
    a = kw.pop("authenticator", None) or Authenticator(tree["root"], **kw)
    return asyncio.run(a.authenticate(login, secret))


def test_box_login(tree: dict) -> None:
    r = auth(tree, "ex1-0001", PW)
    assert r.ok and r.box == "ex1-0001" and r.maildir == str(tree["pop"] / "ex1-0001")
    assert auth(tree, "EX1-0001", PW).ok
    assert auth(tree, "ex1-0002", "other pw").ok


def test_wrong_password_and_unknown_login_look_alike(tree: dict) -> None:
    wrong, unknown = auth(tree, "ex1-0001", "nope"), auth(tree, "ex9-0001", "nope")
    assert (wrong.ok, wrong.temporary, unknown.ok, unknown.temporary) == (False, False, False, False)
    assert auth(tree, "", "x").ok is False
    assert auth(tree, "a\x01b", "x").ok is False


def test_check_now_decides_what_holds_the_gil_and_leaves_the_rest_to_a_thread(tree: dict) -> None:
    a = Authenticator(tree["root"])
    good = a.check_now("ex1-0001", PW)  # sha512-crypt: crypt(3) holds the GIL, a thread gains nothing
    assert good is not None and good.ok and good.box == "ex1-0001" and not good.cached
    wrong = a.check_now("ex1-0001", "nope")
    assert wrong is not None and not wrong.ok
    unknown = a.check_now("ex9-0001", "nope")
    assert unknown is not None and (unknown.ok, unknown.temporary) == (False, False)
    assert a.check_now("ex1-0002", "other pw") is None  # argon2id releases the GIL: for a thread
    assert a.check("ex1-0002", "other pw").ok
    again = a.check_now("ex1-0002", "other pw")  # remembered: no hash at all
    assert again is not None and again.ok and again.cached
    assert holds_gil(VECTORS["sha512-crypt"]) and holds_gil("{PLAIN}x")
    assert not holds_gil(hash_password("x")) and not holds_gil(VECTORS["bcrypt"])


def test_address_login(tree: dict) -> None:
    a = Authenticator(tree["root"])
    assert a.lookup("joe@example.com")[0] == "ex1-0001"
    assert a.lookup("Joe@Example.COM")[0] == "ex1-0001"
    assert a.lookup("postmaster@example.com")[0] == "ex1-0000"  # .qmail-postmaster: the first box
    assert auth(tree, "joe@example.com", PW, authenticator=a).ok
    for nobody in ("nobody@example.com", "joe@unknown.test", "joe@", "@example.com", "joe@some.example.com"):
        assert a.lookup(nobody) is None, nobody


def test_address_login_only_for_exactly_one_box(tree: dict) -> None:
    home = tree["domains"] / "example.com"
    box1, box2 = tree["pop"] / "ex1-0001", tree["pop"] / "ex1-0002"
    (home / ".qmail-two").write_text(f"{box1}/\n{box2}/\n")
    (home / ".qmail-fwd").write_text("&someone@elsewhere.test\n")
    (home / ".qmail-copy").write_text(f"# comment\n{box2}/\n&copy@elsewhere.test\n")
    (home / ".qmail-stray").write_text(f"{tree['base']}/not-a-box/\n")
    (home / ".qmail-rel").write_text(f"{box2}/\n")
    a = Authenticator(tree["root"])
    for local in ("two", "fwd", "copy", "stray"):
        assert a.lookup(f"{local}@example.com") is None, local
    assert a.lookup("rel@example.com")[0] == "ex1-0002"


def test_address_resolution_is_cached_briefly(tree: dict) -> None:
    a = Authenticator(tree["root"], resolver_ttl=3600)
    assert a.lookup("joe@example.com")[0] == "ex1-0001"
    (tree["domains"] / "example.com" / ".qmail-joe").unlink()
    assert a.lookup("joe@example.com")[0] == "ex1-0001"
    assert Authenticator(tree["root"]).lookup("joe@example.com") is None


def test_successful_verifications_are_cached(tree: dict) -> None:
    a = Authenticator(tree["root"])
    first = auth(tree, "ex1-0001", PW, authenticator=a)
    second = auth(tree, "ex1-0001", PW, authenticator=a)
    assert first.ok and not first.cached and second.ok and second.cached
    assert not auth(tree, "ex1-0001", "wrong", authenticator=a).ok
    _, maildir = tree["store"].get("ex1-0001")
    tree["store"].set("ex1-0001", VECTORS["md5-crypt"], maildir)
    third = auth(tree, "ex1-0001", PW, authenticator=a)
    assert third.ok and not third.cached  # the stored hash changed: verified afresh


def test_plain_authzid_must_be_the_login(tree: dict) -> None:
    a = Authenticator(tree["root"])
    assert asyncio.run(a.authenticate("ex1-0001", PW, mechanism="PLAIN", authzid="ex1-0001")).ok
    assert not asyncio.run(a.authenticate("ex1-0001", PW, mechanism="PLAIN", authzid="ex1-0002")).ok


def test_apop_login(tree: dict) -> None:
    _, maildir = tree["store"].get("ex1-0002")
    tree["store"].set("ex1-0002", "{PLAIN}tanstaaf", maildir)
    a = Authenticator(tree["root"])
    stamp = "<1896.697170952@dbc.mtview.ca.us>"
    ok = asyncio.run(a.authenticate("ex1-0002", "c4c9334bac560ecc979e58001b3e22fb", mechanism="APOP",
                                    apop_timestamp=stamp))
    assert ok.ok
    assert not asyncio.run(a.authenticate("ex1-0001", "c4c9334bac560ecc979e58001b3e22fb", mechanism="APOP",
                                          apop_timestamp=stamp)).ok


def test_broken_password_cdb_is_a_temporary_failure(tree: dict) -> None:
    tree["store"].cdb_path.write_bytes(b"not a cdb")
    r = auth(tree, "ex1-0001", PW)
    assert not r.ok and r.temporary


# ----------------------------------------------------------------------------- checkpassword

CHECKPW = """#!{python}
import os, sys
data = os.read(3, 600)
login, pw, stamp = data.split(b"\\0")[:3]
with open({log!r}, "ab") as f:
    f.write(data + b"|")
if login == b"temp":
    sys.exit(111)
if (login, pw) != (b"joe", b"good"):
    sys.exit(1)
os.environ["HOME"] = {home!r}
os.chdir({home!r})
os.execvp(sys.argv[1], sys.argv[1:])
"""


@pytest.fixture
def checkpw(tmp_path: Path) -> tuple[Path, Path, Path]:
    home = tmp_path / "home"
    (home / "Maildir").mkdir(parents=True)
    log = tmp_path / "fd3.log"
    prog = tmp_path / "checkpw"
    prog.write_text(CHECKPW.format(python=sys.executable, log=str(log), home=str(home)))
    prog.chmod(0o755)
    return prog, home, log


def test_checkpassword_program(tmp_path: Path, checkpw: tuple[Path, Path, Path]) -> None:
    prog, home, log = checkpw
    a = Authenticator(Root(tmp_path / "root"), checkpassword=[str(prog)])
    ok = asyncio.run(a.authenticate("joe", "good"))
    assert ok.ok and ok.box == "joe" and ok.maildir == str(home / "Maildir")
    bad = asyncio.run(a.authenticate("joe", "bad"))
    assert not bad.ok and not bad.temporary
    temp = asyncio.run(a.authenticate("temp", "x"))
    assert not temp.ok and temp.temporary
    asyncio.run(a.authenticate("joe", "digest", mechanism="APOP", apop_timestamp="<1.2@h>"))
    assert log.read_bytes().split(b"|")[:4] == [b"joe\0good\0\0", b"joe\0bad\0\0", b"temp\0x\0\0",
                                                 b"joe\0digest\0<1.2@h>\0"]


def test_checkpassword_that_cannot_run(tmp_path: Path) -> None:
    a = Authenticator(Root(tmp_path / "root"), checkpassword=[str(tmp_path / "missing")])
    r = asyncio.run(a.authenticate("joe", "good"))
    assert not r.ok and r.temporary


# ----------------------------------------------------------------------------- pqmail passwd

def test_passwd_command(tree: dict, tmp_path: Path) -> None:
    root = str(tree["root"].path)
    pwfile = tmp_path / "pw"
    pwfile.write_text("brand new\n")
    r = CliRunner().invoke(passwd, ["ex1-0001", "--password-file", str(pwfile), "--root", root])
    assert r.exit_code == 0, r.output
    stored, maildir = tree["store"].get("ex1-0001")
    assert stored.startswith("$argon2id$") and maildir == str(tree["pop"] / "ex1-0001")
    assert auth(tree, "ex1-0001", "brand new").ok and not auth(tree, "ex1-0001", PW).ok
    r = CliRunner().invoke(passwd, ["ex1-0001", "--hash", VECTORS["bcrypt"], "--root", root])
    assert r.exit_code == 0 and auth(tree, "ex1-0001", PW).ok
    r = CliRunner().invoke(passwd, ["ex9-0009", "--random-password", "--root", root])
    assert r.exit_code != 0 and "no such box" in str(r.exception)
    r = CliRunner().invoke(passwd, ["ex1-0001", "--hash", "garbage", "--root", root])
    assert r.exit_code != 0
    assert hashlib.sha256(tree["store"].path.read_bytes()).hexdigest()  # still a readable file
