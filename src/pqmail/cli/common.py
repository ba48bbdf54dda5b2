"""Options and helpers shared by the subcommands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from pqmail.paths import Root, default_root

F = TypeVar("F", bound=Callable[..., Any])


def root_option(func: F) -> F:
    """``--root DIR``: the qmail tree; default $PQMAIL_ROOT, then /var/pqmail. Passes ``root: Root``."""

    def to_root(ctx: click.Context, param: click.Parameter, value: str | None) -> Root:
        return Root(value) if value else Root(default_root())

    return click.option(
        "--root",
        "root",
        metavar="DIR",
        callback=to_root,
        help="The pqmail root (a qmail tree). Default: $PQMAIL_ROOT, then /var/pqmail.",
    )(func)
