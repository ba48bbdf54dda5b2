"""control files: control_readfile rules, qmail's defaults, and the lookups built on them."""

from __future__ import annotations

import os
import re
import string
from pathlib import Path

import cdbx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pqmail.config.control import (
    CONF_SPAWN,
    Route,
    badmailfrom_matches,
    load_control,
    rcpthosts_allows,
    read_lines,
    read_lines_or_none,
    read_value,
    smtproute_for,
    smtproute_match,
)
from pqmail.config.smtproutes import parse_relay, parse_smtproutes
from pqmail.errors import ConfigError
from pqmail.paths import Root


def make_root(tmp_path: Path, files: dict[str, str | bytes]) -> Root:
    control = tmp_path / "control"
    control.mkdir(exist_ok=True)
    for name, content in files.items():
        data = content.encode("latin-1") if isinstance(content, str) else content
        (control / name).write_bytes(data)
    return Root(tmp_path)


# ----------------------------------------------------------------------------- read_lines / read_value

@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"a\nb\n", [(1, "a"), (2, "b")]),
        (b"a\nb", [(1, "a"), (2, "b")]),  # no final LF
        (b"a  \t \nb\t\n", [(1, "a"), (2, "b")]),  # trailing space and tab stripped
        (b"\n\n  \na\n", [(4, "a")]),  # empty and blank lines skipped, numbering kept
        (b"#c\n a\n", [(2, " a")]),  # leading whitespace kept
        (b" #not a comment\n", [(1, " #not a comment")]),  # '#' only counts as the first character
        (b"x#y\n", [(1, "x#y")]),
        (b"a\r\n", [(1, "a\r")]),  # CR is not whitespace to control_readfile
        (b"caf\xe9\n", [(1, "café")]),  # latin-1, 8-bit clean
        (b"", []),
        (b"#only\n#comments", []),
    ],
)
def test_read_lines_rules(tmp_path: Path, data: bytes, expected: list) -> None:
    p = tmp_path / "f"
    p.write_bytes(data)
    assert read_lines(p) == expected
    assert read_lines_or_none(p) == expected


def test_read_lines_missing(tmp_path: Path) -> None:
    assert read_lines(tmp_path / "nope") == []
    assert read_lines_or_none(tmp_path / "nope") is None


def test_nul_byte_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "rcpthosts"
    p.write_bytes(b"a\n#ok\nb\0c\n")
    with pytest.raises(ConfigError) as e:
        read_lines(p)
    assert e.value.line == 3
    assert str(e.value) == f"{p}:3: contains a NUL byte"


def test_nul_in_comment_is_still_an_error(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"#x\0\n")
    with pytest.raises(ConfigError, match=":1: contains a NUL"):
        read_lines(p)


def test_unreadable_file_is_config_error(tmp_path: Path) -> None:
    p = tmp_path / "locals"
    p.mkdir()  # a directory where a file should be: unreadable even for root
    with pytest.raises(ConfigError) as e:
        read_lines(p)
    assert str(p) in str(e.value)
    with pytest.raises(ConfigError):
        read_value(p)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads mode-000 files")
def test_permission_denied_is_config_error(tmp_path: Path) -> None:
    p = tmp_path / "me"
    p.write_text("x\n")
    p.chmod(0)
    with pytest.raises(ConfigError, match="Permission denied"):
        read_value(p)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"mx.example.net\n", "mx.example.net"),
        (b"mx.example.net \t\nsecond\n", "mx.example.net"),  # only the first line counts
        (b"#looks like a comment\n", "#looks like a comment"),  # not for single values
        (b"\nsecond\n", ""),  # an empty first line is the value
        (b"", ""),
        (b"  lead", "  lead"),
        (b"x\nsecond\0line", "x"),  # qmail never reads past the first line
    ],
)
def test_read_value(tmp_path: Path, data: bytes, expected: str) -> None:
    p = tmp_path / "v"
    p.write_bytes(data)
    assert read_value(p) == expected


def test_read_value_missing_and_nul(tmp_path: Path) -> None:
    assert read_value(tmp_path / "none") is None
    (tmp_path / "me").write_bytes(b"a\0b\n")
    with pytest.raises(ConfigError, match=r"me:1: contains a NUL byte"):
        read_value(tmp_path / "me")


@given(st.binary(max_size=300).filter(lambda b: b"\0" not in b))
def test_read_lines_model(data: bytes) -> None:
    """Against a direct statement of control_readfile: every kept line, and only those."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "f"
        p.write_bytes(data)
        got = read_lines(p)
    raw = data.split(b"\n")
    if raw[-1] == b"":
        raw.pop()
    expected = []
    for n, line in enumerate(raw, 1):
        text = line.rstrip(b" \t").decode("latin-1")
        if text and text[0] != "#":
            expected.append((n, text))
    assert got == expected
    for _, text in got:
        assert text and not text.startswith("#") and text[-1] not in " \t\n"


@given(st.binary(max_size=100), st.integers(min_value=0, max_value=100))
def test_read_lines_nul_always_rejected(data: bytes, pos: int) -> None:
    import tempfile

    pos = min(pos, len(data))
    data = data[:pos] + b"\0" + data[pos:]
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "f"
        p.write_bytes(data)
        with pytest.raises(ConfigError) as e:
            read_lines(p)
    assert e.value.line == data[:pos].count(b"\n") + 1


# ----------------------------------------------------------------------------- load_control defaults

ME_DERIVED = ["bouncehost", "doublebouncehost", "envnoathost", "helohost", "localiphost", "smtpgreeting",
              "defaultdomain", "defaulthost", "idhost", "plusdomain"]
INT_DEFAULTS = {"concurrencylocal": 10, "concurrencyremote": 20, "databytes": 0, "queuelifetime": 604800,
                "timeoutconnect": 60, "timeoutremote": 1200, "timeoutsmtpd": 1200}


def test_defaults_from_me(tmp_path: Path) -> None:
    c = load_control(make_root(tmp_path, {"me": "mx.isp.test\n", "rcpthosts": ""}))
    assert c.me == "mx.isp.test"
    for name in ME_DERIVED:
        assert getattr(c, name) == "mx.isp.test", name
        assert c.sources[name] == "control/me"
    assert c.bouncefrom == "MAILER-DAEMON"
    assert c.doublebounceto == "postmaster"
    for name, value in INT_DEFAULTS.items():
        assert getattr(c, name) == value, name
        assert c.sources[name] == "default"
    assert c.locals == {"mx.isp.test"}  # locals absent: me
    assert c.locals_present is False
    assert c.sources["locals"] == "control/me"
    assert c.virtualdomains == {} and c.smtproutes == {} and c.percenthack == frozenset()
    assert c.badmailfrom == frozenset()
    assert c.unset == frozenset()
    assert c.warnings == ()


def test_me_missing_gives_qmail_placeholders(tmp_path: Path) -> None:
    c = load_control(make_root(tmp_path, {"rcpthosts": "a.example\n"}))
    assert c.me is None
    for name in ME_DERIVED:
        assert getattr(c, name) == name  # qmail's literal placeholders
        assert name in c.unset
    assert c.locals == frozenset() and "locals" in c.unset
    assert any("control/me: missing" in w for w in c.warnings)


def test_files_override_defaults(tmp_path: Path) -> None:
    files = {name: f"{name}.example\n" for name in ME_DERIVED}
    files.update({name: f"{n + 1}\n" for name, n in INT_DEFAULTS.items()})
    files.update({"me": "mx.isp.test", "bouncefrom": "bounces", "doublebounceto": "hostmaster",
                  "rcpthosts": ""})
    c = load_control(make_root(tmp_path, files))
    for name in ME_DERIVED:
        assert getattr(c, name) == f"{name}.example"
        assert c.sources[name] == f"control/{name}"
    for name, n in INT_DEFAULTS.items():
        assert getattr(c, name) == n + 1
    assert (c.bouncefrom, c.doublebounceto) == ("bounces", "hostmaster")


@pytest.mark.parametrize(
    ("text", "value", "warned"),
    [
        ("5000\n", 5000, False),
        ("007\n", 7, False),
        ("0\n", 0, False),
        ("10M\n", 10, True),  # the decimal prefix, as scan_ulong reads it
        ("12 # bytes\n", 12, True),
        ("abc\n", 0, True),  # no leading digit: the default stays
        (" 5\n", 0, True),  # scan_ulong does not skip spaces
        ("-5\n", 0, True),
        ("\n", 0, True),
        ("#99\n99\n", 0, True),
        ("5\t\n", 5, False),  # trailing whitespace is stripped first
    ],
)
def test_numbers(tmp_path: Path, text: str, value: int, warned: bool) -> None:
    c = load_control(make_root(tmp_path, {"me": "h", "rcpthosts": "", "databytes": text}))
    assert c.databytes == value
    ours = [w for w in c.warnings if "databytes" in w]
    assert bool(ours) == warned
    if warned:
        assert ours[0].startswith(f"{tmp_path / 'control' / 'databytes'}:1: ")


@pytest.mark.parametrize("name", ["concurrencylocal", "concurrencyremote"])
def test_concurrency_capped(tmp_path: Path, name: str) -> None:
    c = load_control(make_root(tmp_path, {"me": "h", "rcpthosts": "", name: "500\n"}))
    assert getattr(c, name) == CONF_SPAWN
    assert any(name in w and "120" in w for w in c.warnings)
    c = load_control(make_root(tmp_path, {name: "120\n"}))
    assert getattr(c, name) == 120


def test_locals_present_but_empty_means_no_local_domain(tmp_path: Path) -> None:
    c = load_control(make_root(tmp_path, {"me": "mx.isp.test", "locals": "# none\n", "rcpthosts": ""}))
    assert c.locals == frozenset()
    assert c.locals_present is True


def test_lists_are_lowercased(tmp_path: Path) -> None:
    c = load_control(make_root(tmp_path, {
        "me": "h", "locals": "Mx.ISP.test\nlocalhost\n", "rcpthosts": "Example.COM\n.Example.com\n",
        "percenthack": "GW.example\n", "badmailfrom": "Spam@Example.org\n@Bad.EXAMPLE\n",
        "virtualdomains": "ÄB.Example:Pre\n",
    }))
    assert c.virtualdomains == {"Äb.example": "Pre"}  # ASCII case only, as qmail's constmap
    assert c.locals == {"mx.isp.test", "localhost"}
    assert c.rcpthosts == {"example.com", ".example.com"}
    assert c.percenthack == {"gw.example"}
    assert c.badmailfrom == {"spam@example.org", "@bad.example"}


def test_empty_me_warns(tmp_path: Path) -> None:
    c = load_control(make_root(tmp_path, {"me": "\n", "rcpthosts": ""}))
    assert c.me == "" and c.helohost == ""
    assert any("me:1: empty" in w for w in c.warnings)


def test_cr_and_whitespace_warnings(tmp_path: Path) -> None:
    c = load_control(make_root(tmp_path, {"me": "h", "rcpthosts": "ok.example\nwin.example\r\n"
                                          " lead.example\nsp ace.example\n"}))
    assert "win.example\r" in c.rcpthosts  # loaded as qmail would ...
    w = "\n".join(c.warnings)  # ... but reported, with file:line
    rh = tmp_path / "control" / "rcpthosts"
    assert f"{rh}:2: line contains a carriage return" in w
    assert f"{rh}:3: leading whitespace" in w
    assert f"{rh}:4: 'sp ace.example' contains whitespace" in w


def test_nul_in_any_control_file_fails_load(tmp_path: Path) -> None:
    root = make_root(tmp_path, {"me": "h", "rcpthosts": "", "virtualdomains": "a:b\nc\0:d\n"})
    with pytest.raises(ConfigError, match=r"virtualdomains:2: contains a NUL byte"):
        load_control(root)


# ----------------------------------------------------------------------------- virtualdomains

def test_virtualdomains_parsing(tmp_path: Path) -> None:
    root = make_root(tmp_path, {"me": "h", "rcpthosts": "", "virtualdomains": (
        "Example.COM:Ex1\n"
        "no-colon-here\n"
        ".example.net:net:with:colons\n"
        "joe@Example.org:joe-org\n"
        "except.example.com:\n"
        ":catchall\n"
        "EXAMPLE.com:ex2\n"  # later line wins, key case ignored
    )})
    c = load_control(root)
    assert c.virtualdomains == {
        "example.com": "ex2",
        ".example.net": "net:with:colons",
        "joe@example.org": "joe-org",
        "except.example.com": "",
        "": "catchall",
    }
    vd = root.control / "virtualdomains"
    assert f"{vd}:2: no ':' in 'no-colon-here'; qmail ignores this line" in c.warnings


# ----------------------------------------------------------------------------- rcpthosts

@pytest.mark.parametrize(
    ("domain", "allowed"),
    [
        ("example.com", True),
        ("EXAMPLE.Com", True),  # lowercased
        ("a.b.example.com", False),  # .example.com not listed; example.com does not cover subdomains
        ("sub.example.net", True),  # .example.net covers hosts below ...
        ("example.net", False),  # ... but not example.net itself
        ("deep.sub.example.net", True),
        ("example.org", False),
        ("", False),
        ("com", False),
        ("more.example", True),  # morercpthosts.cdb
        ("x.more.example", False),
        ("y.moresub.example", True),  # .moresub.example in the cdb
    ],
)
def test_rcpthosts_allows(tmp_path: Path, domain: str, allowed: bool) -> None:
    root = make_root(tmp_path, {"me": "h", "rcpthosts": "example.com\n.example.net\n",
                                "morercpthosts": "more.example\n.moresub.example\n"})
    maker = cdbx.CDB.make(str(root.control / "morercpthosts.cdb"))
    maker.add(b"more.example", b"")
    maker.add(b".moresub.example", b"")
    maker.commit().close()
    c = load_control(root)
    assert c.morercpthosts_cdb == root.control / "morercpthosts.cdb"
    assert rcpthosts_allows(c, domain) is allowed


def test_no_rcpthosts_is_never_an_open_relay(tmp_path: Path) -> None:
    c = load_control(make_root(tmp_path, {"me": "mx.isp.test"}))
    assert c.rcpthosts is None
    assert not rcpthosts_allows(c, "mx.isp.test")
    assert not rcpthosts_allows(c, "anything.example")
    assert any("rcpthosts: missing" in w for w in c.warnings)


def test_morercpthosts_cdb_removed_after_load(tmp_path: Path) -> None:
    root = make_root(tmp_path, {"me": "h", "rcpthosts": "", "morercpthosts": "more.example\n"})
    maker = cdbx.CDB.make(str(root.control / "morercpthosts.cdb"))
    maker.add(b"more.example", b"")
    maker.commit().close()
    c = load_control(root)
    assert rcpthosts_allows(c, "more.example")
    (root.control / "morercpthosts.cdb").unlink()
    assert not rcpthosts_allows(c, "more.example")


def test_morercpthosts_consistency_warnings(tmp_path: Path) -> None:
    root = make_root(tmp_path, {"me": "h", "rcpthosts": "", "morercpthosts": "more.example\n"})
    c = load_control(root)
    assert c.morercpthosts == {"more.example"} and c.morercpthosts_cdb is None
    assert any("morercpthosts.cdb does not" in w for w in c.warnings)
    cdb = root.control / "morercpthosts.cdb"
    maker = cdbx.CDB.make(str(cdb))
    maker.commit().close()
    os.utime(cdb, (1000, 1000))
    assert any("older than morercpthosts" in w for w in load_control(root).warnings)
    (root.control / "morercpthosts").unlink()
    assert any("exists but morercpthosts does not" in w for w in load_control(root).warnings)


# ----------------------------------------------------------------------------- badmailfrom

@pytest.mark.parametrize(
    ("sender", "bad"),
    [
        ("spam@example.org", True),
        ("SPAM@Example.ORG", True),
        ("other@example.org", False),
        ("anyone@bad.example", True),  # @domain line
        ("x@y@BAD.example", True),  # domain after the last @
        ("anyone@sub.bad.example", False),  # no suffix matching in badmailfrom
        ("bad.example", False),
        ("", False),
    ],
)
def test_badmailfrom(tmp_path: Path, sender: str, bad: bool) -> None:
    c = load_control(make_root(tmp_path, {"me": "h", "rcpthosts": "",
                                          "badmailfrom": "Spam@example.org\n@bad.example\n"}))
    assert badmailfrom_matches(c, sender) is bad


# ----------------------------------------------------------------------------- smtproutes

@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("relay.isp.net", Route("relay.isp.net", 25)),
        ("relay.isp.net:2525", Route("relay.isp.net", 2525)),
        ("10.0.0.5", Route("10.0.0.5", 25)),
        ("10.0.0.5:26", Route("10.0.0.5", 26)),
        ("[10.0.0.5]", Route("10.0.0.5", 25)),
        ("[10.0.0.5]:2525", Route("10.0.0.5", 2525)),
        ("[2001:db8::1]", Route("2001:db8::1", 25)),
        ("[2001:db8::1]:2525", Route("2001:db8::1", 2525)),
        ("[IPv6:2001:db8::1]:587", Route("2001:db8::1", 587)),
        ("2001:db8::1", Route("2001:db8::1", 25)),  # unbracketed IPv6: no port possible
        ("::1", Route("::1", 25)),
        ("", None),
    ],
)
def test_parse_relay(value: str, expected: Route | None) -> None:
    assert parse_relay(value, "smtproutes", 1) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("relay:abc", "bad port 'abc'"),
        ("relay:", "bad port ''"),
        ("relay:0", "port 0 out of range"),
        ("relay:65536", "port 65536 out of range"),
        ("relay:25x", "bad port '25x'"),
        ("relay:+25", "bad port '+25'"),
        ("relay:２５", "bad port"),  # non-ASCII digits are not a port
        (":25", "empty host name"),
        ("a:b:25", "too many colons"),
        ("[10.0.0.5", "without ']'"),
        ("[relay.isp.net]", "is not an IP address"),
        ("[10.0.0.5]x", "unexpected text after ']'"),
        ("[10.0.0.5]:x", "bad port 'x'"),
        ("relay isp", "whitespace"),
        (" relay", "whitespace"),
    ],
)
def test_parse_relay_errors(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        parse_relay(value, "control/smtproutes", 7)
    assert str(e.value).startswith("control/smtproutes:7: ")


def test_smtproutes_bad_port_fails_load_with_line(tmp_path: Path) -> None:
    root = make_root(tmp_path, {"me": "h", "rcpthosts": "",
                                "smtproutes": "# routes\na.example:relay\nb.example:relay:99999\n"})
    with pytest.raises(ConfigError) as e:
        load_control(root)
    assert str(e.value) == f"{root.control / 'smtproutes'}:3: port 99999 out of range (want 1-65535)"


SMTPROUTES = (
    "second-example.com:relay.isp.net:2525\n"
    ".example.com:sub-relay\n"
    "direct.example.com:\n"
    "Example.COM:old\n"
    "example.com:top-relay\n"  # later line wins
    ":smarthost.isp.net\n"
    "[192.0.2.1]:literal-relay\n"
    "broken-line-without-colon\n"
)


@pytest.mark.parametrize(
    ("host", "key", "route"),
    [
        ("second-example.com", "second-example.com", Route("relay.isp.net", 2525)),
        ("SECOND-Example.com", "second-example.com", Route("relay.isp.net", 2525)),
        ("example.com", "example.com", Route("top-relay")),
        ("a.example.com", ".example.com", Route("sub-relay")),  # suffix, not example.com
        ("x.a.example.com", ".example.com", Route("sub-relay")),
        ("direct.example.com", "direct.example.com", None),  # exception beats the wider route
        ("x.direct.example.com", ".example.com", Route("sub-relay")),
        ("other.org", "", Route("smarthost.isp.net")),  # default route
        ("[192.0.2.1]", "[192.0.2.1]", Route("literal-relay")),
    ],
)
def test_smtproute_lookup(tmp_path: Path, host: str, key: str, route: Route | None) -> None:
    c = load_control(make_root(tmp_path, {"me": "h", "rcpthosts": "", "smtproutes": SMTPROUTES}))
    assert smtproute_match(c, host) == (key, route)
    assert smtproute_for(c, host) == route
    assert any("smtproutes:8: no ':'" in w for w in c.warnings)


def test_smtproute_longest_suffix_first_and_no_default(tmp_path: Path) -> None:
    routes, _ = parse_smtproutes([(1, ".com:com-relay"), (2, ".b.example.com:b-relay"),
                                  (3, ".example.com:ex-relay")], "smtproutes")
    c = load_control(make_root(tmp_path, {"me": "h", "rcpthosts": "", "smtproutes":
                                          ".com:com-relay\n.b.example.com:b-relay\n.example.com:ex-relay\n"}))
    assert c.smtproutes == routes
    assert smtproute_for(c, "a.b.example.com") == Route("b-relay")
    assert smtproute_for(c, "c.example.com") == Route("ex-relay")
    assert smtproute_for(c, "x.com") == Route("com-relay")
    assert smtproute_for(c, "x.org") is None  # no line, no default: MX


hostnames = st.text(string.ascii_lowercase + string.digits + "-.", min_size=1, max_size=30).filter(
    lambda h: ":" not in h)


@given(hostnames, st.integers(min_value=1, max_value=65535))
def test_route_text_round_trips(host: str, port: int) -> None:
    r = parse_relay(f"{host}:{port}", "smtproutes", 1)
    assert r == Route(host, port)
    assert parse_relay(str(r), "smtproutes", 1) == r


@given(st.text(max_size=40))
def test_parse_relay_never_crashes(value: str) -> None:
    """Any text is either a usable route (port in range, host non-empty) or a ConfigError."""
    try:
        r = parse_relay(value, "smtproutes", 1)
    except ConfigError as e:
        assert e.line == 1
        return
    if value == "":
        assert r is None
        return
    assert r is not None and r.host and 1 <= r.port <= 65535
    assert not any(c.isspace() for c in r.host)


def test_control_stamp_changes_when_a_file_is_replaced(tmp_path: Path) -> None:
    from pqmail.config.control import control_stamp

    root = make_root(tmp_path, {"me": "h", "rcpthosts": "a.example\n"})
    before = control_stamp(root)
    assert [s[0] for s in before] == ["me", "rcpthosts"]
    assert control_stamp(root) == before
    tmp = root.control / "rcpthosts.tmp"
    tmp.write_text("a.example\nb.example\n")
    tmp.replace(root.control / "rcpthosts")  # how every editor of pqmail writes it: rename
    after = control_stamp(root)
    assert after != before
    assert rcpthosts_allows(load_control(root), "b.example")


def test_config_modules_are_pure() -> None:
    """No sockets, no asyncio, no subprocesses in the configuration layer."""
    import ast

    import pqmail.config.casefold
    import pqmail.config.control
    import pqmail.config.smtproutes

    for mod in (pqmail.config.control, pqmail.config.smtproutes, pqmail.config.casefold):
        tree = ast.parse(Path(mod.__file__).read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not names & {"socket", "asyncio", "subprocess", "ssl", "aiosmtplib", "dns"}, mod.__name__
