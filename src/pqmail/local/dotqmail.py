"""A dot-qmail file parsed into typed instructions, as qmail-local reads it (qmail-semantics.md §3.3).

Pure: bytes in, a list of instructions out; nothing is executed, opened or checked here (the
forward-only rule, the blank-first-line failure and the order of execution belong to
:mod:`pqmail.local.deliver`). The file's bytes are kept as bytes, so 8-bit paths and addresses
pass through unchanged.

qmail's reading rules, reproduced here:

* a missing final LF is supplied; lines are split at LF;
* trailing spaces and tabs are removed from each line (leading whitespace is kept);
* qmail handles each line as a C string, so a NUL byte ends the line's value; a line that
  starts with NUL counts as blank. Whether a file line is a Maildir is decided by the last
  character of the whole (trimmed) line, as in qmail-local.c;
* the first character decides the type: ``#`` comment, ``|`` program, ``.`` or ``/`` mbox (or
  Maildir when the line ends in ``/``), ``&`` forward to the rest of the line, ``+list`` the
  forward-only flag, any other ``+`` line ignored, anything else a forward to the whole line.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Comment:
    lineno: int


@dataclass(frozen=True, slots=True)
class Blank:
    """An empty line: ignored, except as the first line (a temporary failure, #4.2.1)."""

    lineno: int


@dataclass(frozen=True, slots=True)
class Program:
    """``|command``: run by ``/bin/sh -c command`` in the home directory."""

    lineno: int
    command: bytes


@dataclass(frozen=True, slots=True)
class Mbox:
    """A line starting with ``.`` or ``/`` and not ending in ``/``: append to that mbox file."""

    lineno: int
    path: bytes


@dataclass(frozen=True, slots=True)
class Maildir:
    """A line starting with ``.`` or ``/`` and ending in ``/``: deliver into that Maildir."""

    lineno: int
    path: bytes


@dataclass(frozen=True, slots=True)
class Forward:
    """``&address`` or a bare address: forward the message there."""

    lineno: int
    address: bytes


@dataclass(frozen=True, slots=True)
class ForwardOnly:
    """``+list``: from here on, program, mbox and Maildir lines fail (#4.7.0)."""

    lineno: int


@dataclass(frozen=True, slots=True)
class Ignored:
    """Any other line starting with ``+``."""

    lineno: int
    text: bytes


Instruction = Comment | Blank | Program | Mbox | Maildir | Forward | ForwardOnly | Ignored


def parse_line(line: bytes, lineno: int) -> Instruction:
    """One line (without its LF) as qmail-local classifies it."""
    line = line.rstrip(b" \t")
    value = line.split(b"\0", 1)[0] if b"\0" in line else line
    if not value:
        return Blank(lineno)
    first = value[0]
    if first == 0x23:  # '#'
        return Comment(lineno)
    if first == 0x7C:  # '|'
        return Program(lineno, value[1:])
    if first in (0x2E, 0x2F):  # '.' '/'
        return Maildir(lineno, value) if line.endswith(b"/") else Mbox(lineno, value)
    if first == 0x2B:  # '+'
        return ForwardOnly(lineno) if value == b"+list" else Ignored(lineno, value)
    if first == 0x26:  # '&'
        return Forward(lineno, value[1:])
    return Forward(lineno, value)


def parse(data: bytes) -> list[Instruction]:
    """Every line of a dot-qmail file (or of defaultdelivery), in order."""
    if not data.endswith(b"\n"):
        data += b"\n"
    lines = data.split(b"\n")
    lines.pop()  # the empty piece after the final LF
    return [parse_line(line, n) for n, line in enumerate(lines, 1)]
