"""qmail's case rule: lookups ignore ASCII case only (case_lowerb, constmap); other bytes stay as they are.

Python's ``str.lower()`` would also fold latin-1 letters (``Ä`` -> ``ä``) and so match names qmail
does not; every key pqmail stores or looks up goes through :func:`ascii_lower` instead. It maps one
character to one, so positions in the lowered text match the original.
"""

from __future__ import annotations

_ASCII_UPPER_TO_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def ascii_lower(text: str) -> str:
    """``text`` with A-Z turned into a-z and nothing else changed."""
    return text.translate(_ASCII_UPPER_TO_LOWER)
