"""POP3 logins: stored-secret schemes, box and address logins, checkpassword, the caches, pqmail passwd."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import require_tool
from pqmail.cli.passwd_cmd import passwd
from pqmail.passwords import PasswordStore, hash_password
from pqmail.paths import Root
from pqmail.pop3.auth import (
    Authenticator,
    FailureTracker,
    VerifiedCache,
    holds_gil,
    scheme_of,
    verify_apop,
    verify_secret,
)

PW = "correct horse"
# Generated with `openssl passwd -1/-5/-6 -salt saltsalt 'correct horse'` and the bcrypt package.
VECTORS = {
    "md5-crypt": "$1$saltsalt$NuzA7WTAelpl95xgBGWN60",
    "sha256-crypt": "$5$saltsalt$myjXcpMpE2Ofk7fj9hqyNYSn6lmWG4Mqnjx.KIRRr4/",
    "sha512-crypt": "$6$saltsalt$hRM5XZ86KXEw9UOmjigeVqFgULtFB2sgpC9lXQDfMib3Zgw7mEiUvBJI2Ep"
                    "lzfAqxL5Vvwp2scFtv/uamSo5z0",
    "bcrypt": "$2b$04$abcdefghijklmnopqrstuujydOTSfIH/d5oUHpsygqV5X9xJLQc6e",
}


@pytest.fixture(scope="module")
def argon() -> str:
    return hash_password(PW)


# ----------------------------------------------------------------------------- schemes

@pytest.mark.parametrize("scheme", sorted(VECTORS))
def test_crypt_and_bcrypt_vectors(scheme: str) -> None:
    stored = VECTORS[scheme]
    assert scheme_of(stored) == scheme
    assert verify_secret(stored, PW)
    assert not verify_secret(stored, PW + "!")
    assert not verify_secret(stored, "")


@pytest.mark.parametrize("flag", ["-1", "-5", "-6"])
def test_hashes_made_by_openssl_now(flag: str) -> None:
    openssl = require_tool("openssl")
    for pw in ("s3cret", "pässwörd with spaces"):
        stored = subprocess.run([openssl, "passwd", flag, pw], capture_output=True, check=True,
                                text=True).stdout.strip()
        assert verify_secret(stored, pw)
        assert not verify_secret(stored, pw.upper())


def test_sha512_crypt_with_explicit_rounds() -> None:
    from passlib.hash import sha512_crypt

    stored = sha512_crypt.using(rounds=5000, salt="abcdefgh").hash(PW)
    assert stored.startswith("$6$abcdefgh$")  # 5000 is crypt(3)'s default: no rounds= field
    assert verify_secret(stored, PW)
    assert verify_secret(sha512_crypt.using(rounds=6000).hash(PW), PW)


def test_bcrypt_variants_and_long_passwords() -> None:
    import bcrypt

    for prefix in ("$2a$", "$2y$"):
        assert verify_secret(VECTORS["bcrypt"].replace("$2b$", prefix), PW)
    long = "x" * 100
    stored = bcrypt.hashpw(long[:72].encode(), bcrypt.gensalt(4)).decode()
    assert verify_secret(stored, long)  # as every bcrypt system did: only 72 bytes count


def test_argon2(argon: str) -> None:
    assert scheme_of(argon) == "argon2"
    assert verify_secret(argon, PW)
    assert not verify_secret(argon, "wrong")


def test_dovecot_style_prefixes(argon: str) -> None:
    assert verify_secret("{SHA512-CRYPT}" + VECTORS["sha512-crypt"], PW)
    assert verify_secret("{CRYPT}" + VECTORS["md5-crypt"], PW)
    assert verify_secret("{BLF-CRYPT}" + VECTORS["bcrypt"], PW)
    assert verify_secret("{ARGON2ID}" + argon, PW)
    assert not verify_secret("{MD5-CRYPT}" + VECTORS["sha512-crypt"], PW)  # mislabelled
    assert verify_secret("{PLAIN}" + PW, PW)
    assert verify_secret("{cleartext}" + PW, PW)
    assert not verify_secret("{PLAIN}" + PW, PW + " ")


@pytest.mark.parametrize("stored", ["", "$6$", "$6$salt", "$2b$04$short", "$argon2id$garbage", "plain",
                                    "{SSHA}abcd", "$1$\udcff$x", "$7$whatever"])
def test_malformed_hashes_never_raise(stored: str) -> None:
    assert verify_secret(stored, PW) is False


def test_apop_needs_a_plain_secret() -> None:
    stamp = "<1896.697170952@dbc.mtview.ca.us>"  # RFC 1939's example
    assert verify_apop("{PLAIN}tanstaaf", stamp, "c4c9334bac560ecc979e58001b3e22fb")
    assert not verify_apop("{PLAIN}tanstaaf", stamp, "0" * 32)
    assert not verify_apop(VECTORS["sha512-crypt"], stamp, "c4c9334bac560ecc979e58001b3e22fb")


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
