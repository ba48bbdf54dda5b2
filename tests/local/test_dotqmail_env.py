"""Pure parts of qmail-local: dot-qmail line parsing, header lines, quoting, dates, HOST/EXT splits."""

from __future__ import annotations

import calendar
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pqmail.local import dotqmail as dq
from pqmail.local import env

# ---------------------------------------------------------------------------- dot-qmail lines


@pytest.mark.parametrize(("line", "parsed"), [
    (b"# comment", dq.Comment(1)),
    (b"#", dq.Comment(1)),
    (b"|preline procmail", dq.Program(1, b"preline procmail")),
    (b"|  spaced  \t", dq.Program(1, b"  spaced")),
    (b"|", dq.Program(1, b"")),
    (b"./Maildir/", dq.Maildir(1, b"./Maildir/")),
    (b"/var/mail/joe/", dq.Maildir(1, b"/var/mail/joe/")),
    (b"./Mailbox", dq.Mbox(1, b"./Mailbox")),
    (b"/var/mail/joe", dq.Mbox(1, b"/var/mail/joe")),
    (b".", dq.Mbox(1, b".")),
    (b"./Maildir/ \t", dq.Maildir(1, b"./Maildir/")),
    (b"&joe@example.org", dq.Forward(1, b"joe@example.org")),
    (b"&", dq.Forward(1, b"")),
    (b"joe@example.org", dq.Forward(1, b"joe@example.org")),
    (b"joe", dq.Forward(1, b"joe")),
    (b" ./Maildir/", dq.Forward(1, b" ./Maildir/")),
    (b"+list", dq.ForwardOnly(1)),
    (b"+list  ", dq.ForwardOnly(1)),
    (b"+lists", dq.Ignored(1, b"+lists")),
    (b"+", dq.Ignored(1, b"+")),
    (b"", dq.Blank(1)),
    (b" \t ", dq.Blank(1)),
    (b"\0./Maildir/", dq.Blank(1)),
    (b"./Mailbox\0/", dq.Maildir(1, b"./Mailbox")),  # C string: value ends at NUL, type from the line end
    (b"|echo a\0b", dq.Program(1, b"echo a")),
    (b"+list\0x", dq.ForwardOnly(1)),
])
def test_parse_line(line, parsed):
    assert dq.parse_line(line, 1) == parsed


def test_parse_numbers_lines_and_supplies_the_final_newline():
    assert dq.parse(b"# c\n\n./Maildir/\n&a@b\n|x") == [
        dq.Comment(1), dq.Blank(2), dq.Maildir(3, b"./Maildir/"), dq.Forward(4, b"a@b"), dq.Program(5, b"x"),
    ]


def test_parse_empty_text_is_one_blank_line():
    assert dq.parse(b"") == [dq.Blank(1)]
    assert dq.parse(b"\n") == [dq.Blank(1)]


def test_crlf_lines_keep_their_cr():
    # qmail strips only spaces and tabs: a CR stays, so "./Maildir/\r" is an mbox named "./Maildir/\r".
    assert dq.parse(b"./Maildir/\r\n") == [dq.Mbox(1, b"./Maildir/\r")]


@given(st.binary(max_size=300))
def test_parse_never_fails_and_keeps_one_instruction_per_line(data):
    lines = dq.parse(data)
    expected = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    assert [x.lineno for x in lines] == list(range(1, expected + 1))


# ---------------------------------------------------------------------------- header lines


@pytest.mark.parametrize(("sender", "quoted"), [
    (b"", b""),
    (b"bob@example.org", b"bob@example.org"),
    (b"bob", b"bob"),
    (b"b b", b'"b b"'),
    (b"a b@x", b'"a b"@x'),
    (b"@x", b'""@x'),
    (b".a@x", b'".a"@x'),
    (b"a.@x", b'"a."@x'),
    (b"a..b@x", b'"a..b"@x'),
    (b"a.b@x", b"a.b@x"),
    (b'a"b@x', b'"a\\"b"@x'),
    (b"a\\b@x", b'"a\\\\b"@x'),
    (b"a\rb@x", b'"a\\\rb"@x'),
    (b"a(b)@x", b'"a(b)"@x'),
    (b"a,b;c:d<e>f[g]h@x", b'"a,b;c:d<e>f[g]h"@x'),
    (b"!#$%&'*+-/=?^_`{|}~@x", b"!#$%&'*+-/=?^_`{|}~@x"),
    (b"a\x7fb@x", b'"a\x7fb"@x'),
    (b"\xe4@x", b'"\xe4"@x'),
    (b"a@b@x y", b'"a@b"@x y'),
])
def test_quote2(sender, quoted):
    assert env.quote2(sender) == quoted


def test_rpline_and_dtline():
    assert env.rpline(b"") == b"Return-Path: <>\n"
    assert env.rpline(b"a\nb@x") == b'Return-Path: <"a\\_b"@x>\n'
    assert env.rpline(b"a@x\ny") == b"Return-Path: <a@x_y>\n"
    assert env.dtline(b"ex1-joe@example.com") == b"Delivered-To: ex1-joe@example.com\n"
    assert env.dtline(b"a\nb@c\n") == b"Delivered-To: a_b@c_\n"


@pytest.mark.parametrize(("when", "text"), [
    ("2022-11-24 13:01:02", b"Thu Nov 24 13:01:02 2022\n"),
    ("2024-02-29 00:00:00", b"Thu Feb 29 00:00:00 2024\n"),
    ("2001-01-01 09:05:07", b"Mon Jan 01 09:05:07 2001\n"),
    ("1999-12-31 23:59:59", b"Fri Dec 31 23:59:59 1999\n"),
])
def test_myctime_is_utc_with_zero_padded_day(when, text):
    t = calendar.timegm(time.strptime(when, "%Y-%m-%d %H:%M:%S"))
    assert env.myctime(t) == text
    assert env.myctime(t + 0.9) == text


@pytest.mark.parametrize(("sender", "line"), [
    (b"bob@example.org", b"From bob@example.org Thu Nov 24 13:01:02 2022\n"),
    (b"", b"From MAILER-DAEMON Thu Nov 24 13:01:02 2022\n"),
    (b"a b\tc\nd@x", b"From a-b-c-d@x Thu Nov 24 13:01:02 2022\n"),
    (b"#@[]", b"From #@[] Thu Nov 24 13:01:02 2022\n"),
])
def test_ufline(sender, line):
    assert env.ufline(sender, 1669294862) == line


@pytest.mark.parametrize(("host", "parts"), [
    (b"a.b.c.d", (b"a.b.c", b"a.b", b"a")),
    (b"mail.example.com", (b"mail.example", b"mail", b"mail")),
    (b"example.com", (b"example", b"example", b"example")),
    (b"localhost", (b"localhost", b"localhost", b"localhost")),
    (b"", (b"", b"", b"")),
    (b"a.", (b"a", b"a", b"a")),
    (b".a", (b"", b"", b"")),
    (b"[1.2.3.4]", (b"[1.2.3", b"[1.2", b"[1")),
])
def test_host_parts(host, parts):
    assert env.host_parts(host) == parts


@pytest.mark.parametrize(("ext", "parts"), [
    (b"a-b-c-d-e", (b"b-c-d-e", b"c-d-e", b"d-e")),
    (b"a-b", (b"b", b"", b"")),
    (b"plain", (b"", b"", b"")),
    (b"", (b"", b"", b"")),
    (b"-a", (b"a", b"", b"")),
    (b"a--b", (b"-b", b"b", b"")),
    (b"a-", (b"", b"", b"")),
])
def test_ext_parts(ext, parts):
    assert env.ext_parts(ext) == parts


def test_program_env_sets_everything_and_drops_inherited_default():
    e = env.program_env(
        {b"PATH": b"/bin", b"DEFAULT": b"old", b"SENDER": b"old"}, sender=b"s@x", newsender=b"n@x",
        local=b"pre-a-b", host=b"mx.example.com", user=b"u", home=b"/h", ext=b"a-b", default=None,
        dtline=b"D\n", rpline=b"R\n", ufline=b"U\n",
    )
    assert e == {
        b"PATH": b"/bin", b"SENDER": b"s@x", b"NEWSENDER": b"n@x", b"RECIPIENT": b"pre-a-b@mx.example.com",
        b"USER": b"u", b"HOME": b"/h", b"HOST": b"mx.example.com", b"HOST2": b"mx.example",
        b"HOST3": b"mx", b"HOST4": b"mx", b"LOCAL": b"pre-a-b", b"EXT": b"a-b", b"EXT2": b"b",
        b"EXT3": b"", b"EXT4": b"", b"DTLINE": b"D\n", b"RPLINE": b"R\n", b"UFLINE": b"U\n",
    }


def test_program_env_default_and_nul_bytes():
    e = env.program_env({}, sender=b"a\0b", newsender=b"", local=b"l", host=b"h", user=b"u", home=b"/h",
                        ext=b"", default=b"", dtline=b"", rpline=b"", ufline=b"")
    assert (e[b"DEFAULT"], e[b"SENDER"]) == (b"", b"a")


@pytest.mark.parametrize(("text", "data"), [
    ("joe@example.com", b"joe@example.com"),
    ("j\xf6rg", b"j\xf6rg"),
    ("\udcff", b"\xff"),
    ("\u20ac", "\u20ac".encode()),
])
def test_to_bytes_round_trips_latin1_and_surrogateescape(text, data):
    assert env.to_bytes(text) == data


@pytest.mark.parametrize("data", [b"joe@example.com", b"j\xf6rg@x", "j\u00f6rg@x".encode(), b"\xff\xfe"])
def test_addresses_round_trip_the_queue_text(data):
    assert env.addr_bytes(env.addr_text(data)) == data
