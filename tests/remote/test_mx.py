"""The pure decisions of remote delivery: MX order, null MX, the backup-MX rule, who we are, the
control files only remote delivery reads, qmail-remote's message conversion and reports, tcpto."""

from __future__ import annotations

import ipaddress
import random

import pytest

from pqmail.errors import ConfigError
from pqmail.remote.client import (
    combine,
    parse_tlsroutes,
    prepare_message,
    quote_address,
    reply_text,
    tls_mode_for,
)
from pqmail.remote.deliver import TcpTo, chunks, prefer_idle
from pqmail.remote.mx import (
    PERM_AMBIGMX,
    PERM_NOMX,
    TEMP_DNS,
    Mine,
    MxHost,
    Target,
    filter_backup_mx,
    ip_literal,
    is_null_mx,
    order_mx,
    parse_fib_trie,
    parse_if_inet6,
    parse_networks,
    parse_resolvers,
    plan,
)


def nets(*texts: str) -> tuple:
    return tuple(ipaddress.ip_network(t) for t in texts)


# ----------------------------------------------------------------------------- MX order

def test_order_mx_sorts_by_preference_and_shuffles_equal_ones():
    records = [(20, "c"), (10, "a1"), (30, "d"), (10, "a2"), (10, "a3"), (20, "c2")]
    seen = set()
    for seed in range(200):
        out = order_mx(records, random.Random(seed))
        assert [p for p, _ in out] == [10, 10, 10, 20, 20, 30]
        assert sorted(out) == sorted(records)
        seen.add(tuple(n for _, n in out[:3]))
    assert len(seen) == 6  # every order of the three preference-10 hosts turns up


@pytest.mark.parametrize(("records", "null"), [
    ([(0, "")], True),
    ([(10, "")], True),  # RFC 7505 wants 0, but "." can never be a mail host
    ([(0, ""), (10, "mx.example")], False),
    ([(10, "mx.example")], False),
    ([], False),
])
def test_null_mx(records, null):
    assert is_null_mx(records) is null


# ----------------------------------------------------------------------------- backup MX

MINE = Mine(names=frozenset({"mx.isp.test", "isp.test"}), detected=nets("127.0.0.0/8", "192.0.2.2/32"),
            excluded=nets("127.0.0.2/32"))


@pytest.mark.parametrize(("hosts", "kept"), [
    # not listed: every host, in order
    ([(10, "a", "198.51.100.1"), (20, "b", "198.51.100.2")], ["a", "b"]),
    # listed at 20 by address: only the better ones
    ([(10, "a", "198.51.100.1"), (20, "me", "192.0.2.2"), (30, "c", "198.51.100.3")], ["a"]),
    # listed by name, even with no address
    ([(10, "a", "198.51.100.1"), (20, "MX.ISP.TEST.", "")], ["a"]),
    # listed at the same preference as another: strictly better only, so none
    ([(10, "a", "198.51.100.1"), (10, "me", "192.0.2.2")], None),
    # the best MX: none
    ([(10, "me", "127.0.0.1"), (20, "b", "198.51.100.2")], None),
    # an excluded loopback address is not us
    ([(10, "a", "127.0.0.2"), (20, "me", "127.0.0.1")], ["a"]),
    # a better MX that has no address yet is kept (the caller defers)
    ([(10, "a", ""), (20, "me", "192.0.2.2")], ["a"]),
])
def test_filter_backup_mx(hosts, kept):
    hs = [MxHost(p, n, tuple(a.split()) if a else ()) for p, n, a in hosts]
    out = filter_backup_mx(hs, MINE.host)
    assert (None if out is None else [h.name for h in out]) == kept


@pytest.mark.parametrize(("hosts", "check", "expect"), [
    ([MxHost(10, "a", ("198.51.100.1", "2001:db8::1")), MxHost(20, "b", ("198.51.100.2",))], True,
     ["198.51.100.1", "2001:db8::1", "198.51.100.2"]),
    ([MxHost(10, "me", ("192.0.2.2",))], True, ("D", PERM_AMBIGMX)),
    ([MxHost(10, "me", ("192.0.2.2",))], False, ["192.0.2.2"]),  # smtproutes: no backup-MX check
    ([MxHost(10, "a", (), soft_failed=True), MxHost(20, "me", ("192.0.2.2",))], True, ("Z", TEMP_DNS)),
    ([MxHost(10, "a"), MxHost(20, "b")], True, ("D", PERM_NOMX)),
    ([MxHost(10, "a", soft_failed=True), MxHost(20, "b", ("198.51.100.2",))], True, ["198.51.100.2"]),
])
def test_plan(hosts, check, expect):
    res = plan(hosts, 25, "mx", MINE.host if check else None)
    if isinstance(expect, tuple):
        assert (res.status, res.report, res.targets) == (*expect, ())
    else:
        assert res.ok and [t.address for t in res.targets] == expect


@pytest.mark.parametrize(("address", "mine"), [
    ("127.0.0.1", True), ("127.9.9.9", True), ("127.0.0.2", False), ("192.0.2.2", True),
    ("192.0.2.3", False), ("::ffff:192.0.2.2", True), ("203.0.113.9", True), ("not an ip", False),
])
def test_mine_by_address(address, mine):
    m = Mine(detected=nets("127.0.0.0/8", "192.0.2.2/32", "203.0.113.9/32"),
             extra=nets("203.0.113.9/32"), excluded=nets("127.0.0.2/32", "203.0.113.0/24"))
    assert m.address(address) is mine


FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 192.0.2.0/24 2 0 2
           |-- 192.0.2.0
              /24 link UNICAST
           |-- 192.0.2.2
              /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
           |-- 192.0.2.2
              /32 host LOCAL
"""


def test_parse_proc_files():
    assert parse_fib_trie(FIB_TRIE) == list(nets("127.0.0.0/8", "127.0.0.1/32", "192.0.2.2/32"))
    text = ("00000000000000000000000000000001 01 80 10 80       lo\n"
            "fd000000000000000000000000000002 04 40 00 82     eth0\n")
    assert parse_if_inet6(text) == list(nets("::1/128", "fd00::2/128"))


# ----------------------------------------------------------------------------- control files

@pytest.mark.parametrize(("line", "parsed"), [
    ("192.0.2.53", ("192.0.2.53", 53)),
    ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("2001:db8::53", ("2001:db8::53", 53)),
    ("[2001:db8::53]:5353", ("2001:db8::53", 5353)),
    ("[2001:db8::53]", ("2001:db8::53", 53)),
])
def test_parse_resolvers(line, parsed):
    assert parse_resolvers([(1, line)], "control/resolvers") == [parsed]


@pytest.mark.parametrize("line", ["ns.example", "192.0.2.1:0", "192.0.2.1:x", "[::1]x", "1.2.3.4:70000"])
def test_parse_resolvers_names_the_bad_line(line):
    with pytest.raises(ConfigError, match=r"control/resolvers:3: "):
        parse_resolvers([(3, line)], "control/resolvers")


def test_parse_networks():
    assert parse_networks([(1, "192.0.2.1"), (2, "10.0.0.0/8"), (3, "[::1]")], "ipme") == list(
        nets("192.0.2.1/32", "10.0.0.0/8", "::1/128"))
    with pytest.raises(ConfigError, match="ipme:4"):
        parse_networks([(4, "myhost")], "ipme")


@pytest.mark.parametrize(("lines", "host", "mode"), [
    ([], "example.com", "may"),
    (["bank.example:verify"], "bank.example", "verify"),
    (["bank.example:verify"], "mx.bank.example", "may"),
    ([".bank.example:require"], "mx.bank.example", "require"),
    ([":require", "old.example:off"], "old.example", "off"),
    ([":require", "fine.example:"], "fine.example", "may"),  # empty value: exception to the default
    ([":require"], "any.example", "require"),
    (["A.Example:Verify", "a.example:require"], "a.EXAMPLE", "require"),  # case, later line wins
])
def test_tlsroutes(lines, host, mode):
    routes = parse_tlsroutes(list(enumerate(lines, 1)), "control/tlsroutes")
    assert tls_mode_for(routes, host) == mode


@pytest.mark.parametrize("line", ["bank.example", "bank.example:maybe"])
def test_tlsroutes_errors_name_the_line(line):
    with pytest.raises(ConfigError, match="tlsroutes:2"):
        parse_tlsroutes([(2, line)], "control/tlsroutes")


# ----------------------------------------------------------------------------- the wire

@pytest.mark.parametrize(("raw", "data"), [
    (b"a\nb\n", b"a\r\nb\r\n.\r\n"),
    (b"a\r\nb\n", b"a\r\nb\r\n.\r\n"),  # an existing CRLF is kept
    (b"a\rb\n", b"a\r\nb\r\n.\r\n"),  # a lone CR becomes CRLF
    (b".\n..x\nx.\n", b"..\r\n...x\r\nx.\r\n.\r\n"),  # leading dots doubled
    (b"", b".\r\n"),
    (b"x\r", b"x\r\n.\r\n"),  # qmail takes a final CR as the end of the line
    (b"no newline", None),
    (b"a\nlast", None),
])
def test_prepare_message(raw, data):
    wire = prepare_message(raw)
    assert (None if wire is None else wire.data) == data
    if wire is not None:
        assert wire.size == len(data) - 3 and wire.eightbit is False


def test_prepare_message_notes_8bit():
    assert prepare_message("é\n".encode()).eightbit


@pytest.mark.parametrize(("addr", "quoted"), [
    ("", "<>"),
    ("joe@example.com", "<joe@example.com>"),
    ("joe.bloggs+tag@example.com", "<joe.bloggs+tag@example.com>"),
    ("joe bloggs@example.com", '<"joe bloggs"@example.com>'),
    ('a"b@example.com', '<"a\\"b"@example.com>'),
    ("a..b@example.com", '<"a..b"@example.com>'),
    (".a@example.com", '<".a"@example.com>'),
    ("a@b@example.com", '<"a@b"@example.com>'),
    ("jörg@example.com", "<jörg@example.com>"),
    ("#@[]", "<#@[]>"),
    ("postmaster", "<postmaster>"),
])
def test_quote_address(addr, quoted):
    assert quote_address(addr) == quoted


def test_reply_text_keeps_the_lines_and_codes():
    assert reply_text(550, "5.1.1 no\nsuch user") == "550-5.1.1 no\n550 such user"
    assert reply_text(250, "ok") == "250 ok"


@pytest.mark.parametrize(("rcpt", "msg", "expect"), [
    (("r", ""), ("K", "ok."), ("K", "ok.")),
    (None, ("Z", "died."), ("Z", "died.")),
    (("h", "no user."), ("K", "ok."), ("D", "no user.")),
    (("h", "no user."), ("D", "Giving up."), ("D", "no user.\nGiving up.")),
    (("h", "no user."), ("Z", "died."), ("D", "no user.")),
    (("s", "busy."), ("K", "ok."), ("Z", "busy.")),
    (("s", "busy."), ("Z", "died."), ("Z", "busy.\ndied.")),
    (("s", "busy."), ("D", "Giving up."), ("Z", "busy.\nGiving up.")),
])
def test_combine_as_qmail_rspawn(rcpt, msg, expect):
    assert combine(rcpt, *msg) == expect


# ----------------------------------------------------------------------------- engine helpers

def test_tcpto_skips_after_two_timeouts_two_minutes_apart():
    t = TcpTo(backoff=3840)
    t.record("192.0.2.1", True, 1000)
    assert not t.skip("192.0.2.1", 1001)
    t.record("192.0.2.1", True, 1060)  # within two minutes: not counted
    assert not t.skip("192.0.2.1", 1061)
    t.record("192.0.2.1", True, 1130)
    assert t.skip("192.0.2.1", 1131) and t.skip("192.0.2.1", 1130 + 3839)
    assert not t.skip("192.0.2.1", 1130 + 3840)  # the back-off is over: try again
    assert not t.skip("192.0.2.9", 1131)
    t.record("192.0.2.1", False, 1200)  # a connect that did not time out clears it
    assert not t.skip("192.0.2.1", 1201)


def test_tcpto_default_backoff_is_qmails():
    assert 64 * 60 <= TcpTo().backoff <= 64 * 91


def test_prefer_idle_within_a_preference_only():
    ts = [Target(10, "a", "192.0.2.1"), Target(10, "b", "192.0.2.2"), Target(20, "c", "192.0.2.3")]
    idle = {"192.0.2.2", "192.0.2.3"}
    assert [t.name for t in prefer_idle(ts, lambda t: t.address in idle)] == ["b", "a", "c"]


def test_chunks_and_labels():
    assert chunks(["a", "b", "c"], 2) == [["a", "b"], ["c"]]
    assert Target(10, "mx.example", "192.0.2.1").label == "mx.example [192.0.2.1]"
    assert Target(0, "2001:db8::1", "2001:db8::1", 2525).label == "[2001:db8::1]:2525"


@pytest.mark.parametrize(("host", "literal"), [
    ("[192.0.2.1]", "192.0.2.1"), ("[IPv6:2001:db8::1]", "2001:db8::1"), ("[ipv6:::1]", "::1"),
    ("example.com", None), ("[example.com]", None), ("192.0.2.1", None),
])
def test_ip_literal(host, literal):
    assert ip_literal(host) == literal
