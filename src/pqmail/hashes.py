"""Stored password hashes of every scheme pqmail accepts: which scheme a hash is, and checking a secret.

argon2id (pqmail's own), crypt(3) ``$1$`` MD5-crypt, ``$5$`` SHA-256-crypt and ``$6$`` SHA-512-crypt
(passlib), bcrypt ``$2a$``/``$2b$``/``$2y$`` (the bcrypt package), each optionally behind a
Dovecot-style ``{SCHEME}`` prefix as imported from an existing installation; ``{PLAIN}``/``{CLEARTEXT}``
secrets, the only ones APOP can check. Shared by every service that checks passwords: pop3d's logins,
smtpd's AUTH and odmrd's.

Importing this module loads every backend (:func:`preload`): the services import it before they drop
privileges, after which the files of the interpreter may be unreadable.

What it never does: let a malformed stored hash raise, or keep a password.
"""

from __future__ import annotations

import hashlib
import hmac
import warnings

from pqmail.passwords import verify_password

__all__ = ["holds_gil", "plain_secret", "preload", "scheme_of", "verify_apop", "verify_secret"]

_PREFIXES = {
    "{CRYPT}": "", "{MD5-CRYPT}": "$1$", "{SHA256-CRYPT}": "$5$", "{SHA512-CRYPT}": "$6$",
    "{BLF-CRYPT}": "$2", "{ARGON2ID}": "$argon2id$", "{ARGON2I}": "$argon2i$",
}
_PLAIN_PREFIXES = ("{PLAIN}", "{CLEARTEXT}")


def scheme_of(stored: str) -> str:
    """``argon2``, ``md5-crypt``, ``sha256-crypt``, ``sha512-crypt``, ``bcrypt``, ``plain`` or ``unknown``."""
    s = _strip_prefix(stored)
    if s is None:
        return "plain"
    if s.startswith("$argon2"):
        return "argon2"
    for head, name in (("$1$", "md5-crypt"), ("$5$", "sha256-crypt"), ("$6$", "sha512-crypt")):
        if s.startswith(head):
            return name
    if s[:4] in ("$2a$", "$2b$", "$2y$"):
        return "bcrypt"
    return "unknown"


def _strip_prefix(stored: str) -> str | None:
    """The hash without a ``{SCHEME}`` prefix; None for a plain-text secret."""
    if stored.startswith("{"):
        head, brace, rest = stored.partition("}")
        head = head.upper() + brace
        if head in _PLAIN_PREFIXES:
            return None
        expect = _PREFIXES.get(head)
        if expect is None or not rest.startswith(expect):
            return "!"  # an unknown or mislabelled scheme never verifies
        return rest
    return stored


def plain_secret(stored: str) -> str | None:
    """The secret of a ``{PLAIN}``/``{CLEARTEXT}`` entry (what APOP needs), else None."""
    for head in _PLAIN_PREFIXES:
        if stored[: len(head)].upper() == head:
            return stored[len(head):]
    return None


def verify_secret(stored: str, password: str) -> bool:
    """Whether ``password`` matches ``stored`` in any supported scheme; False for anything malformed.

    A top-level function of strings, so that a process pool can run it.
    """
    try:
        return _verify(stored, password)
    except Exception:  # a malformed hash must cost a failed login, never a session
        return False


def _verify(stored: str, password: str) -> bool:
    pw = password.encode("utf-8", "surrogateescape")
    plain = plain_secret(stored)
    if plain is not None:
        return hmac.compare_digest(plain.encode("utf-8", "surrogateescape"), pw)
    s = _strip_prefix(stored)
    kind = scheme_of(stored)
    if kind == "argon2":
        return verify_password(s, password)
    if kind in ("md5-crypt", "sha256-crypt", "sha512-crypt"):
        return _passlib(kind).verify(pw, s)
    if kind == "bcrypt":
        import bcrypt

        # bcrypt only ever used the first 72 bytes; the library now refuses longer input instead
        return bcrypt.checkpw(pw[:72], s.encode("ascii"))
    return False


_passlib_handlers: dict[str, object] = {}


def _passlib(kind: str):
    handler = _passlib_handlers.get(kind)
    if handler is None:
        with warnings.catch_warnings():  # passlib imports the deprecated crypt module as its fast backend
            warnings.simplefilter("ignore", DeprecationWarning)
            from passlib import hash as ph

            handler = {"md5-crypt": ph.md5_crypt, "sha256-crypt": ph.sha256_crypt,
                       "sha512-crypt": ph.sha512_crypt}[kind]
            handler.get_backend()  # load it now, inside the warnings filter
        _passlib_handlers[kind] = handler
    return handler


def holds_gil(stored: str) -> bool:
    """Whether verifying ``stored`` keeps every other thread of the process waiting anyway.

    True for crypt(3) hashes through passlib's ``os_crypt`` backend (Python's crypt module does not
    release the GIL), for plain secrets and for what never verifies; False for argon2 and bcrypt, which
    release it, and for passlib's pure-Python fallback, which a thread at least interleaves with others.
    """
    kind = scheme_of(stored)
    if kind in ("md5-crypt", "sha256-crypt", "sha512-crypt"):
        return _passlib(kind).get_backend() == "os_crypt"
    return kind in ("plain", "unknown")


def verify_apop(stored: str, timestamp: str, digest: str) -> bool:
    """RFC 1939 §7 APOP: ``digest`` == MD5(timestamp + secret), for plain-text secrets only."""
    secret = plain_secret(stored)
    if secret is None:
        return False
    want = hashlib.md5((timestamp + secret).encode("utf-8", "surrogateescape")).hexdigest()
    return hmac.compare_digest(want, digest)


def preload() -> None:
    """Import every hash backend now, before a service forks workers or drops privileges.

    After the drop the interpreter's own files may be unreadable (a pyenv under /root), so nothing
    may load lazily later: passlib's crypt backend, for one, imports the standard library's crypt.
    Importing this module calls it, so that every service that verifies passwords (pop3d, smtpd's
    AUTH, odmrd) has the backends.
    """
    for stored in ("$1$x$y", "$5$x$y", "$6$x$y", "$2b$04$" + "a" * 53, "$argon2id$v=19$m=8,t=1,p=1$x$y"):
        verify_secret(stored, "x")


preload()
