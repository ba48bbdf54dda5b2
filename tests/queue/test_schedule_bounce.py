"""qmail-send's retry schedule and QSBMF bounce composition."""

from __future__ import annotations

import pytest

from pqmail.queue import bounce, schedule


@pytest.mark.parametrize(("channel", "k", "offset"), [
    ("local", 1, 100), ("local", 2, 400), ("local", 3, 900), ("local", 10, 10000), ("local", 77, 592900),
    ("remote", 1, 400), ("remote", 2, 1600), ("remote", 3, 3600), ("remote", 38, 577600),
])
def test_on_time_attempts_fall_on_squares(channel, k, offset):
    birth = 1_000_000.0
    t = birth
    for _ in range(k):
        t = schedule.next_retry(birth, t, channel)
    assert t - birth == offset


def test_first_retry_is_immediate_age_based():
    assert schedule.next_retry(0, 0, "local") == 100
    assert schedule.next_retry(0, 99, "local") == (9 + 10) ** 2
    assert schedule.next_retry(100, 50, "local") == 200  # clock went back: age counts as 0


def test_expiry_is_strictly_after_lifetime():
    assert not schedule.expired(0, 604800, 604800)
    assert schedule.expired(0, 604801, 604800)


def test_date822_is_qmails_format():
    assert bounce.date822(0) == "1 Jan 1970 00:00:00 -0000"
    assert bounce.date822(1669294862) == "24 Nov 2022 13:01:02 -0000"


@pytest.mark.parametrize(("report", "expected"), [
    ("Sorry. (#5.1.1)", b"<a@b>:\nSorry. (#5.1.1)\n\n"),
    ("line1\nline2\n", b"<a@b>:\nline1\nline2\n\n"),
    ("para1\n\npara2", b"<a@b>:\npara1\n/para2\n\n"),
    ("a\n\n\nb", b"<a@b>:\na\n//b\n\n"),
])
def test_paragraph_keeps_one_paragraph_per_recipient(report, expected):
    assert bounce.paragraph("a@b", report) == expected


@pytest.mark.parametrize(("sender", "rcpt", "bsender", "double"), [
    ("joe@example.com", "joe@example.com", "", False),
    ("list-owner@ex.org-@[]", "list-owner@ex.org", "", False),
    ("", "postmaster@me.test", "#@[]", True),
    ("#@[]", None, "", True),
])
def test_bounce_targets(sender, rcpt, bsender, double):
    t = bounce.bounce_target(sender, "postmaster", "me.test")
    assert (t.recipient, t.sender, t.double) == (rcpt, bsender, double)


def test_compose_is_qsbmf():
    t = bounce.bounce_target("joe@example.com", "postmaster", "me.test")
    msg = bounce.compose(target=t, original_sender="joe@example.com",
                         paragraphs=bounce.paragraph("x@y", "No. (#5.1.1)"), message=b"Subject: s\n\nbody\n",
                         bouncefrom="MAILER-DAEMON", bouncehost="me.test", when=0)
    assert msg == (b"Date: 1 Jan 1970 00:00:00 -0000\nFrom: MAILER-DAEMON@me.test\nTo: joe@example.com\n"
                   b"Subject: failure notice\n\nHi. This is the qmail-send program at me.test.\n"
                   b"I'm afraid I wasn't able to deliver your message to the following addresses.\n"
                   b"This is a permanent error; I've given up. Sorry it didn't work out.\n\n"
                   b"<x@y>:\nNo. (#5.1.1)\n\n--- Below this line is a copy of the message.\n\n"
                   b"Return-Path: <joe@example.com>\nSubject: s\n\nbody\n")
