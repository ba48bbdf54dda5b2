"""Where things live inside a pqmail root (a qmail tree: control/, users/, queue/)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_ROOT = "/var/pqmail"


def default_root() -> Path:
    """``$PQMAIL_ROOT``, else /var/pqmail: the root every command uses without ``--root``."""
    return Path(os.environ.get("PQMAIL_ROOT") or DEFAULT_ROOT)


class Root:
    """Paths of one qmail tree. Pure: constructing it touches no file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def control(self) -> Path:
        return self.path / "control"

    @property
    def users(self) -> Path:
        return self.path / "users"

    @property
    def queue(self) -> Path:
        return self.path / "queue"

    def control_file(self, name: str) -> Path:
        return self.control / name

    @property
    def assign(self) -> Path:
        return self.users / "assign"

    @property
    def users_cdb(self) -> Path:
        return self.users / "cdb"

    def __repr__(self) -> str:
        return f"Root({str(self.path)!r})"
