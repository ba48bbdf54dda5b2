"""QSBMF bounce messages, as qmail-send writes them (qmail-send.c ``addbounce``/``injectbounce``).

Pure functions: build a recipient paragraph, decide who a bounce goes to, and compose the bounce
message. The queue manager stores the paragraphs durably and injects the result.
"""

from __future__ import annotations

from dataclasses import dataclass

from pqmail.addresses import date822 as date822  # re-exported: bounces and the queue share it

DOUBLE_BOUNCE_SENDER = "#@[]"
TOO_LONG = "I'm not going to try again; this message has been in the queue too long."


def paragraph(recipient: str, report: str) -> bytes:
    """One recipient paragraph: ``<rcpt>:``, the report (blank lines joined with ``/``), a blank line."""
    out: list[str] = []
    prev = ""
    for ch in report.replace("\r", ""):
        out.append("/" if ch == "\n" and prev == "\n" else ch)  # a blank line's LF becomes "/"
        prev = ch
    text = "".join(out)
    if not text.endswith("\n"):
        text += "\n"
    return f"<{recipient}>:\n{text}\n".encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class BounceTarget:
    """Envelope of a bounce: ``None`` recipient means discard (triple bounce)."""

    sender: str
    recipient: str | None
    double: bool


def bounce_target(original_sender: str, doublebounceto: str, doublebouncehost: str) -> BounceTarget:
    """Who a bounce of a message from ``original_sender`` goes to (qmail-semantics.md §4.5)."""
    if original_sender == DOUBLE_BOUNCE_SENDER:
        return BounceTarget(sender="", recipient=None, double=True)
    if original_sender == "":
        return BounceTarget(sender=DOUBLE_BOUNCE_SENDER,
                            recipient=f"{doublebounceto}@{doublebouncehost}", double=True)
    recipient = original_sender
    if recipient.endswith("-@[]"):  # a VERP request: bounce to pre@host
        recipient = recipient[: -len("-@[]")]
    return BounceTarget(sender="", recipient=recipient, double=False)


def compose(
    *,
    target: BounceTarget,
    original_sender: str,
    paragraphs: bytes,
    message: bytes,
    bouncefrom: str,
    bouncehost: str,
    when: float | None = None,
    program: str = "qmail-send",
) -> bytes:
    """The whole bounce message in QSBMF, LF line ends, with the original message attached.

    ``program`` names the sender in the intro line (serialmail's bounces say ``maildirbounce``).
    """
    head = (
        f"Date: {date822(when)}\n"
        f"From: {bouncefrom}@{bouncehost}\n"
        f"To: {target.recipient}\n"
        "Subject: failure notice\n"
        "\n"
        f"Hi. This is the {program} program at {bouncehost}.\n"
    )
    if target.double:
        head += "I tried to deliver a bounce message to this address, but the bounce bounced!\n\n"
        tail = "--- Below this line is the original bounce.\n\n"
    else:
        head += ("I'm afraid I wasn't able to deliver your message to the following addresses.\n"
                 "This is a permanent error; I've given up. Sorry it didn't work out.\n\n")
        tail = "--- Below this line is a copy of the message.\n\n"
    return (head.encode("utf-8", "surrogateescape") + paragraphs + tail.encode()
            + f"Return-Path: <{original_sender}>\n".encode("utf-8", "surrogateescape") + message)
