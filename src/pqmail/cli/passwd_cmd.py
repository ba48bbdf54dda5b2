"""``pqmail passwd BOX``: give a POP box a new password (argon2id), or an imported hash as it is.

The change is one line of users/poppasswd and a recompiled users/poppasswd.cdb (atomic), so the POP3
server uses the new password from its next login on; a remembered verification of the old one no
longer matches, because its key includes the stored hash. Files keep their owner, so the mail user
can still read the cdb when root runs this.
"""

from __future__ import annotations

import click

from pqmail.cli.common import password_store_ids, read_password, root_option
from pqmail.errors import UsageError
from pqmail.paths import Root

CTX = {"help_option_names": ["-h", "--help"]}


@click.command(context_settings=CTX)
@click.argument("box", metavar="BOX")
@click.option("--password-file", metavar="F", help="Read the password from the first line of F ('-': stdin).")
@click.option("--random-password", is_flag=True, help="Generate a password and print it.")
@click.option("--hash", "hashed", metavar="HASH",
              help="Store this hash as it is ($6$..., $2b$..., $argon2id$...), e.g. from another system.")
@root_option
def passwd(box: str, password_file: str | None, random_password: bool, hashed: str | None,
           root: Root) -> None:
    """Change the password of POP box BOX (users/poppasswd and its cdb).

    Without an option the new password is asked for twice on a terminal, or read from the first line
    of standard input. It is stored hashed with argon2id. --hash stores an existing crypt(3) or bcrypt
    hash unchanged (pqmail pop3d verifies $1$, $5$, $6$ and $2a$/$2b$/$2y$ hashes too).

    \b
    Exit status: 0 done; 100 unknown box or bad input; 111 system error.
    """
    from pqmail.hashes import scheme_of
    from pqmail.passwords import PasswordStore, hash_password

    store = PasswordStore(root, *password_store_ids(root))
    current = store.get(box)
    if current is None:
        raise UsageError(f"no such box {box!r} in {store.cdb_path}")
    if hashed is not None:
        if password_file is not None or random_password:
            raise UsageError("give --hash or a password option, not both")
        if scheme_of(hashed) == "unknown":
            raise UsageError(f"unsupported hash {hashed[:12]!r}...: want $argon2id$, $1$, $5$, $6$, $2b$ "
                             "or {PLAIN}")
        store.set(box, hashed, current[1])
        click.echo(f"{box}: hash replaced")
        return
    password, generated = read_password(password_file, random_password, prompt="New password")
    if any(c in password for c in "\0\r\n"):
        raise UsageError("invalid password: contains a NUL, CR or LF")
    store.set(box, hash_password(password), current[1])
    click.echo(f"{box} {password}" if generated else f"{box}: password changed")
