"""qmail-smtpd's policy (pqmail.smtp.policy): addrparse, relay decisions, DATA decoding, Received."""

from __future__ import annotations

import calendar
import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pqmail.config.control import load_control
from pqmail.errors import ConfigError
from pqmail.paths import Root
from pqmail.smtp import policy as pol
from pqmail.smtp.policy import DataDecoder, addrparse, check_rcpt, load_policy, received_line

# ----------------------------------------------------------------------------- addrparse

LOCAL_IPS = frozenset({"0.0.0.0", "127.0.0.1", "192.0.2.25", "2001:db8::25"})


@pytest.mark.parametrize(("arg", "expected"), [
    ("FROM:<joe@example.com>", "joe@example.com"),
    ("from:<joe@example.com> SIZE=100 BODY=8BITMIME", "joe@example.com"),
    ("TO:<>", ""),
    ("FROM: <joe@example.com>", "joe@example.com"),
    ("anything <joe@example.com> whatever", "joe@example.com"),  # qmail does not check FROM:/TO:
    ("FROM:joe@example.com", "joe@example.com"),  # no <: text after ':' up to a space
    ("FROM:   joe@example.com SIZE=1", "joe@example.com"),
    ("FROM joe@example.com", ""),  # neither < nor ':': empty, as qmail
    ("TO:<@a.example,@b.example:joe@example.com>", "joe@example.com"),  # source route dropped
    ("TO:<@a.example:joe@other.test>", "joe@other.test"),
    ("TO:<@only.route>", ""),  # a route without ':' eats everything
    ('TO:<"joe smith"@example.com>', "joe smith@example.com"),
    ('TO:<"user@other"@example.com>', "user@other@example.com"),
    ("TO:<joe\\@other@example.com>", "joe@other@example.com"),
    ('TO:<"a>b"@example.com>', "a>b@example.com"),  # a quoted > does not end the address
    ("TO:<a\\>b@example.com>", "a>b@example.com"),
    ("TO:<joe@example.com", "joe@example.com"),  # no > at all: qmail does not bother
    ("TO:<joe@[192.0.2.25]>", "joe@mx.isp.test"),  # this host's IP -> localiphost
    ("TO:<joe@[0.0.0.0]>", "joe@mx.isp.test"),
    ("TO:<joe@[IPv6:2001:db8::25]>", "joe@mx.isp.test"),
    ("TO:<joe@[1.2.3.4]>", "joe@[1.2.3.4]"),  # not ours: left as it is
    ("TO:<joe@[192.0.2.25]x>", "joe@[192.0.2.25]x"),
    ("TO:<joe@[999.1.1.1]>", "joe@[999.1.1.1]"),
    ("TO:<j\u00f6e@example.com>", "j\u00f6e@example.com"),  # 8-bit clean
])
def test_addrparse(arg, expected):
    assert addrparse(arg, LOCAL_IPS, "mx.isp.test") == expected


def test_addrparse_localiphost_off_without_localiphost():
    assert addrparse("TO:<joe@[192.0.2.25]>", LOCAL_IPS, None) == "joe@[192.0.2.25]"


@pytest.mark.parametrize("arg", [
    "TO:<jo\x00e@example.com>", "TO:<joe\r@example.com>", "TO:<jo\te@example.com>", "TO:<jo\x7fe@x>",
])
def test_addrparse_refuses_control_characters(arg):
    assert addrparse(arg) is None


def test_addrparse_length_limit_is_qmails():
    # qmail: addr.len, which counts the terminating NUL, must not exceed 900
    ok = "a" * 887 + "@example.com"  # 899 bytes
    assert addrparse(f"TO:<{ok}>") == ok
    assert addrparse(f"TO:<a{ok}>") is None  # 900 bytes
    assert addrparse("TO:<" + "\u00e9" * 450 + ">") is None  # counted in bytes, not characters


@settings(max_examples=500)
@given(st.text())
def test_addrparse_never_raises(arg):
    out = addrparse(arg, LOCAL_IPS, "mx.isp.test")
    assert out is None or (len(out.encode("utf-8", "surrogateescape")) < 900
                           and not any(ord(c) < 32 or ord(c) == 127 for c in out))


@given(st.binary())
def test_addrparse_never_raises_on_bytes(raw):
    addrparse(raw.decode("utf-8", "surrogateescape"), LOCAL_IPS, "mx.isp.test")


# ----------------------------------------------------------------------------- relay decisions

def make_root(tmp_path: Path, files: dict[str, str]) -> Root:
    control = tmp_path / "control"
    control.mkdir(exist_ok=True)
    base = {"me": "mx.isp.test\n", "rcpthosts": "mx.isp.test\nexample.com\n.example.com\n"}
    base.update(files)
    for name, content in base.items():
        (control / name).write_text(content, "latin-1")
    return Root(tmp_path)


@pytest.fixture
def policy(tmp_path):
    return load_policy(make_root(tmp_path, {}))


NOGATEWAY = pol.R_NOGATEWAY


@pytest.mark.parametrize(("rcpt", "expected"), [
    ("joe@example.com", None),
    ("joe@EXAMPLE.COM", None),  # case is ignored
    ("JOE@Sub.Example.Com", None),  # .example.com covers subdomains
    ("joe@mx.isp.test", None),
    ("postmaster", None),  # RFC 5321: always
    ("PostMaster", None),
    ("joe", None),  # no @: judged as joe@envnoathost (= me)
    ("user%other.test@example.com", None),  # percenthack off: mail for example.com
    # every relay trick:
    ("joe@other.test", NOGATEWAY),
    ("JOE@OTHER.TEST", NOGATEWAY),
    ("joe@notexample.com", NOGATEWAY),  # a suffix only at a dot
    ("joe@example.com.other.test", NOGATEWAY),
    ("joe@other.test.", NOGATEWAY),  # a trailing dot is never stripped
    ("joe@example.com.", NOGATEWAY),  # ... not even for our own domains (qmail)
    ("joe@[1.2.3.4]", NOGATEWAY),  # an IP literal that is not ours
    ("user@other.test@example.com", pol.R_FORM),  # what "user@other"@example.com parses to
    ("other.test!user@example.com", pol.R_FORM),  # bang path
    ("a!b!user@example.com", pol.R_FORM),
    ("user@other%x.example.com", pol.R_BADDOMAIN),
    ("user@.example.com", pol.R_BADDOMAIN),
    ("user@example..com", pol.R_BADDOMAIN),
    ("user@", pol.R_BADDOMAIN),
    ("", pol.R_SYNTAX),
])
def test_relay_decision_for_a_stranger(policy, rcpt, expected):
    assert check_rcpt(policy, "alice@remote.test", rcpt, may_relay=False, accepted=0) == expected


@pytest.mark.parametrize("rcpt", ["joe@other.test", "JOE@OTHER.TEST", "joe@[1.2.3.4]", "joe@other.test."])
def test_a_client_that_may_relay_skips_rcpthosts(policy, rcpt):
    assert check_rcpt(policy, "alice@remote.test", rcpt, may_relay=True, accepted=0) is None


@pytest.mark.parametrize("rcpt", ["user@other.test@example.com", "other!user@example.com",
                                  "user@bad%domain"])
def test_forms_are_refused_even_when_relaying(policy, rcpt):
    assert check_rcpt(policy, "alice@remote.test", rcpt, may_relay=True, accepted=0) is not None


def test_percent_hack_when_configured_judges_the_final_domain(tmp_path):
    root = make_root(tmp_path, {"percenthack": "example.com\n"})
    p = load_policy(root)
    assert check_rcpt(p, "a@b.test", "user%other.test@example.com", False, 0) == NOGATEWAY
    assert check_rcpt(p, "a@b.test", "user%x.example.com@example.com", False, 0) is None
    assert check_rcpt(p, "a@b.test", "user%other.test@example.com", True, 0) is None


def test_no_rcpthosts_refuses_everything(tmp_path):
    root = make_root(tmp_path, {})
    (root.control / "rcpthosts").unlink()
    p = load_policy(root)
    assert check_rcpt(p, "a@b.test", "joe@example.com", False, 0) == NOGATEWAY
    assert check_rcpt(p, "a@b.test", "postmaster", False, 0) is None


def test_envnoathost_not_ours_is_not_relayed(tmp_path):
    p = load_policy(make_root(tmp_path, {"envnoathost": "elsewhere.test\n"}))
    assert check_rcpt(p, "a@b.test", "joe", False, 0) == NOGATEWAY


def test_morercpthosts_cdb(tmp_path):
    import cdbx

    root = make_root(tmp_path, {"morercpthosts": "more.test\n"})
    maker = cdbx.CDB.make(str(root.control / "morercpthosts.cdb"))
    maker.add(b"more.test", b"")
    maker.add(b".more.test", b"")
    maker.commit().close()
    p = load_policy(root)
    assert check_rcpt(p, "a@b.test", "x@more.test", False, 0) is None
    assert check_rcpt(p, "a@b.test", "x@a.more.test", False, 0) is None
    assert check_rcpt(p, "a@b.test", "x@notmore.test", False, 0) == NOGATEWAY


def test_badmailfrom_is_answered_at_rcpt(tmp_path):
    p = load_policy(make_root(tmp_path, {"badmailfrom": "spammer@bad.test\n@worse.test\n"}))
    for sender in ("spammer@bad.test", "SPAMMER@BAD.TEST", "anyone@worse.test"):
        assert check_rcpt(p, sender, "joe@example.com", True, 0) == pol.R_BADMAILFROM
    assert check_rcpt(p, "other@bad.test", "joe@example.com", False, 0) is None
    assert check_rcpt(p, "", "joe@example.com", False, 0) is None


def test_badrcptto_matches_like_badmailfrom(tmp_path):
    p = load_policy(make_root(tmp_path, {"badrcptto": "# comment\nbob@example.com\n@sub.example.com\n"}))
    assert check_rcpt(p, "a@b.test", "BOB@example.com", False, 0) == pol.R_BADRCPTTO
    assert check_rcpt(p, "a@b.test", "x@sub.example.com", False, 0) == pol.R_BADRCPTTO
    assert check_rcpt(p, "a@b.test", "x@a.sub.example.com", False, 0) is None
    assert check_rcpt(p, "a@b.test", "joe@example.com", False, 0) is None


def test_maxrcpt(tmp_path):
    p = load_policy(make_root(tmp_path, {"maxrcpt": "3\n"}))
    assert check_rcpt(p, "a@b.test", "joe@example.com", False, 2) is None
    assert check_rcpt(p, "a@b.test", "joe@example.com", False, 3) == pol.R_TOOMANYRCPT
    assert pol.R_TOOMANYRCPT.startswith("452 ")
    assert load_policy(make_root(tmp_path, {"maxrcpt": "junk\n"})).maxrcpt == 100


@pytest.mark.parametrize(("ip", "expected"), [
    ("192.168.1.7", True), ("192.168.2.1", False), ("10.0.0.5", True), ("10.0.0.6", False),
    ("::ffff:10.0.0.5", True), ("2001:db8:1::9", True), ("2001:db8:2::9", False), ("unknown", False),
    ("", False), (None, False),
])
def test_relayclients(tmp_path, ip, expected):
    p = load_policy(make_root(tmp_path, {
        "relayclients": "# office\n192.168.1.0/24\n10.0.0.5\n2001:db8:1::/48\n"}))
    assert pol.client_may_relay(p, ip) is expected


def test_relayclients_bad_line_names_file_and_line(tmp_path):
    root = make_root(tmp_path, {"relayclients": "10.0.0.1\n127.\n"})
    with pytest.raises(ConfigError) as e:
        load_policy(root)
    assert str(e.value).endswith("relayclients:2: '127.' is neither an IP address nor a CIDR network")


def test_relayclients_canonical_networks():
    nets = pol.parse_relayclients([(1, "::ffff:10.1.0.0/112")], "x")
    assert nets == (ipaddress.ip_network("10.1.0.0/16"),)


def test_defaults_and_numbers(tmp_path):
    p = load_policy(make_root(tmp_path, {"maxsessions": "7 sessions\n", "databytes": "0\n"}))
    assert (p.maxsessions, p.maxsessionsperip, p.maxrcpt, p.maxheaderbytes, p.maxsessiontime) == (
        7, 20, 100, 262144, 3600)
    assert pol.effective_databytes(p) == pol.DEFAULT_MAX_DATABYTES
    p2 = load_policy(make_root(tmp_path, {"databytes": "5000\n"}))
    assert pol.effective_databytes(p2) == 5000


def test_mail_size_parameter():
    assert pol.check_mail_size("100", 100) is None
    assert pol.check_mail_size("200", 100) is None  # CRLF on the wire, LF as stored: may still fit
    assert pol.check_mail_size("201", 100) == pol.R_DATABYTES
    assert pol.check_mail_size("junk", 100) is None
    assert pol.check_mail_size(None, 100) is None


# ----------------------------------------------------------------------------- DATA

def decode(raw: bytes, limit: int = 0, max_header: int = 0, pieces: list[int] | None = None) -> DataDecoder:
    """Feed ``raw`` (everything after 354, terminator included) in pieces of the given sizes."""
    dec = DataDecoder(limit, max_header)
    pos = 0
    for n in pieces or []:
        dec.feed(raw[pos:pos + n])
        pos += n
    dec.feed(raw[pos:])
    dec.finish()
    return dec


@pytest.mark.parametrize(("raw", "stored"), [
    (b".\r\n", b""),
    (b"\r\n.\r\n", b"\n"),
    (b"a\r\n.\r\n", b"a\n"),
    (b"Subject: x\r\n\r\nbody\r\n.\r\n", b"Subject: x\n\nbody\n"),
    (b"..\r\n.\r\n", b".\n"),  # dot-stuffing undone
    (b"..x\r\n...\r\n.\r\n", b".x\n..\n"),
    (b".x\r\n.\r\n", b"x\n"),  # RFC 5321: a leading dot always goes
    (b"a\rb\r\n.\r\n", b"a\rb\n"),  # a CR not before LF is kept
    (b"a\r\r\n.\r\n", b"a\r\n"),
    (b"\x00\xff\x80\r\n.\r\n", b"\x00\xff\x80\n"),  # 8-bit clean
])
def test_data_decoding(raw, stored):
    dec = decode(raw)
    assert dec.verdict() is None
    assert b"".join(dec.chunks) == stored
    assert dec.size == len(stored)


@pytest.mark.parametrize("raw", [b"a\nb\r\n.\r\n", b"\n.\r\n", b"a\r\n.\n.\r\n", b"a\r\n\n.\r\n.\r\n"])
def test_bare_lf_is_qmails_451(raw):
    dec = decode(raw)
    assert dec.bare_lf
    assert dec.verdict() == "451 4.5.0 See https://cr.yp.to/docs/smtplf.html."
    assert dec.chunks == []


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b), max_size=12),
       st.lists(st.integers(1, 7), max_size=30))
def test_decoding_undoes_any_client_encoding_in_any_chunking(lines, cuts):
    message = b"".join(line + b"\n" for line in lines)
    wire = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"
    dec = decode(wire, pieces=cuts)
    assert dec.verdict() is None
    assert b"".join(dec.chunks) == message
    assert dec.size == len(message)


def test_databytes_exact_limit():
    body = b"x" * 98 + b"\r\n"  # 99 bytes stored
    assert decode(body + b".\r\n", limit=99).verdict() is None
    dec = decode(body + b".\r\n", limit=98)
    assert dec.verdict() == pol.R_DATABYTES
    assert dec.chunks == []


def test_databytes_counted_across_pieces_and_storage_stops():
    raw = b"x" * 5000 + b"\r\n.\r\n"
    dec = decode(raw, limit=1000, pieces=[100] * 30)
    assert dec.too_big and dec.chunks == [] and dec.size == 5001


def test_header_limit():
    header = b"".join(b"X-H%d: v\r\n" % i for i in range(100))
    stored = len(header) - 100  # counted as stored, with LF line ends
    ok = decode(header + b"\r\nbody\r\n.\r\n", max_header=stored)
    assert ok.verdict() is None
    too_big = decode(header + b"\r\nbody\r\n.\r\n", max_header=stored - 1, pieces=[13] * 40)
    assert too_big.verdict() == pol.R_HEADERBYTES
    # a long body does not count
    assert decode(b"A: b\r\n\r\n" + b"y" * 5000 + b"\r\n.\r\n", max_header=100).verdict() is None


@pytest.mark.parametrize(("header_lines", "hops"), [
    ([b"Received: x"] * 99, 99),
    ([b"Received: x"] * 100, 100),
    ([b"RECEIVED: x"] * 60 + [b"Delivered-To: y"] * 40, 100),
    ([b"receivedfoo"] * 100, 100),  # qmail compares the first 8 letters only
    ([b"Receive: x"] * 100, 0),
    ([b"Deliver: x"] * 100, 0),
    ([b" Received: x"] * 100, 0),
])
def test_hops(header_lines, hops):
    raw = b"".join(h + b"\r\n" for h in header_lines) + b"\r\nReceived: in the body\r\n.\r\n"
    dec = decode(raw, pieces=[7] * 50)
    assert dec.hops == hops
    assert (dec.verdict() == pol.R_HOPS) is (hops >= 100)


def test_hops_before_size_as_qmail():
    raw = b"Received: x\r\n" * 100 + b"\r\n" + b"z" * 100 + b"\r\n.\r\n"
    assert decode(raw, limit=10_000).verdict() == pol.R_HOPS


# ----------------------------------------------------------------------------- Received

WHEN = calendar.timegm((1995, 9, 26, 4, 46, 54, 0, 0, 0))


def test_received_line_bytes():
    line = received_line(remote_ip="192.48.96.5", local="silverton.berkeley.edu", helo="uunet.uu.net",
                         when=WHEN, remote_host="relay1.uu.net", remote_info="7")
    assert line == (b"Received: from relay1.uu.net (HELO uunet.uu.net) (7@192.48.96.5)\n"
                    b"  by silverton.berkeley.edu with SMTP; 26 Sep 1995 04:46:54 -0000\n")


def test_received_line_defaults_and_helo_rules():
    assert received_line(remote_ip="127.0.0.1", local="mx.isp.test", helo=None, when=WHEN) == (
        b"Received: from unknown (127.0.0.1)\n  by mx.isp.test with SMTP; 26 Sep 1995 04:46:54 -0000\n")
    # a HELO equal to the remote host name (ignoring case) is not shown; an empty one is
    assert b"(HELO" not in received_line(remote_ip="1.2.3.4", local="l", helo="UNKNOWN", when=WHEN)
    assert b" (HELO ) (1.2.3.4)" in received_line(remote_ip="1.2.3.4", local="l", helo="", when=WHEN)
    assert b"; 1 Jan 2001 00:00:05 -0000\n" in received_line(
        remote_ip="1", local="l", helo=None, when=calendar.timegm((2001, 1, 1, 0, 0, 5, 0, 0, 0)))


def test_received_line_replaces_unsafe_bytes():
    line = received_line(remote_ip="::1", local="mx", when=WHEN,
                         helo="ev\u00efl\r\nX-Injected: yes (x) [1.2.3.4] a+b=c/d%e:f@g_h")
    first = line.split(b"\n")[0]
    assert first == (b"Received: from unknown (HELO ev??l??X-Injected:?yes??x??[1.2.3.4]?a+b=c/d%e:f@g?h)"
                     b" (::1)")
    assert line.count(b"\n") == 2


@given(st.text(), st.text())
def test_received_line_is_always_two_safe_lines(helo, host):
    line = received_line(remote_ip="1.2.3.4", local=host, helo=helo, when=WHEN)
    assert line.count(b"\n") == 2 and line.endswith(b"-0000\n")
    assert b"\r" not in line and b"\0" not in line


def test_load_policy_uses_load_control(tmp_path):
    root = make_root(tmp_path, {"smtpgreeting": "mx.isp.test NO UCE\n"})
    p = load_policy(root, load_control(root))
    assert p.control.smtpgreeting == "mx.isp.test NO UCE"
