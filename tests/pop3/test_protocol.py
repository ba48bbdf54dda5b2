"""The sans-IO POP3 core: bytes in, exact reply bytes and events out, for every command and state."""

from __future__ import annotations

import base64

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pqmail.pop3.protocol import (
    MAX_LINE,
    NEED_DATA,
    PAUSED,
    Authenticate,
    BodyEncoder,
    ConnectionClosed,
    LocalProtocolError,
    POP3Connection,
    Quit,
    RemoteProtocolError,
    Retrieve,
    StartTLS,
    State,
    wire_size,
)

CAPA_AUTH = (b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nUSER\r\nSASL PLAIN\r\nRESP-CODES\r\n"
             b"PIPELINING\r\nAUTH-RESP-CODE\r\nEXPIRE NEVER\r\nLOGIN-DELAY 0\r\n"
             b"IMPLEMENTATION pqmail\r\n.\r\n")


def new(**kw) -> POP3Connection:
    c = POP3Connection(hostname="pop.test", **kw)
    c.send_greeting()
    c.data_to_send()
    return c


def send(c: POP3Connection, data: bytes):
    """Feed ``data``; return (the next event, the bytes replied so far)."""
    c.receive_data(data)
    ev = c.next_event()
    return ev, c.data_to_send()


def logged_in(sizes=(100, 200, 300), uids=("u1", "u2", "u3"), **kw) -> POP3Connection:
    c = new(**kw)
    ev, _ = send(c, b"USER joe\r\nPASS pw\r\n")
    assert isinstance(ev, Authenticate)
    c.auth_succeeded(list(sizes), list(uids))
    assert c.data_to_send() == b"+OK %d messages (%d octets)\r\n" % (len(sizes), sum(sizes))
    return c


# ----------------------------------------------------------------------------- greeting and CAPA

def test_greeting() -> None:
    c = POP3Connection(hostname="pop.test")
    c.send_greeting()
    assert c.data_to_send() == b"+OK pop.test POP3 server ready\r\n"
    assert c.state is State.AUTHORIZATION


def test_greeting_with_apop_challenge() -> None:
    c = POP3Connection(hostname="pop.test", apop_timestamp="<1.2@pop.test>")
    c.send_greeting()
    assert c.data_to_send() == b"+OK pop.test POP3 server ready <1.2@pop.test>\r\n"


def test_refusal_instead_of_greeting_ends_the_session() -> None:
    c = POP3Connection(hostname="pop.test")
    c.send_refusal("SYS/TEMP", "too many sessions")
    assert c.data_to_send() == b"-ERR [SYS/TEMP] too many sessions\r\n"
    assert c.next_event() == ConnectionClosed("refused")


def test_capa_before_login() -> None:
    assert send(new(), b"CAPA\r\n") == (NEED_DATA, CAPA_AUTH)


def test_capa_offers_stls_only_when_available_and_not_active() -> None:
    _, out = send(new(tls_available=True), b"CAPA\r\n")
    assert out == CAPA_AUTH.replace(b"IMPLEMENTATION", b"STLS\r\nIMPLEMENTATION")
    _, out = send(new(tls_available=True, tls_active=True), b"CAPA\r\n")
    assert out == CAPA_AUTH


def test_capa_without_plaintext_logins_hides_user_and_sasl() -> None:
    _, out = send(new(tls_available=True, plaintext_auth=False), b"capa\r\n")
    assert b"USER\r\n" not in out and b"SASL" not in out and b"STLS\r\n" in out


def test_capa_after_login() -> None:
    _, out = send(logged_in(tls_available=True), b"CAPA\r\n")
    assert out == (b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n"
                   b"AUTH-RESP-CODE\r\nEXPIRE NEVER\r\nLOGIN-DELAY 0\r\nIMPLEMENTATION pqmail\r\n.\r\n")


# ----------------------------------------------------------------------------- AUTHORIZATION

def test_user_pass_gives_an_authenticate_event() -> None:
    c = new()
    assert send(c, b"USER joe@example.com\r\n") == (NEED_DATA, b"+OK send PASS\r\n")
    ev, out = send(c, b"PASS  two words \r\n")
    assert ev == Authenticate("USER", "joe@example.com", " two words ")  # RFC 1939: spaces belong to it
    assert out == b""
    assert "two words" not in repr(ev)
    assert c.next_event() is PAUSED


def test_pass_before_user_and_empty_arguments() -> None:
    c = new()
    assert send(c, b"PASS x\r\n") == (NEED_DATA, b"-ERR USER first\r\n")
    assert send(c, b"USER\r\n") == (NEED_DATA, b"-ERR syntax error\r\n")
    assert send(c, b"USER a b\r\n") == (NEED_DATA, b"-ERR syntax error\r\n")
    send(c, b"USER a\r\n")
    assert send(c, b"PASS\r\n") == (NEED_DATA, b"-ERR syntax error\r\n")


def test_failed_login_forgets_user_and_allows_retry() -> None:
    c = new()
    send(c, b"USER joe\r\nPASS bad\r\n")
    c.auth_failed()
    assert c.data_to_send() == b"-ERR [AUTH] authentication failed\r\n"
    assert send(c, b"PASS again\r\n") == (NEED_DATA, b"-ERR USER first\r\n")
    send(c, b"USER joe\r\nPASS good\r\n")
    c.auth_failed("IN-USE", "mailbox is in use by another session")
    assert c.data_to_send() == b"-ERR [IN-USE] mailbox is in use by another session\r\n"


def test_three_failures_end_the_session() -> None:
    c = new()
    for _ in range(3):
        ev, _ = send(c, b"USER joe\r\nPASS bad\r\n")
        assert isinstance(ev, Authenticate)
        c.auth_failed()
    assert c.next_event() == ConnectionClosed("auth-failures")
    assert c.data_to_send() == b"-ERR [AUTH] authentication failed\r\n"


def test_transaction_commands_refused_before_login() -> None:
    c = new()
    for cmd in (b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"RSET", b"TOP 1 1", b"UIDL"):
        assert send(c, cmd + b"\r\n") == (NEED_DATA, b"-ERR command not valid before login\r\n")


def test_authorization_commands_refused_after_login() -> None:
    c = logged_in(tls_available=True)
    for cmd in (b"USER x", b"PASS y", b"STLS", b"AUTH PLAIN", b"APOP a b"):
        assert send(c, cmd + b"\r\n") == (NEED_DATA, b"-ERR command not valid after login\r\n")


def test_unknown_and_lowercase_commands() -> None:
    c = new()
    assert send(c, b"XYZZY\r\n") == (NEED_DATA, b"-ERR unknown command\r\n")
    assert send(c, b"LAST\r\n") == (NEED_DATA, b"-ERR unknown command\r\n")
    assert send(c, b"noop\r\n") == (NEED_DATA, b"+OK\r\n")
    assert send(c, b"NOOP extra\r\n") == (NEED_DATA, b"-ERR syntax error\r\n")
    assert send(c, b"US\x00ER x\r\n") == (NEED_DATA, b"-ERR syntax error\r\n")


def test_quit_before_login() -> None:
    c = new()
    ev, out = send(c, b"QUIT\r\nNOOP\r\n")
    assert ev == ConnectionClosed("quit")
    assert out == b"+OK pop.test signing off\r\n"
    assert c.next_event() == ConnectionClosed("quit")  # nothing after QUIT is read
    assert c.data_to_send() == b""


def test_bare_lf_line_ends_are_accepted() -> None:
    assert send(new(), b"NOOP\n") == (NEED_DATA, b"+OK\r\n")


def test_end_of_input() -> None:
    c = new()
    c.receive_data(b"NOOP\r\nNOO")
    c.receive_data(b"")
    assert c.next_event() == ConnectionClosed("eof")
    assert c.data_to_send() == b"+OK\r\n"


def test_incomplete_command_needs_data() -> None:
    c = new()
    assert send(c, b"NO") == (NEED_DATA, b"")
    assert send(c, b"OP\r") == (NEED_DATA, b"")
    assert send(c, b"\n") == (NEED_DATA, b"+OK\r\n")


# ----------------------------------------------------------------------------- APOP

def test_apop_when_offered() -> None:
    c = new(apop_timestamp="<1.2@pop.test>")
    ev, _ = send(c, b"APOP joe c4c9334bac560ecc979e58001b3e22fb\r\n")
    assert ev == Authenticate("APOP", "joe", "c4c9334bac560ecc979e58001b3e22fb")


def test_apop_syntax_and_absence() -> None:
    assert send(new(), b"APOP joe c4c9334bac560ecc979e58001b3e22fb\r\n") == (
        NEED_DATA, b"-ERR APOP not available\r\n")
    c = new(apop_timestamp="<1.2@pop.test>")
    assert send(c, b"APOP joe C4C9\r\n") == (NEED_DATA, b"-ERR syntax error\r\n")
    assert send(c, b"APOP joe\r\n") == (NEED_DATA, b"-ERR syntax error\r\n")


# ----------------------------------------------------------------------------- AUTH PLAIN (RFC 5034)

def b64(raw: bytes) -> bytes:
    return base64.b64encode(raw)


def test_auth_plain_initial_response() -> None:
    ev, out = send(new(), b"AUTH PLAIN " + b64(b"\0joe\0secret") + b"\r\n")
    assert ev == Authenticate("PLAIN", "joe", "secret", "")
    assert out == b""


def test_auth_plain_with_authzid() -> None:
    ev, _ = send(new(), b"auth plain " + b64(b"boss\0joe\0secret") + b"\r\n")
    assert ev == Authenticate("PLAIN", "joe", "secret", "boss")


def test_auth_plain_challenge_and_answer() -> None:
    c = new()
    assert send(c, b"AUTH PLAIN\r\n") == (NEED_DATA, b"+ \r\n")
    assert c.state is State.SASL
    ev, _ = send(c, b64(b"\0joe\0secret") + b"\r\n")
    assert ev == Authenticate("PLAIN", "joe", "secret", "")


def test_auth_cancel_and_bad_answers() -> None:
    c = new()
    send(c, b"AUTH PLAIN\r\n")
    assert send(c, b"*\r\n") == (NEED_DATA, b"-ERR authentication cancelled\r\n")
    assert c.state is State.AUTHORIZATION
    send(c, b"AUTH PLAIN\r\n")
    assert send(c, b"not base64!\r\n") == (NEED_DATA, b"-ERR invalid base64 data\r\n")
    assert send(c, b"AUTH PLAIN " + b64(b"joe\0secret") + b"\r\n") == (
        NEED_DATA, b"-ERR [AUTH] malformed PLAIN response\r\n")
    assert send(c, b"AUTH PLAIN =\r\n") == (NEED_DATA, b"-ERR [AUTH] malformed PLAIN response\r\n")


def test_auth_mechanisms() -> None:
    c = new()
    assert send(c, b"AUTH\r\n") == (NEED_DATA, b"+OK\r\nPLAIN\r\n.\r\n")
    assert send(c, b"AUTH CRAM-MD5\r\n") == (NEED_DATA, b"-ERR unsupported authentication mechanism\r\n")
    assert send(c, b"AUTH PLAIN a b\r\n") == (NEED_DATA, b"-ERR syntax error\r\n")


def test_auth_line_may_exceed_255_octets() -> None:
    pw = b"p" * 600
    ev, _ = send(new(), b"AUTH PLAIN " + b64(b"\0joe\0" + pw) + b"\r\n")
    assert ev == Authenticate("PLAIN", "joe", pw.decode(), "")


def test_tls_only_refuses_logins_in_plaintext() -> None:
    c = new(tls_available=True, plaintext_auth=False)
    refused = b"-ERR [AUTH] use STLS first: logins without TLS are not allowed\r\n"
    assert send(c, b"USER joe\r\n") == (NEED_DATA, refused)
    assert send(c, b"AUTH PLAIN " + b64(b"\0a\0b") + b"\r\n") == (NEED_DATA, refused)
    c = new(tls_active=True, plaintext_auth=False)
    assert send(c, b"USER joe\r\n") == (NEED_DATA, b"+OK send PASS\r\n")


# ----------------------------------------------------------------------------- STLS (RFC 2595)

def test_stls_then_forget_everything_from_before() -> None:
    c = new(tls_available=True)
    send(c, b"USER joe\r\n")
    ev, out = send(c, b"STLS\r\nPASS injected\r\n")
    assert ev == StartTLS()
    assert out == b"+OK begin TLS negotiation\r\n"
    assert c.next_event() is PAUSED
    c.tls_started()
    assert c.tls_active
    assert c.next_event() is NEED_DATA  # the pipelined plaintext PASS is gone
    assert send(c, b"PASS x\r\n") == (NEED_DATA, b"-ERR USER first\r\n")
    _, out = send(c, b"CAPA\r\n")
    assert b"STLS" not in out
    assert send(c, b"STLS\r\n") == (NEED_DATA, b"-ERR TLS already active\r\n")


def test_stls_not_available() -> None:
    assert send(new(), b"STLS\r\n") == (NEED_DATA, b"-ERR TLS not available\r\n")
    assert send(new(tls_available=True), b"STLS now\r\n") == (NEED_DATA, b"-ERR syntax error\r\n")


# ----------------------------------------------------------------------------- TRANSACTION

def test_stat_list_uidl() -> None:
    c = logged_in()
    assert send(c, b"STAT\r\n") == (NEED_DATA, b"+OK 3 600\r\n")
    assert send(c, b"LIST\r\n") == (NEED_DATA,
                                    b"+OK 3 messages (600 octets)\r\n1 100\r\n2 200\r\n3 300\r\n.\r\n")
    assert send(c, b"LIST 2\r\n") == (NEED_DATA, b"+OK 2 200\r\n")
    assert send(c, b"UIDL\r\n") == (NEED_DATA,
                                    b"+OK unique-id listing follows\r\n1 u1\r\n2 u2\r\n3 u3\r\n.\r\n")
    assert send(c, b"UIDL 3\r\n") == (NEED_DATA, b"+OK 3 u3\r\n")


def test_deleted_messages_leave_stat_list_and_uidl() -> None:
    c = logged_in()
    assert send(c, b"DELE 2\r\n") == (NEED_DATA, b"+OK message 2 deleted\r\n")
    assert send(c, b"STAT\r\n") == (NEED_DATA, b"+OK 2 400\r\n")  # RFC 1939, not qmail's count
    assert send(c, b"LIST\r\n") == (NEED_DATA, b"+OK 2 messages (400 octets)\r\n1 100\r\n3 300\r\n.\r\n")
    assert send(c, b"UIDL\r\n") == (NEED_DATA, b"+OK unique-id listing follows\r\n1 u1\r\n3 u3\r\n.\r\n")
    for cmd in (b"LIST 2", b"UIDL 2", b"RETR 2", b"TOP 2 1", b"DELE 2"):
        assert send(c, cmd + b"\r\n") == (NEED_DATA, b"-ERR message 2 already deleted\r\n")
    assert send(c, b"RSET\r\n") == (NEED_DATA, b"+OK maildrop has 3 messages (600 octets)\r\n")
    assert send(c, b"STAT\r\n") == (NEED_DATA, b"+OK 3 600\r\n")


@pytest.mark.parametrize("cmd,reply", [
    (b"LIST 0", b"-ERR no such message"),
    (b"LIST 4", b"-ERR no such message"),
    (b"LIST x", b"-ERR invalid message number"),
    (b"LIST -1", b"-ERR invalid message number"),
    (b"LIST 1 2", b"-ERR syntax error"),
    (b"LIST 99999999999", b"-ERR invalid message number"),
    (b"RETR", b"-ERR syntax error"),
    (b"RETR 4", b"-ERR no such message"),
    (b"TOP 1", b"-ERR syntax error"),
    (b"TOP 1 x", b"-ERR syntax error"),
    (b"TOP 0 1", b"-ERR no such message"),
    (b"DELE", b"-ERR syntax error"),
    (b"UIDL 0", b"-ERR no such message"),
    (b"STAT 1", b"-ERR syntax error"),
])
def test_message_number_errors(cmd: bytes, reply: bytes) -> None:
    assert send(logged_in(), cmd + b"\r\n") == (NEED_DATA, reply + b"\r\n")


def test_retr_and_top_events() -> None:
    c = logged_in()
    ev, _ = send(c, b"RETR 2\r\n")
    assert ev == Retrieve(2)
    c.message_follows()
    assert c.data_to_send() == b"+OK 200 octets\r\n"
    c.message_end()
    assert c.data_to_send() == b".\r\n"
    ev, _ = send(c, b"TOP 1 0\r\n")
    assert ev == Retrieve(1, 0)
    c.message_follows()
    c.message_end()
    assert c.data_to_send() == b"+OK top of message follows\r\n.\r\n"
    ev, _ = send(c, b"RETR 3\r\n")
    c.message_unavailable()
    assert c.data_to_send() == b"-ERR [SYS/TEMP] unable to open that message\r\n"


def test_quit_commits_deletions() -> None:
    c = logged_in()
    ev, out = send(c, b"DELE 3\r\nDELE 1\r\nQUIT\r\n")
    assert ev == Quit((1, 3))
    assert out == b"+OK message 3 deleted\r\n+OK message 1 deleted\r\n"
    c.quit_done()
    assert c.data_to_send() == b"+OK pop.test signing off (2 messages deleted)\r\n"
    assert c.next_event() == ConnectionClosed("quit")


def test_quit_reports_failed_deletions() -> None:
    c = logged_in()
    send(c, b"DELE 1\r\nDELE 2\r\n")
    send(c, b"QUIT\r\n")
    c.quit_done(failed=1)
    assert c.data_to_send() == b"-ERR [SYS/TEMP] 1 of 2 messages could not be deleted\r\n"


def test_rset_then_quit_deletes_nothing() -> None:
    c = logged_in()
    ev, _ = send(c, b"DELE 1\r\nRSET\r\nQUIT\r\n")
    assert ev == Quit(())


def test_empty_maildrop() -> None:
    c = logged_in(sizes=(), uids=())
    assert send(c, b"STAT\r\n") == (NEED_DATA, b"+OK 0 0\r\n")
    assert send(c, b"LIST\r\n") == (NEED_DATA, b"+OK 0 messages (0 octets)\r\n.\r\n")
    assert send(c, b"UIDL\r\n") == (NEED_DATA, b"+OK unique-id listing follows\r\n.\r\n")
    assert send(c, b"RETR 1\r\n") == (NEED_DATA, b"-ERR no such message\r\n")


def test_pipelined_commands_wait_behind_an_event() -> None:
    c = logged_in()
    c.receive_data(b"STAT\r\nRETR 1\r\nLIST 1\r\nNOOP\r\n")
    ev = c.next_event()
    assert ev == Retrieve(1)
    assert c.data_to_send() == b"+OK 3 600\r\n"
    assert c.next_event() is PAUSED
    c.message_follows()
    c.message_end()
    assert c.next_event() is NEED_DATA
    assert c.data_to_send() == b"+OK 100 octets\r\n.\r\n+OK 1 100\r\n+OK\r\n"


# ----------------------------------------------------------------------------- limits

def test_overlong_command_is_refused_and_the_session_goes_on() -> None:
    c = new()
    line = b"USER " + b"x" * (MAX_LINE - 6) + b"\r\n"  # 256 octets with CRLF
    assert send(c, line) == (NEED_DATA, b"-ERR line too long\r\n")
    assert send(c, b"USER " + b"x" * (MAX_LINE - 7) + b"\r\n") == (NEED_DATA, b"+OK send PASS\r\n")


def test_very_long_line_is_discarded_up_to_its_end() -> None:
    c = new()
    assert send(c, b"X" * 5000) == (NEED_DATA, b"")
    assert send(c, b"Y" * 5000 + b"\r\nNOOP\r\n") == (NEED_DATA, b"-ERR line too long\r\n+OK\r\n")


def test_endless_line_closes_the_session() -> None:
    c = new()
    with pytest.raises(RemoteProtocolError):
        send(c, b"A" * 20000)
    assert c.data_to_send() == b"-ERR line too long; closing\r\n"
    assert c.next_event() == ConnectionClosed("protocol-error")


def test_stream_of_bad_commands_closes_the_session() -> None:
    c = new()
    with pytest.raises(RemoteProtocolError):
        send(c, b"BAD\r\n" * 25)
    out = c.data_to_send()
    assert out.count(b"-ERR unknown command\r\n") == 20
    assert out.endswith(b"-ERR too many bad commands; closing\r\n")


def test_good_commands_reset_the_bad_count() -> None:
    c = new()
    _, out = send(c, b"BAD\r\nNOOP\r\n" * 30)
    assert out.count(b"+OK\r\n") == 30


# ----------------------------------------------------------------------------- local misuse

def test_local_protocol_errors() -> None:
    c = POP3Connection()
    with pytest.raises(LocalProtocolError):
        c.next_event()
    c.send_greeting()
    with pytest.raises(LocalProtocolError):
        c.send_greeting()
    with pytest.raises(LocalProtocolError):
        c.auth_succeeded([], [])
    with pytest.raises(LocalProtocolError):
        c.message_end()
    send(c, b"USER a\r\nPASS b\r\n")
    with pytest.raises(LocalProtocolError):
        c.auth_succeeded([1], ["has space"])
    with pytest.raises(LocalProtocolError):
        c.auth_succeeded([1], ["x" * 71])
    with pytest.raises(LocalProtocolError):
        c.quit_done()


# ----------------------------------------------------------------------------- bodies

def encode(data: bytes, lines: int | None = None, step: int | None = None) -> bytes:
    enc = BodyEncoder(lines)
    step = step or max(1, len(data))
    out = b"".join(enc.feed(data[i:i + step]) for i in range(0, len(data), step))
    return out + enc.finish()


def test_body_crlf_and_dot_stuffing() -> None:
    assert encode(b".a\nb\n..c\n.\n") == b"..a\r\nb\r\n...c\r\n..\r\n"


def test_body_missing_final_line_end_is_supplied() -> None:
    assert encode(b"a\nb") == b"a\r\nb\r\n"
    assert encode(b"") == b""
    assert wire_size(b"a\nb") == 6
    assert wire_size(b"") == 0


def test_body_crlf_source_keeps_its_cr() -> None:
    assert encode(b"a\r\n.b\r\n") == b"a\r\r\n..b\r\r\n"


def test_top_sends_header_blank_line_and_n_lines() -> None:
    msg = b"H: 1\nH: 2\n\nl1\n.l2\nl3\n"
    assert encode(msg, 0) == b"H: 1\r\nH: 2\r\n\r\n"
    assert encode(msg, 2) == b"H: 1\r\nH: 2\r\n\r\nl1\r\n..l2\r\n"
    assert encode(msg, 99) == encode(msg)
    assert encode(b"H: 1\nno body", 5) == b"H: 1\r\nno body\r\n"
    assert encode(b"H: 1\r\n\r\nb1\r\nb2\r\n", 1) == b"H: 1\r\r\n\r\r\nb1\r\r\n"


@given(st.binary(max_size=300), st.integers(1, 40), st.one_of(st.none(), st.integers(0, 8)))
def test_body_encoding_does_not_depend_on_chunking(data: bytes, step: int, lines: int | None) -> None:
    assert encode(data, lines, step) == encode(data, lines)


@given(st.lists(st.text(alphabet=".ab \r", max_size=6), max_size=12), st.booleans())
def test_body_round_trip_and_size(lines: list[str], final_lf: bool) -> None:
    data = "\n".join(lines).encode() + (b"\n" if final_lf and lines else b"")
    out = encode(data)
    if not data:
        assert out == b""
        return
    assert out.endswith(b"\r\n")
    wire = out[:-2].split(b"\r\n")
    unstuffed = [ln[1:] if ln.startswith(b".") else ln for ln in wire]
    assert b"\n".join(unstuffed) == data.removesuffix(b"\n")
    assert wire_size(data) == len(out) - sum(1 for ln in wire if ln.startswith(b"."))


# ----------------------------------------------------------------------------- fuzzing

COMMANDS = [b"USER joe", b"PASS pw", b"STAT", b"LIST", b"LIST 1", b"RETR 1", b"RETR 2", b"TOP 1 2", b"DELE 1",
            b"RSET", b"NOOP", b"UIDL", b"UIDL 2", b"CAPA", b"STLS", b"AUTH PLAIN", b"AUTH PLAIN AGpvZQBwdw==",
            b"*", b"APOP joe 0123456789abcdef0123456789abcdef", b"QUIT", b"LIST 0", b"X" * 300]
chunks = st.lists(st.one_of(
    st.binary(max_size=64),
    st.lists(st.sampled_from(COMMANDS), max_size=6).map(lambda cs: b"".join(c + b"\r\n" for c in cs)),
), max_size=20)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(chunks, st.booleans(), st.booleans(), st.booleans())
def test_random_input_only_ever_raises_the_peer_error(parts: list[bytes], succeed: bool, tls: bool,
                                                      eof: bool) -> None:
    c = POP3Connection(hostname="pop.test", tls_available=tls,
                       apop_timestamp="<1@pop.test>" if succeed else None)
    c.send_greeting()
    try:
        for part in [*parts, b""] if eof else parts:
            c.receive_data(part)
            while True:
                ev = c.next_event()
                out = c.data_to_send()
                assert out == b"" or out.endswith(b"\r\n")
                if ev is NEED_DATA or isinstance(ev, ConnectionClosed):
                    break
                assert ev is not PAUSED
                if isinstance(ev, Authenticate):
                    if succeed:
                        c.auth_succeeded([10, 20], ["a", "b"])
                    else:
                        c.auth_failed()
                elif isinstance(ev, Retrieve):
                    c.message_follows()
                    c.message_end()
                elif isinstance(ev, Quit):
                    c.quit_done()
                elif isinstance(ev, StartTLS):
                    c.tls_started()
            if c.state is State.CLOSED:
                break
    except RemoteProtocolError:
        assert c.state is State.CLOSED
