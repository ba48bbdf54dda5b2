"""Stored password hashes: every scheme's vectors, hashes made by openssl now, Dovecot-style prefixes,
malformed hashes, APOP."""

from __future__ import annotations

import subprocess

import pytest

from conftest import require_tool
from pqmail.hashes import scheme_of, verify_apop, verify_secret
from pqmail.passwords import hash_password

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
