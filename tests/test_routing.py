"""Routing core: every pure rule of qmail-semantics.md §1-3, table by table, plus hypothesis."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pqmail import routing
from pqmail.config.control import Control, load_control
from pqmail.paths import Root
from pqmail.routing import (
    LocalRoute,
    RemoteRoute,
    dotqmail_candidates,
    local_route,
    owner_files,
    rewrite_recipient,
    route,
    safe_ext,
    split_address,
    strip_vdom_prefix,
    verp_expand,
)


def control_from(tmp: Path, files: dict[str, str]) -> Control:
    (tmp / "control").mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (tmp / "control" / name).write_text(text, encoding="latin-1")
    return load_control(Root(tmp))


BASE = {
    "me": "mx.isp.test\n",
    "rcpthosts": "",
    "envnoathost": "envnoat.example\n",
    "locals": "mx.isp.test\nlocalhost\n",
    "percenthack": "gw.example\nC.example\n",
    "virtualdomains": (
        "example.com:ex1\n"
        ".example.com:sub1\n"
        ".b.example.com:b1\n"
        ".com:dotcom\n"
        "except.example.com:\n"
        "joe@virtual.example:joeprefix\n"
        "Virtual.Example:virt\n"
        "mx.isp.test:never-used\n"  # locals come first
        "later.example:first\n"
        "LATER.example:second\n"  # later line wins
    ),
}


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Control:
    return control_from(tmp_path_factory.mktemp("c"), BASE)


@pytest.fixture(scope="module")
def catchall(tmp_path_factory: pytest.TempPathFactory) -> Control:
    files = dict(BASE, virtualdomains=BASE["virtualdomains"] + ":catch\n")
    return control_from(tmp_path_factory.mktemp("c"), files)


# ----------------------------------------------------------------------------- §1 rewrite()

REWRITES = [
    # (recipient, rewritten, is_local, rule, key)
    ("joe@example.com", "ex1-joe@example.com", True, "virtualdomains", "example.com"),
    ("Joe@Example.COM", "ex1-Joe@Example.COM", True, "virtualdomains", "example.com"),  # case kept
    ("joe@a.example.com", "sub1-joe@a.example.com", True, "virtualdomains", ".example.com"),
    ("joe@a.b.example.com", "b1-joe@a.b.example.com", True, "virtualdomains", ".b.example.com"),
    ("joe@b.example.com", "sub1-joe@b.example.com", True, "virtualdomains", ".example.com"),
    ("joe@other.com", "dotcom-joe@other.com", True, "virtualdomains", ".com"),
    ("joe@except.example.com", "joe@except.example.com", False, "exception", "except.example.com"),
    ("joe@x.except.example.com", "sub1-joe@x.except.example.com", True, "virtualdomains", ".example.com"),
    ("joe@virtual.example", "joeprefix-joe@virtual.example", True, "virtualdomains", "joe@virtual.example"),
    ("JOE@Virtual.EXAMPLE", "joeprefix-JOE@Virtual.EXAMPLE", True, "virtualdomains", "joe@virtual.example"),
    ("ann@virtual.example", "virt-ann@virtual.example", True, "virtualdomains", "virtual.example"),
    ("x@later.example", "second-x@later.example", True, "virtualdomains", "later.example"),
    ("joe@mx.isp.test", "joe@mx.isp.test", True, "locals", "mx.isp.test"),
    ("Joe@MX.Isp.Test", "Joe@MX.Isp.Test", True, "locals", "mx.isp.test"),
    ("joe@sub.mx.isp.test", "joe@sub.mx.isp.test", False, "remote", None),  # locals: exact only
    ("joe@example.org", "joe@example.org", False, "remote", None),
    ("joe", "joe@envnoat.example", False, "remote", None),  # envnoathost
    ("a@b@example.com", "ex1-a@b@example.com", True, "virtualdomains", "example.com"),  # last @
    ("@example.com", "ex1-@example.com", True, "virtualdomains", "example.com"),
    ("joe@", "joe@", False, "remote", None),
    # percenthack: the LAST % becomes @, repeatedly while the new domain is listed, before locals
    ("a%b%c@gw.example", "a%b@c", False, "remote", None),
    ("x%y%c.example@gw.example", "x@y", False, "remote", None),
    ("a%b@GW.Example", "a@b", False, "remote", None),
    ("joe%mx.isp.test@gw.example", "joe@mx.isp.test", True, "locals", "mx.isp.test"),
    ("joe%example.com@gw.example", "ex1-joe@example.com", True, "virtualdomains", "example.com"),
    ("nopercent@gw.example", "nopercent@gw.example", False, "remote", None),
    ("a%b@notlisted.example", "a%b@notlisted.example", False, "remote", None),
    ("%@gw.example", "@", False, "remote", None),
]


@pytest.mark.parametrize(("rcpt", "address", "is_local", "rule", "key"), REWRITES)
def test_rewrite(control: Control, rcpt: str, address: str, is_local: bool, rule: str,
                 key: str | None) -> None:
    rw = rewrite_recipient(control, rcpt)
    assert (rw.address, rw.is_local, rw.rule, rw.key) == (address, is_local, rule, key)


def test_envnoathost_then_virtualdomains(tmp_path: Path) -> None:
    c = control_from(tmp_path, dict(BASE, envnoathost="Example.com\n"))
    rw = rewrite_recipient(c, "joe")
    assert (rw.address, rw.is_local) == ("ex1-joe@Example.com", True)
    assert rw.steps == ("no @: appended @Example.com (envnoathost)",)


def test_envnoathost_then_percenthack(tmp_path: Path) -> None:
    c = control_from(tmp_path, dict(BASE, envnoathost="gw.example\n"))
    assert rewrite_recipient(c, "joe%mx.isp.test").address == "joe@mx.isp.test"


@pytest.mark.parametrize(
    ("rcpt", "address", "is_local", "rule"),
    [
        ("x@other.org", "catch-x@other.org", True, "virtualdomains"),  # empty key: catch-all
        ("joe@example.com", "ex1-joe@example.com", True, "virtualdomains"),  # specific keys first
        ("joe@except.example.com", "joe@except.example.com", False, "exception"),
        ("joe@mx.isp.test", "joe@mx.isp.test", True, "locals"),
    ],
)
def test_rewrite_catchall(catchall: Control, rcpt: str, address: str, is_local: bool, rule: str) -> None:
    rw = rewrite_recipient(catchall, rcpt)
    assert (rw.address, rw.is_local, rw.rule) == (address, is_local, rule)


def test_empty_catchall_is_an_exception(tmp_path: Path) -> None:
    c = control_from(tmp_path, dict(BASE, virtualdomains="example.com:ex1\n:\n"))
    rw = rewrite_recipient(c, "x@other.org")
    assert (rw.address, rw.is_local, rw.rule, rw.key) == ("x@other.org", False, "exception", "")


@pytest.mark.parametrize(
    ("rcpt", "is_local"),
    [("joe@exÄmple.com", True), ("joe@EXÄMPLE.COM", True), ("joe@exämple.com", False)],
)
def test_only_ascii_case_is_ignored(tmp_path: Path, rcpt: str, is_local: bool) -> None:
    c = control_from(tmp_path, {"me": "h", "rcpthosts": "", "locals": "exÄmple.com\n"})
    assert rewrite_recipient(c, rcpt).is_local is is_local


def test_no_locals_no_me(tmp_path: Path) -> None:
    c = control_from(tmp_path, {"rcpthosts": "", "virtualdomains": "example.com:ex1\n"})
    assert rewrite_recipient(c, "joe@example.com").address == "ex1-joe@example.com"
    assert rewrite_recipient(c, "joe@localhost").is_local is False
    assert rewrite_recipient(c, "joe").address == "joe@envnoathost"  # qmail's placeholder


@pytest.mark.parametrize(
    ("addr", "parts"),
    [
        ("joe@example.com", ("joe", "example.com")),
        ("a@b@example.com", ("a@b", "example.com")),
        ("@example.com", ("", "example.com")),
        ("joe@", ("joe", "")),
        ("joe", ("joe", "")),
        ("", ("", "")),
    ],
)
def test_split_address(addr: str, parts: tuple[str, str]) -> None:
    assert split_address(addr) == parts


# ----------------------------------------------------------------------------- §1 undoing the prefix

@pytest.mark.parametrize(
    ("recipient", "shown"),
    [
        ("ex1-joe@example.com", "joe@example.com"),
        ("ex1-joe@Example.COM", "joe@Example.COM"),  # key lookup ignores case ...
        ("EX1-joe@example.com", "EX1-joe@example.com"),  # ... the prefix comparison does not
        ("ex1joe@example.com", "ex1joe@example.com"),  # prefix must be followed by '-'
        ("sub1-x@a.example.com", "x@a.example.com"),
        ("b1-x@a.b.example.com", "x@a.b.example.com"),
        ("sub1-x@except.example.com", "sub1-x@except.example.com"),  # exception stops the search
        ("virt-ann@virtual.example", "ann@virtual.example"),
        ("joeprefix-joe@virtual.example", "joeprefix-joe@virtual.example"),  # never the user@domain key
        ("joe@example.org", "joe@example.org"),
        ("ex1-joe", "ex1-joe"),
        ("ex1-a@b@example.com", "a@b@example.com"),
    ],
)
def test_strip_vdom_prefix(control: Control, recipient: str, shown: str) -> None:
    assert strip_vdom_prefix(control, recipient) == shown


def test_strip_vdom_prefix_catchall(catchall: Control) -> None:
    assert strip_vdom_prefix(catchall, "catch-x@other.org") == "x@other.org"


# ----------------------------------------------------------------------------- §3.8 VERP

@pytest.mark.parametrize(
    ("sender", "recipient", "expanded"),
    [
        ("list-owner-@ex.org-@[]", "bob@x.net", "list-owner-bob=x.net@ex.org"),
        ("list-owner-@ex.org-@[]", "Bob@X.Net", "list-owner-Bob=X.Net@ex.org"),
        ("list-owner-@ex.org-@[]", "a@b@x.net", "list-owner-a@b=x.net@ex.org"),  # last @ of recipient
        ("a@b-owner-@ex.org-@[]", "bob@x.net", "a@b-owner-bob=x.net@ex.org"),  # last @ of sender
        ("list-owner-@ex.org-@[]", "bob", "list-owner-@ex.org-@[]"),  # recipient without @
        ("pre@-@[]", "bob@x", "prebob=x@"),
        ("nohost-@[]", "bob@x", "nohost-@[]"),  # no @ before -@[]
        ("-@[]", "bob@x", "-@[]"),
        ("plain@ex.org", "bob@x.net", "plain@ex.org"),
        ("", "bob@x.net", ""),
        ("#@[]", "bob@x.net", "#@[]"),
    ],
)
def test_verp_expand(sender: str, recipient: str, expanded: str) -> None:
    assert verp_expand(sender, recipient) == expanded


# ----------------------------------------------------------------------------- §1 qmail-inject

@pytest.mark.parametrize(
    ("addr", "qualified"),
    [
        ("joe", "joe@dhost.example"),  # defaulthost
        ("joe@mail+", "joe@mail.plus.example"),  # plusdomain
        ("joe@a.b+", "joe@a.b.plus.example"),
        ("joe@mail", "joe@mail.ddom.example"),  # defaultdomain
        ("joe@example.com", "joe@example.com"),
        ("joe@[192.0.2.1]", "joe@[192.0.2.1]"),  # a literal gets no domain
        ("joe@example.com.", "joe@example.com"),  # final dot dropped
        ("joe@", "joe@dhost.example"),  # final @ dropped
        ("a@b@mail", "a@b@mail.ddom.example"),
        ("", ""),  # <> is not rewritten
        ("#@[]", "#@[]"),
        ("x@[]", "x@[]"),
    ],
)
def test_inject_qualify(addr: str, qualified: str) -> None:
    assert routing.inject_qualify(addr, "dhost.example", "ddom.example", "plus.example") == qualified


def test_inject_qualify_defaulthost_without_dot() -> None:
    # the host added for a missing @ is itself checked for a dot, as qmail-inject does
    assert routing.inject_qualify("joe", "mx", "isp.test", "p") == "joe@mx.isp.test"
    assert routing.inject_qualify("joe", "mx+", "isp.test", "p.test") == "joe@mx.p.test"


# ----------------------------------------------------------------------------- §3.1 dot-qmail names

CANDIDATES = [
    # the table of qmail-semantics.md §3.1
    ("-", "foo-bar", [".qmail-foo-bar", ".qmail-foo-default", ".qmail-default"]),
    ("-", "a-b-c", [".qmail-a-b-c", ".qmail-a-b-default", ".qmail-a-default", ".qmail-default"]),
    ("-", "a-", [".qmail-a-", ".qmail-a-default", ".qmail-default"]),
    ("-", "", [".qmail-", ".qmail-default"]),
    ("", "", [".qmail", ".qmaildefault"]),
    ("-", "Joe.Smith", [".qmail-joe:smith", ".qmail-default"]),
    # qmail-local.c's own comments
    ("-", "a", [".qmail-a", ".qmail-default"]),
    ("-", "a-b-", [".qmail-a-b-", ".qmail-a-b-default", ".qmail-a-default", ".qmail-default"]),
    ("-/", "a-b", [".qmail-/a-b", ".qmail-/a-default", ".qmail-/default"]),  # admin's subdirectory dash
    # more
    ("", "foo", [".qmailfoo", ".qmaildefault"]),
    ("-", "-", [".qmail--", ".qmail--default", ".qmail-default"]),
    ("-", "default", [".qmail-default"]),  # the same name once
    ("-", "FOO-Bar", [".qmail-foo-bar", ".qmail-foo-default", ".qmail-default"]),
    ("-", "ÄB", [".qmail-Äb", ".qmail-default"]),  # ASCII-only lowercase, like case_lowerb
    # hostile local parts
    ("-", "../x", [".qmail-:::x", ".qmail-default"]),
    ("-", "..", [".qmail-::", ".qmail-default"]),
    ("-", "a/b", [".qmail-a:b", ".qmail-default"]),
    ("-", "/etc/passwd", [".qmail-:etc:passwd", ".qmail-default"]),
    ("-", ".qmail", [".qmail-:qmail", ".qmail-default"]),
    ("-", "a\0b", [".qmail-a:b", ".qmail-default"]),
    ("-", "a\nb\r\x7f", [".qmail-a:b::", ".qmail-default"]),
    ("-", "x" * 300, [".qmail-default"]),  # longer than NAME_MAX: cannot exist
    ("-", "a-" + "x" * 300, [".qmail-a-default", ".qmail-default"]),
]


@pytest.mark.parametrize(("dash", "ext", "names"), CANDIDATES)
def test_dotqmail_candidates(dash: str, ext: str, names: list[str]) -> None:
    assert [n for n, _ in dotqmail_candidates(dash, ext)] == names


@pytest.mark.parametrize(
    ("dash", "ext", "defaults"),
    [
        ("-", "foo-Bar", [None, "Bar", "foo-Bar"]),  # original case of ext
        ("-", "a-B-c", [None, "c", "B-c", "a-B-c"]),
        ("-", "a-", [None, "", "a-"]),
        ("-", "", [None, ""]),
        ("", "", [None, ""]),
        ("-", "Joe.Smith", [None, "Joe.Smith"]),
        ("-", "X-DEFAULT", ["DEFAULT", "X-DEFAULT"]),  # the exact name ends in "default" too
        ("-", "list-Default", ["Default", "list-Default"]),
        ("-", "default", ["default"]),
        ("-", "a.b-C.D", [None, "C.D", "a.b-C.D"]),
    ],
)
def test_default_values(dash: str, ext: str, defaults: list[str | None]) -> None:
    assert [d for _, d in dotqmail_candidates(dash, ext)] == defaults


def test_owner_files() -> None:
    assert owner_files("-", "List.X") == (".qmail-list:x-owner", ".qmail-list:x-owner-default")
    assert owner_files("", "") == (".qmail-owner", ".qmail-owner-default")


def _on_disk_size(name: str) -> int:
    """Bytes of the name as a latin-1 file name (or UTF-8 for text outside latin-1)."""
    try:
        return len(name.encode("latin-1"))
    except UnicodeEncodeError:
        return len(name.encode("utf-8", "surrogatepass"))


@given(st.sampled_from(["", "-"]), st.text(max_size=400))
@example("-", "../../etc/passwd")
@example("-", "\0")
@example("", "..")
@example("-", "/")
def test_candidates_stay_in_home(dash: str, ext: str) -> None:
    """For any extension, every candidate is one safe file name inside the home directory."""
    cands = dotqmail_candidates(dash, ext)
    names = [n for n, _ in cands]
    assert len(names) == len(set(names))
    assert names[-1] == f".qmail{dash}default"  # the catch-all is always tried last
    assert cands[-1][1] == ext
    for name, default in cands:
        assert name.startswith(".qmail")
        assert "/" not in name and "\0" not in name
        assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in name)
        assert name not in (".", "..")
        assert Path("/home/u", name).parent == Path("/home/u")
        assert _on_disk_size(name) <= 255
        if default is not None:
            # DEFAULT is the original-case tail of ext that "default" stands for
            assert ext.endswith(default)
            head = ext[: len(ext) - len(default)]
            assert name == f".qmail{dash}{safe_ext(head)}default"


@given(st.text(max_size=200))
def test_safe_ext_is_length_preserving(ext: str) -> None:
    s = safe_ext(ext)
    assert len(s) == len(ext)
    assert "." not in s and "/" not in s and "\0" not in s
    assert s == s.translate({c: c + 32 for c in range(65, 91)})


# ----------------------------------------------------------------------------- hypothesis on rewrite()

local_parts = st.text(st.characters(exclude_characters="@", exclude_categories=("Cs",)), max_size=20)
domains = st.sampled_from(["example.com", "Example.COM", "a.example.com", "a.b.example.com", "other.com",
                           "except.example.com", "virtual.example", "mx.isp.test", "example.org",
                           "later.example", "gw.example", ""])


@given(local_parts, domains)
def test_rewrite_properties(control: Control, local: str, domain: str) -> None:
    addr = f"{local}@{domain}"
    rw = rewrite_recipient(control, addr)
    if rw.rule == "virtualdomains":
        assert rw.is_local
        assert rw.prefix and rw.address == f"{rw.prefix}-{addr}"  # original case kept
        if rw.key != addr.lower():
            assert strip_vdom_prefix(control, rw.address) == addr  # bounces show the original
    elif rw.rule == "locals":
        assert rw.is_local and split_address(rw.address)[1].lower() in control.locals
    else:
        assert not rw.is_local
    if "%" not in local:
        assert rw.address.endswith(addr)


# ----------------------------------------------------------------------------- route()

@dataclass(frozen=True)
class Entry:
    """Same fields as pqmail.config.assign.AssignEntry."""

    user: str
    uid: int
    gid: int
    home: str
    dash: str
    ext: str


class FakeUsers:
    """A users/cdb stand-in: exact entries, then the longest wildcard prefix; rest keeps its case."""

    def __init__(self, exact: dict[str, Entry], wild: dict[str, Entry]) -> None:
        self.exact, self.wild = exact, wild
        self.asked: list[str] = []

    def lookup(self, local: str) -> Entry | None:
        self.asked.append(local)
        low = local.lower()
        if low in self.exact:
            return self.exact[low]
        for n in range(len(low), -1, -1):
            e = self.wild.get(low[:n])
            if e is not None:
                return Entry(e.user, e.uid, e.gid, e.home, e.dash, e.ext + local[n:])
        return None


HOME = "/m/e/ex1/DOMAINS/example.com"
USERS = FakeUsers(
    exact={"postmaster": Entry("alias", 7, 7, "/var/pqmail/alias", "-", "postmaster")},
    wild={"ex1-": Entry("popuser", 1001, 1001, HOME, "-", "")},
)


def test_route_virtual_user(control: Control) -> None:
    r = route(control, USERS, "Joe.Smith@Example.com")
    assert isinstance(r, LocalRoute)
    assert (r.address, r.local, r.domain) == ("ex1-Joe.Smith@Example.com", "ex1-Joe.Smith", "Example.com")
    assert r.entry == Entry("popuser", 1001, 1001, HOME, "-", "Joe.Smith")
    assert r.candidates == ((".qmail-joe:smith", None), (".qmail-default", "Joe.Smith"))
    assert r.rewrite is not None and r.rewrite.key == "example.com"
    assert not r.trash


def test_route_local_exact_and_unknown(control: Control) -> None:
    r = route(control, USERS, "Postmaster@mx.isp.test")
    assert isinstance(r, LocalRoute) and r.entry is not None and r.entry.user == "alias"
    assert [n for n, _ in r.candidates] == [".qmail-postmaster", ".qmail-default"]
    r = route(control, USERS, "nobody-here@localhost")
    assert isinstance(r, LocalRoute) and r.entry is None and r.candidates == ()  # getpw fallback


def test_route_trash_address(control: Control) -> None:
    users = FakeUsers({}, {"": Entry("alias", 7, 7, "/a", "-", "")})
    r = route(control, users, "@mx.isp.test")
    assert isinstance(r, LocalRoute) and r.trash and r.entry is None and r.candidates == ()
    assert users.asked == []  # qmail-lspawn does not even look it up


@pytest.mark.parametrize(
    ("rcpt", "address", "domain"),
    [
        ("bob@example.org", "bob@example.org", "example.org"),
        ("joe@except.example.com", "joe@except.example.com", "except.example.com"),
        ("a%b%c@gw.example", "a%b@c", "c"),
        ("x@[192.0.2.1]", "x@[192.0.2.1]", "[192.0.2.1]"),
    ],
)
def test_route_remote(control: Control, rcpt: str, address: str, domain: str) -> None:
    r = route(control, USERS, rcpt)
    assert isinstance(r, RemoteRoute)
    assert (r.address, r.domain) == (address, domain)


@pytest.mark.parametrize("local", ["../x", "a/b", ".qmail", "x\0y", "\x01\x02", "../../etc/passwd", "-",
                                   "a" * 5000])
def test_route_hostile_local_parts(control: Control, local: str) -> None:
    r = route(control, USERS, f"{local}@example.com")
    assert isinstance(r, LocalRoute) and r.entry is not None
    assert r.entry.ext == local
    assert r.candidates[-1] == (".qmail-default", local)
    for name, _ in r.candidates:
        assert "/" not in name and "\0" not in name and name.startswith(".qmail-")
        assert (Path(HOME) / name).parent == Path(HOME)


def test_local_route_does_not_rewrite_again(control: Control) -> None:
    rw = rewrite_recipient(control, "joe@example.com")
    r = local_route(USERS, rw.address)
    assert (r.local, r.entry.ext if r.entry else None) == ("ex1-joe", "joe")
    # route() takes the recipient as received; a rewritten address would be prefixed twice
    again = route(control, USERS, rw.address)
    assert again.address == "ex1-ex1-joe@example.com"


def test_module_is_pure() -> None:
    import ast

    tree = ast.parse(Path(routing.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"os", "socket", "asyncio", "subprocess", "io", "shutil"}
