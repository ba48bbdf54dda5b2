"""qmail-inject's rules (pqmail inject) and the sendmail command line, pure and end to end."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from email.utils import getaddresses
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import run_pqmail
from pqmail import inject
from pqmail.cli import sendmail
from pqmail.errors import PermanentFailure
from pqmail.queue.store import Queue, make_queue

CONTROL = {"me": "mx.isp.test", "defaulthost": "mx", "defaultdomain": "isp.test",
           "plusdomain": "plus.test", "idhost": "id.isp.test"}
ENV = {"USER": "tester"}
WHEN = 1_700_000_000.0


def settings(env: dict[str, str] | None = None, **control: str | None) -> inject.Settings:
    return inject.settings_from({**ENV, **(env or {})}, {**CONTROL, **control})


def prep(text: str, args: tuple[str, ...] = (), strategy: str = "default", sender: str | None = None,
         env: dict[str, str] | None = None) -> tuple[str, inject.Prepared]:
    fields, _, _ = inject.read_header(io.BytesIO(text.encode()).readline)
    p = inject.prepare(fields, settings(env), sender=sender, args=list(args), strategy=strategy,
                       when=WHEN, pid=4242)
    return p.header.decode(), p


def names(header: str) -> list[str]:
    return [line.split(":", 1)[0] for line in header.splitlines() if line[:1] not in (" ", "\t")]


# ----------------------------------------------------------------------------- recipients

@pytest.mark.parametrize(("text", "args", "strategy", "rcpts"), [
    # -t: To, Cc and Bcc, plus the arguments (qmail-inject -H, as qmail's sendmail -t)
    ("To: a@x.test\nCc: b@x.test, c@x.test\nBcc: d@x.test\n\n", (), "both",
     ["a@x.test", "b@x.test", "c@x.test", "d@x.test"]),
    ("To: a@x.test\n\n", ("e@x.test",), "both", ["e@x.test", "a@x.test"]),
    ("Apparently-To: a@x.test\n\n", (), "both", ["a@x.test"]),
    # sendmail without -t: the arguments only
    ("To: a@x.test\n\n", ("e@x.test",), "args", ["e@x.test"]),
    # pqmail inject's default: the arguments if any, else the header
    ("To: a@x.test\n\n", ("e@x.test",), "default", ["e@x.test"]),
    ("To: a@x.test\nBcc: d@x.test\n\n", (), "default", ["a@x.test", "d@x.test"]),
    # a resent message goes to its Resent- recipients only
    ("To: a@x.test\nResent-To: r@x.test\nResent-Bcc: s@x.test\n\n", (), "both", ["r@x.test", "s@x.test"]),
    # lists, display names, groups, continuation lines
    ('To: "Doe, J" <jd@x.test>, Bob <bob@x.test>,\n  carol@x.test\n\n', (), "both",
     ["jd@x.test", "bob@x.test", "carol@x.test"]),
    ("To: friends: a@x.test, b@x.test;\nCc: undisclosed-recipients:;\n\n", (), "both",
     ["a@x.test", "b@x.test"]),
])
def test_recipients(text, args, strategy, rcpts):
    _, p = prep(text, args, strategy)
    assert p.recipients == rcpts


def test_bcc_is_removed_and_to_cc_kept_byte_for_byte():
    header, _ = prep("To: a@x.test\nCc:  b@x.test\nBcc: secret@x.test\nResent-Bcc: s@x.test\n"
                     "Subject: s\n\n", (), "both")
    assert "secret" not in header and "s@x.test" not in header
    assert "To: a@x.test\nCc:  b@x.test\nSubject: s\n" in header


def test_no_recipients_is_permanent():
    with pytest.raises(PermanentFailure, match="no recipients"):
        prep("Subject: x\n\n", (), "both")
    with pytest.raises(PermanentFailure, match="no recipients"):
        prep("To: a@x.test\n\n", (), "args")


@pytest.mark.parametrize("arg", ["", "a\nb@x.test", "a\0b", "<>", "a <b@x> <c@y>"])
def test_bad_recipient_arguments_are_permanent(arg):
    with pytest.raises(PermanentFailure, match="unable to parse"):
        prep("Subject: x\n\n", (arg,), "args")


# ----------------------------------------------------------------------------- added fields

def test_date_message_id_from_and_cc_are_added_when_missing():
    header, p = prep("Subject: s\n\nbody\n", ("a@x.test",), env={"NAME": "Te Ster"})
    lines = header.splitlines()
    assert names(header) == ["Date", "Message-ID", "From", "Cc", "Subject"]
    assert re.fullmatch(r"Date: (Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{1,2} [A-Z][a-z]{2} \d{4} "
                        r"\d\d:\d\d:\d\d [+-]\d{4}", lines[0])
    assert re.fullmatch(r"Message-ID: <\d{14}\.4242\.\d+@id\.isp\.test>", lines[1])
    assert lines[2] == 'From: "Te Ster" <tester@mx.isp.test>'
    assert lines[3] == "Cc: recipient list not shown: ;"
    assert p.sender == "tester@mx.isp.test"


def test_existing_fields_are_kept():
    text = ("Date: Mon, 1 Jan 2024 00:00:00 +0000\nMessage-ID: <x@y>\nFrom: me@x.test\n"
            "To: a@x.test\n\n")
    header, _ = prep(text)
    assert header == text[:-1]


def test_resent_message_gets_resent_fields():
    header, _ = prep("From: a@x.test\nTo: b@x.test\nDate: d\nMessage-ID: <m@x>\n"
                     "Resent-Bcc: r@x.test\n\n", (), "both")
    assert names(header) == ["Resent-Date", "Resent-Message-ID", "Resent-From", "Resent-Cc",
                             "From", "To", "Date", "Message-ID"]
    assert "Resent-Cc: recipient list not shown: ;\n" in header


@pytest.mark.parametrize(("env", "from_line", "sender"), [
    ({}, "From: tester@mx.isp.test", "tester@mx.isp.test"),
    ({"LOGNAME": "x", "USER": "u"}, "From: u@mx.isp.test", "u@mx.isp.test"),
    ({"MAILUSER": "mu", "MAILHOST": "mh.test"}, "From: mu@mh.test", "mu@mh.test"),
    ({"QMAILUSER": "qu", "MAILUSER": "mu", "QMAILHOST": "qh", "MAILHOST": "mh.test"},
     "From: qu@qh.isp.test", "qu@qh.isp.test"),
    ({"QMAILSUSER": "bounces", "QMAILSHOST": "lists.test"}, "From: tester@mx.isp.test",
     "bounces@lists.test"),
    ({"MAILNAME": "M N", "NAME": "ignored"}, 'From: "M N" <tester@mx.isp.test>', "tester@mx.isp.test"),
    ({"NAME": "Te Ster", "QMAILINJECT": "c"}, "From: tester@mx.isp.test (Te Ster)", "tester@mx.isp.test"),
    ({"QMAILUSER": "john doe"}, 'From: "john doe"@mx.isp.test', "john doe@mx.isp.test"),
    ({"QMAILINJECT": "r"}, "From: tester@mx.isp.test", "tester-@mx.isp.test-@[]"),
    ({"QMAILINJECT": "m"}, "From: tester@mx.isp.test", "tester-1700000000.4242@mx.isp.test"),
])
def test_from_and_default_sender_from_the_environment(env, from_line, sender):
    header, p = prep("To: a@x.test\n\n", env=env)
    assert header.splitlines()[2] == from_line
    assert p.sender == sender


def test_settings_overrides_and_fallbacks():
    s = settings({"QMAILDEFAULTHOST": "dh", "QMAILDEFAULTDOMAIN": "dd.test", "QMAILPLUSDOMAIN": "pd.test",
                  "QMAILIDHOST": "ih.test"})
    assert (s.defaulthost, s.defaultdomain, s.plusdomain, s.idhost) == ("dh", "dd.test", "pd.test", "ih.test")
    s = settings(defaulthost=None, defaultdomain=None, plusdomain=None, idhost=None)
    assert (s.defaulthost, s.defaultdomain, s.plusdomain, s.idhost) == ("mx.isp.test",) * 4
    s = settings(me=None, defaulthost=None, defaultdomain=None, plusdomain=None, idhost=None)
    assert (s.defaulthost, s.idhost) == ("defaulthost", "idhost")  # qmail's placeholders
    s = inject.settings_from({}, CONTROL, lambda: "pwname")
    assert s.mailuser == "pwname"  # no user variable: the uid's login name
    assert inject.settings_from({}, CONTROL).mailuser == "anonymous"


# ----------------------------------------------------------------------------- qualification

@pytest.mark.parametrize(("addr", "qualified"), [
    ("joe", "joe@mx.isp.test"),            # defaulthost (itself without a dot: + defaultdomain)
    ("joe@host", "joe@host.isp.test"),     # defaultdomain
    ("joe@host+", "joe@host.plus.test"),   # plusdomain
    ("joe@x.test", "joe@x.test"),
    ("joe@[10.0.0.1]", "joe@[10.0.0.1]"),
])
def test_recipient_arguments_are_qualified(addr, qualified):
    _, p = prep("\n", (addr,))
    assert p.recipients == [qualified]


def test_environment_overrides_qualification():
    env = {"QMAILDEFAULTHOST": "other.test", "QMAILDEFAULTDOMAIN": "dom.test", "QMAILPLUSDOMAIN": "p.test"}
    _, p = prep("\n", ("joe", "x@h", "y@h+"), env=env)
    assert p.recipients == ["joe@other.test", "x@h.dom.test", "y@h.p.test"]


def test_header_addresses_are_qualified_and_rewritten_only_when_needed():
    header, p = prep('To: Joe <joe>, "Doe, J" <jd@host+>, ok@x.test\nCc: ok2@x.test (Friend)\n'
                     "From: root (Cron Daemon)\nReply-To: r\n\n", (), "both")
    assert 'To: Joe <joe@mx.isp.test>, "Doe, J" <jd@host.plus.test>, ok@x.test\n' in header
    assert "Cc: ok2@x.test (Friend)\n" in header  # nothing to qualify: untouched
    assert "From: Cron Daemon <root@mx.isp.test>\n" in header
    assert "Reply-To: r@mx.isp.test\n" in header
    assert p.recipients == ["joe@mx.isp.test", "jd@host.plus.test", "ok@x.test", "ok2@x.test"]


def test_a_long_rewritten_field_is_folded():
    to = ", ".join(f"user{i}" for i in range(8))
    header, p = prep(f"To: {to}\n\n", (), "both")
    assert header.startswith("Date:")
    assert "To: user0@mx.isp.test,\n  user1@mx.isp.test,\n" in header
    assert len(p.recipients) == 8


# ----------------------------------------------------------------------------- envelope sender

@pytest.mark.parametrize(("text", "sender", "env", "expected", "kept_return_path"), [
    ("Return-Path: <rp@x.test>\nTo: a@x.test\n\n", None, {}, "rp@x.test", False),
    ("Return-Path: <rp>\nTo: a@x.test\n\n", None, {}, "rp@mx.isp.test", False),
    ("Return-Path: <>\nTo: a@x.test\n\n", None, {}, "", False),
    ("Return-Path: <rp@x.test>\nTo: a@x.test\n\n", "f@x.test", {}, "f@x.test", False),
    ("Return-Path: <rp@x.test>\nTo: a@x.test\n\n", None, {"QMAILINJECT": "s"}, "tester@mx.isp.test", False),
    ("To: a@x.test\n\n", "", {}, "", False),
    ("To: a@x.test\n\n", "<>", {}, "", False),
    ("To: a@x.test\n\n", "<bob@x.test>", {}, "bob@x.test", False),
    ("To: a@x.test\n\n", "bob", {}, "bob@mx.isp.test", False),
])
def test_envelope_sender(text, sender, env, expected, kept_return_path):
    header, p = prep(text, sender=sender, env=env)
    assert p.sender == expected
    assert ("Return-Path" in header) == kept_return_path


@pytest.mark.parametrize(("flags", "dropped"), [("f", "From: old@x.test"), ("i", "Message-ID: <old@x>")])
def test_qmailinject_flags_replace_fields(flags, dropped):
    header, _ = prep("From: old@x.test\nMessage-ID: <old@x>\nTo: a@x.test\n\n", env={"QMAILINJECT": flags})
    assert dropped not in header
    assert names(header).count(dropped.split(":")[0]) == 1  # a new one was added


def test_content_length_is_removed():
    header, _ = prep("Content-Length: 12\nTo: a@x.test\n\n")
    assert "Content-Length" not in header


# ----------------------------------------------------------------------------- header and body syntax

@pytest.mark.parametrize(("data", "fields", "start", "eof"), [
    (b"A: 1\r\nB: 2\n\nbody", [b"A: 1\n", b"B: 2\n"], b"\n", False),
    (b"A: 1\n folded\n\tmore\nB: 2\n\n", [b"A: 1\n folded\n\tmore\n", b"B: 2\n"], b"\n", False),
    (b"From someone Mon Jan 1\nA: 1\n\n", [b"MBOX-Line: From someone Mon Jan 1\n", b"A: 1\n"], b"\n", False),
    (b"A: 1\nnot a header\nmore\n", [b"A: 1\n"], b"\nnot a header\n", False),
    (b"A: 1\nB: 2", [b"A: 1\n", b"B: 2\n"], b"", True),
    (b"", [], b"", True),
    (b"Name With Space: x\n", [], b"\nName With Space: x\n", False),
    (b"Subject : spaced\n\n", [b"Subject : spaced\n"], b"\n", False),
])
def test_read_header_is_qmails_headerbody(data, fields, start, eof):
    assert inject.read_header(io.BytesIO(data).readline) == (fields, start, eof)


def test_crlf_becomes_lf_across_block_boundaries():
    lf = inject._LF()
    out = lf.feed(b"a\r") + lf.feed(b"\nb\r\n\r") + lf.feed(b"\r\nc") + lf.end()
    assert out == b"a\nb\n\r\nc\n"
    lf = inject._LF()
    assert lf.feed(b"x\n") + lf.end() == b"x\n"


def test_field_names_ignore_case():
    header, p = prep("tO: a@x.test\nBCC: b@x.test\nDATE: x\n\n", (), "both")
    assert p.recipients == ["a@x.test", "b@x.test"]
    assert names(header) == ["Message-ID", "From", "tO", "DATE"]


# ----------------------------------------------------------------------------- address lists

@pytest.mark.parametrize(("value", "expected"), [
    ("joe", [("", "joe")]),
    ("root (Cron Daemon)", [("Cron Daemon", "root")]),
    ('"Doe, John" <jd@x>, bob', [("Doe, John", "jd@x"), ("", "bob")]),
    ("undisclosed-recipients:;", []),
    ("grp: a@b, c;, d", [("", "a@b"), ("", "c"), ("", "d")]),
    ("<@route1,@route2:c@d>", [("", "c@d")]),
    ("John Q. Public <jqp@x.y>", [("John Q. Public", "jqp@x.y")]),
    ('"john doe"@x', [("", '"john doe"@x')]),
    ("x@[1.2.3.4]", [("", "x@[1.2.3.4]")]),
    ('"a\\"b" <q@x>', [('a"b', "q@x")]),
    ("a.b@c (comment (nested))", [("comment (nested)", "a.b@c")]),
    ("=?utf-8?q?J=C3=BC?= <j@x>", [("=?utf-8?q?J=C3=BC?=", "j@x")]),
])
def test_parse_addresses(value, expected):
    assert inject.parse_addresses(value) == expected


_atom = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_+", min_size=1, max_size=8)
_dot_atom = st.lists(_atom, min_size=1, max_size=3).map(".".join)
_addr = st.tuples(_dot_atom, _dot_atom).map("@".join)
_name = st.one_of(
    st.just(""),
    st.lists(_atom, min_size=1, max_size=3).map(" ".join),
    st.text(alphabet="abc ,.;:@<>()", min_size=1, max_size=10).map(lambda s: '"' + s + '"'),
)


@given(st.lists(st.tuples(_name, _addr), min_size=1, max_size=5))
def test_parse_addresses_agrees_with_email_utils_getaddresses(mailboxes):
    value = ", ".join(f"{n} <{a}>" if n else a for n, a in mailboxes)
    assert inject.parse_addresses(value) == getaddresses([value])


def test_unquote_address():
    assert inject.unquote_address('"john doe"@x') == "john doe@x"
    assert inject.unquote_address('"a\\"b"@x') == 'a"b@x'
    assert inject.unquote_address("plain@x") == "plain@x"


# ----------------------------------------------------------------------------- sendmail's command line

@pytest.mark.parametrize(("argv", "header", "sender", "name", "mode", "rcpts"), [
    (["-t", "-i"], True, None, None, "m", []),
    (["-oi", "-odb", "-oem", "-f", "a@x", "--", "r@y"], False, "a@x", None, "m", ["r@y"]),
    (["-fa@x", "-FFull Name", "r@y"], False, "a@x", "Full Name", "m", ["r@y"]),
    (["-r", "a@x", "-F", "N", "r@y", "s@y"], False, "a@x", "N", "m", ["r@y", "s@y"]),
    (["-ti", "-B8BITMIME", "-N", "never", "-R", "hdrs", "-V", "env", "-O", "x=y", "-v"],
     True, None, None, "m", []),
    (["r@y", "-f", "a@x"], False, "a@x", None, "m", ["r@y"]),    # options after recipients
    (["-bm", "-odi", "-Am", "-q"], False, None, None, "q", []),
    (["-bp"], False, None, None, "p", []),
    (["-E", "-J", "r@y"], False, None, None, "m", ["r@y"]),
    (["--", "-odd@x"], False, None, None, "m", ["-odd@x"]),
])
def test_sendmail_options(argv, header, sender, name, mode, rcpts):
    a = sendmail.parse_args(argv)
    assert (a.header, a.sender, a.fullname, a.mode, a.recipients) == (header, sender, name, mode, rcpts)


@pytest.mark.parametrize(("argv", "match"), [
    (["-bs"], "SMTP on standard input"),
    (["-bi"], "newaliases"),
    (["-bz"], "unsupported mode"),
    (["-Z"], "unknown option -Z"),
    (["-f"], "needs an argument"),
])
def test_sendmail_refuses(argv, match):
    with pytest.raises(sendmail.Usage, match=match):
        sendmail.parse_args(argv)


def test_sendmail_f_names_the_from_user_and_host():
    env = sendmail.inject_env({"NAME": "Real", "MAILHOST": "h", "USER": "u"}, "bob@site.test", None)
    assert (env["QMAILUSER"], env["QMAILHOST"], "NAME" in env, "MAILHOST" in env) == \
        ("bob", "site.test", False, False)
    env = sendmail.inject_env({"NAME": "Real"}, "bob", "Given")
    assert (env["QMAILUSER"], "QMAILHOST" in env, env["QMAILNAME"]) == ("bob", False, "Given")


# ----------------------------------------------------------------------------- end to end

@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "control").mkdir(parents=True)
    (r / "control" / "me").write_text("mx.isp.test\n")
    (r / "control" / "idhost").write_text("id.isp.test\n")
    make_queue(r / "queue")
    return r


def run_sendmail(*args: str, input: bytes, env: dict[str, str]) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "pqmail.cli.sendmail", *args], input=input,
                       capture_output=True, env={**os.environ, **env}, timeout=60)
    assert b"Traceback" not in p.stderr, p.stderr.decode()
    return p


def queued(root: Path) -> list[tuple[str, list[str], bytes]]:
    q = Queue(root / "queue")
    out = []
    for mid in q.list_todo():
        env = q.read_todo(mid)
        out.append((env.sender, env.recipients, q.message_path(mid).read_bytes()))
    return out


def test_pqmail_inject_queues_the_message(root: Path):
    msg = b"Subject: hello\r\nTo: joe\r\n\r\nline 1\r\nline 2"
    p = run_pqmail("inject", "-f", "alice", "--root", str(root), "joe", "bob@x.test", input=msg,
                   env={"USER": "tester"})
    assert p.stdout == p.stderr == b""
    [(sender, rcpts, data)] = queued(root)
    assert (sender, rcpts) == ("alice@mx.isp.test", ["joe@mx.isp.test", "bob@x.test"])
    lines = data.split(b"\n")
    assert re.fullmatch(rb"Received: \(qmail \d+ invoked by uid \d+\); .* -0000", lines[0])
    assert [ln.split(b":")[0] for ln in lines[1:6]] == [b"Date", b"Message-ID", b"From", b"Subject", b"To"]
    assert lines[2].endswith(b"@id.isp.test>")
    assert lines[3] == b"From: tester@mx.isp.test"
    assert lines[5] == b"To: joe@mx.isp.test"
    assert data.endswith(b"\n\nline 1\nline 2\n")  # CRLF -> LF, final LF added


def test_pqmail_inject_uses_pqmail_root_and_env_overrides(root: Path):
    run_pqmail("inject", "-t", input=b"To: a, b@h+\n\n", env={
        "PQMAIL_ROOT": str(root), "QMAILDEFAULTHOST": "dh.test", "QMAILPLUSDOMAIN": "pd.test"})
    [(_, rcpts, _)] = queued(root)
    assert rcpts == ["a@dh.test", "b@h.pd.test"]


def test_pqmail_inject_n_prints_instead_of_queueing(root: Path):
    p = run_pqmail("inject", "-n", "-f", "s@x.test", "--root", str(root), "r@x.test",
                   input=b"Subject: s\n\nb\n")
    assert p.stdout.startswith(b"Return-Path: <s@x.test>\nDate: ")
    assert p.stdout.endswith(b"Subject: s\n\nb\n")
    assert queued(root) == []


def test_sendmail_t_queues_to_header_recipients_without_bcc(root: Path):
    msg = b"From: App <app@site.test>\nTo: a@x.test\nCc: b@x.test\nBcc: hidden@x.test\nSubject: s\n\nbody\n"
    p = run_sendmail("-t", "-i", "-oi", "-odb", "-oem", "-f", "bounces@site.test", input=msg,
                     env={"PQMAIL_ROOT": str(root)})
    assert p.returncode == 0, p.stderr
    [(sender, rcpts, data)] = queued(root)
    assert sender == "bounces@site.test"
    assert rcpts == ["a@x.test", "b@x.test", "hidden@x.test"]
    assert b"hidden" not in data
    assert b"\nFrom: App <app@site.test>\n" in data


def test_sendmail_f_becomes_the_default_from(root: Path):
    p = run_sendmail("-f", "cron@host.test", "-F", "Cron Daemon", "root", input=b"Subject: s\n\nb\n",
                     env={"PQMAIL_ROOT": str(root)})
    assert p.returncode == 0, p.stderr
    [(sender, rcpts, data)] = queued(root)
    assert (sender, rcpts) == ("cron@host.test", ["root@mx.isp.test"])
    assert b'\nFrom: "Cron Daemon" <cron@host.test>\n' in data


def test_sendmail_bp_lists_the_queue(root: Path):
    run_sendmail("-f", "s@x.test", "r@y.test", input=b"x\n", env={"PQMAIL_ROOT": str(root)})
    p = run_sendmail("-bp", input=b"", env={"PQMAIL_ROOT": str(root)})
    assert p.returncode == 0
    lines = p.stdout.decode().splitlines()
    assert re.fullmatch(r"\d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d GMT  #\d+  \d+  <s@x\.test> ", lines[0])
    assert lines[1] == "\ttodo\tr@y.test"


def _one_line(p: subprocess.CompletedProcess) -> str:
    text = p.stderr.decode()
    assert len(text.strip().splitlines()) == 1, text
    return text


@pytest.mark.parametrize(("args", "code", "match"), [
    (("x" * 1100 + "@x.test",), 100, "longer than 1002"),
    (("a\nb@x.test",), 100, "unable to parse"),
    ((), 100, "no recipients"),
])
def test_pqmail_inject_exit_codes(root: Path, args, code, match):
    p = run_pqmail("inject", "--root", str(root), *args, input=b"Subject: s\n\n", check=False)
    assert p.returncode == code
    assert match in _one_line(p)
    assert queued(root) == []


def test_pqmail_inject_bad_option_is_a_usage_error(root: Path):
    p = run_pqmail("inject", "--root", str(root), "--bogus", input=b"x\n", check=False)
    assert p.returncode == 100 and b"No such option '--bogus'" in p.stderr  # click's usage message
    assert queued(root) == []


@pytest.mark.parametrize(("args", "code", "match"), [
    (("x" * 1100 + "@x.test",), 100, "longer than 1002"),
    ((), 100, "no recipients"),
    (("-Z", "r@x.test"), 100, "unknown option"),
    (("-bs",), 100, "pqmail smtpd"),
])
def test_sendmail_exit_codes(root: Path, args, code, match):
    p = run_sendmail(*args, input=b"Subject: s\n\n", env={"PQMAIL_ROOT": str(root)})
    assert p.returncode == code
    assert match in _one_line(p)
    assert queued(root) == []


def test_temporary_failures_exit_111(root: Path, tmp_path: Path):
    bare = tmp_path / "bare"  # no queue at all
    (bare / "control").mkdir(parents=True)
    p = run_pqmail("inject", "--root", str(bare), "r@x.test", input=b"x\n", check=False)
    assert p.returncode == 111 and "no queue" in _one_line(p)
    p = run_sendmail("r@x.test", input=b"x\n", env={"PQMAIL_ROOT": str(bare)})
    assert p.returncode == 111 and "no queue" in _one_line(p)

    os.rmdir(root / "queue" / "intd")  # the queue cannot take the message (like a full disk)
    for p in (run_pqmail("inject", "--root", str(root), "r@x.test", input=b"x\n", check=False),
              run_sendmail("r@x.test", input=b"x\n", env={"PQMAIL_ROOT": str(root)})):
        assert p.returncode == 111 and "unable to queue" in _one_line(p)
    assert [f for f in (root / "queue" / "mess").rglob("*") if f.is_file()] == []  # rolled back

    (root / "control" / "me").unlink()
    (root / "control" / "me").mkdir()  # unreadable control file
    p = run_sendmail("r@x.test", input=b"x\n", env={"PQMAIL_ROOT": str(root)})
    assert p.returncode == 111 and "unable to read controls" in _one_line(p)


def test_a_large_message_is_streamed_whole(root: Path):
    body = b"".join(b"line %07d\r\n" % i for i in range(100_000))  # 1.2 MB, more than PREREAD
    p = run_sendmail("r@x.test", input=b"Subject: big\r\n\r\n" + body, env={"PQMAIL_ROOT": str(root)})
    assert p.returncode == 0, p.stderr
    [(_, _, data)] = queued(root)
    assert data.endswith(b"\n\n" + body.replace(b"\r\n", b"\n"))


@pytest.mark.parametrize("arg", ["bad address<@", "@", "<@>"])
def test_recipient_that_qualifies_to_nothing_is_refused(root: Path, arg: str) -> None:
    """An argument that is no address must not be queued as the empty (trash) recipient."""
    p = run_pqmail("inject", "--root", str(root), arg, input=b"Subject: s\n\n", check=False)
    assert p.returncode == 100 and b"unable to parse address" in p.stderr
    assert queued(root) == []
