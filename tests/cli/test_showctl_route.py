"""``pqmail showctl`` and ``pqmail route``, run as the operator runs them, on a hand-made tree."""

from __future__ import annotations

from pathlib import Path

import cdbx
import pytest

from conftest import run_pqmail


def write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("latin-1"))


def users_cdb(root: Path, exact: dict[str, list[str]], wild: dict[str, list[str]]) -> None:
    """users/cdb in qmail-newu's layout (qmail-semantics.md §2.2), written directly with cdbx."""
    (root / "users").mkdir(parents=True, exist_ok=True)
    maker = cdbx.CDB.make(str(root / "users" / "cdb"))
    for local, fields in exact.items():
        maker.add(b"!" + local.lower().encode("latin-1") + b"\0", "\0".join(fields).encode("latin-1"))
    for loc, fields in wild.items():
        maker.add(b"!" + loc.lower().encode("latin-1"), "\0".join(fields).encode("latin-1"))
    maker.add(b"", "".join(sorted({loc[-1] for loc in wild if loc})).encode("latin-1"))
    maker.commit().close()


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "root"
    home = tmp_path / "popmail" / "e" / "ex1" / "DOMAINS" / "example.com"
    home.mkdir(parents=True)
    c = root / "control"
    write(c / "me", "mx.isp.test\n")
    write(c / "locals", "mx.isp.test\nlocalhost\n")
    write(c / "rcpthosts", "example.com\n.example.com\nmx.isp.test\n")
    write(c / "virtualdomains", "# virtual domains\nexample.com:ex1\nexcept.example.com:\n")
    write(c / "smtproutes", "second-example.com:relay.isp.net:2525\n")
    write(c / "databytes", "10M\n")
    users_cdb(root,
              exact={"postmaster": ["alias", "7", "7", str(tmp_path / "alias"), "-", "postmaster"]},
              wild={"ex1-": ["popuser", "1001", "1001", str(home), "-", ""]})
    write(home / ".qmail-joe", "./Maildir/\n")
    write(home / ".qmail-default", "&postmaster@example.com\n")
    return {"root": root, "home": home, "control": c}


def pqmail(tree: dict[str, Path], *args: str, check: bool = True):
    return run_pqmail(*args, "--root", str(tree["root"]), check=check)


def lines(p) -> list[str]:
    return p.stdout.decode("latin-1").splitlines()


# ----------------------------------------------------------------------------- showctl

def test_showctl_values_and_sources(tree: dict[str, Path]) -> None:
    out = lines(pqmail(tree, "showctl"))
    by_name = {ln.split()[0]: ln for ln in out if ln and not ln.startswith(" ")}
    assert by_name["me"].split()[1:3] == ["mx.isp.test", "[control/me]"]
    assert by_name["helohost"].split()[1:4] == ["mx.isp.test", "[default:", "control/me]"]
    assert by_name["bouncefrom"].split()[1:3] == ["MAILER-DAEMON", "[default]"]
    assert by_name["databytes"].split()[1:3] == ["10", "[control/databytes]"]
    assert by_name["concurrencylocal"].split()[1:3] == ["10", "[default]"]
    text = "\n".join(out)
    assert "  example.com -> prefix ex1" in text
    assert "  except.example.com -> exception: not virtual" in text
    assert "  second-example.com -> relay.isp.net:2525" in text
    assert f"  {tree['control'] / 'databytes'}:1: '10M' read as 10" in text


def test_showctl_without_me_and_rcpthosts(tree: dict[str, Path]) -> None:
    (tree["control"] / "me").unlink()
    (tree["control"] / "rcpthosts").unlink()
    write(tree["control"] / "qmqpservers", "10.0.0.1\n")
    out = lines(pqmail(tree, "showctl"))
    text = "\n".join(out)
    assert any(ln.startswith("me ") and "(missing)" in ln for ln in out)
    assert any(ln.startswith("helohost ") and "(unset; control/me is missing too)" in ln for ln in out)
    assert "  (NO domain is accepted (pqmail is never an open relay))" in text
    assert "other files in control/ (not read by this report): qmqpservers" in text


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("virtualdomains", b"example.com:ex1\nbad\0line:x\n", "virtualdomains:2: contains a NUL byte"),
        ("smtproutes", b"a.example:relay:port\n", "smtproutes:1: bad port 'port'"),
        ("me", b"\0", "me:1: contains a NUL byte"),
    ],
)
def test_malformed_control_is_one_line_error(tree: dict[str, Path], name: str, data: bytes,
                                             message: str) -> None:
    write(tree["control"] / name, data)
    for cmd in (["showctl"], ["route", "joe@example.com"]):
        p = pqmail(tree, *cmd, check=False)
        assert p.returncode == 111
        err = p.stderr.decode()
        assert err.count("\n") == 1 and message in err and str(tree["control"]) in err
        assert p.stdout == b""


def test_unreadable_control_file(tree: dict[str, Path]) -> None:
    (tree["control"] / "locals").unlink()
    (tree["control"] / "locals").mkdir()
    p = pqmail(tree, "showctl", check=False)
    assert p.returncode == 111
    assert f"{tree['control'] / 'locals'}: unable to read" in p.stderr.decode()


# ----------------------------------------------------------------------------- route

def test_route_virtual_user_exact_file(tree: dict[str, Path]) -> None:
    out = lines(pqmail(tree, "route", "Joe@Example.com"))
    assert out[0] == "recipient: Joe@Example.com"
    assert "  virtualdomains key 'example.com': prefix ex1 -> ex1-Joe@Example.com" in out
    assert "delivery: local" in out
    assert "local part: ex1-Joe" in out
    assert f"users/assign: user popuser uid 1001 gid 1001 home {tree['home']} dash '-' ext 'Joe'" in out
    files = out[out.index(f"dot-qmail files, in order, in {tree['home']}:") + 1:]
    assert [f.split() for f in files] == [[".qmail-joe", "exists", "<-", "used"],
                                          [".qmail-default", "exists", "(not", "reached)"]]


def test_route_default_file_with_default_value(tree: dict[str, Path]) -> None:
    out = lines(pqmail(tree, "route", "Kim.X-Y@example.com"))
    files = out[-3:]
    assert files[0].split() == [".qmail-kim:x-y", "missing"]
    assert files[1].split() == [".qmail-kim:x-default", "missing"]
    assert files[2].split() == [".qmail-default", "exists", "<-", "used", "(DEFAULT=Kim.X-Y)"]


@pytest.mark.parametrize("local", ["../x", "a/b", ".qmail", "..", "../../etc/passwd"])
def test_route_hostile_local_parts_stay_home(tree: dict[str, Path], local: str) -> None:
    out = lines(pqmail(tree, "route", f"{local}@example.com"))
    files = [ln.split()[0] for ln in out[out.index(next(x for x in out if x.startswith("dot-qmail"))) + 1:]]
    assert files[-1] == ".qmail-default"
    for name in files:
        assert name.startswith(".qmail-") and "/" not in name


def test_route_bounce_when_nothing_matches(tree: dict[str, Path]) -> None:
    (tree["home"] / ".qmail-default").unlink()
    out = lines(pqmail(tree, "route", "nobody@example.com"))
    assert out[-1] == "none exists: the message bounces (no mailbox here by that name, #5.1.1)"


def test_route_exact_entry_and_no_entry(tree: dict[str, Path]) -> None:
    out = lines(pqmail(tree, "route", "PostMaster@mx.isp.test"))
    assert "  domain mx.isp.test is in control/locals" in out
    assert any(ln.startswith("users/assign: user alias uid 7 gid 7") for ln in out)
    out = lines(pqmail(tree, "route", "someone@localhost"))
    assert out[-1].startswith("users/assign: no entry for this local part")


def test_route_trash(tree: dict[str, Path]) -> None:
    out = lines(pqmail(tree, "route", "@mx.isp.test"))
    assert out[-1] == "empty local part: a trash address, accepted and delivered nowhere"


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("bob@example.org", ["host: example.org", "smtproutes: no route; deliver to the host's MX"]),
        ("joe@except.example.com", ["host: except.example.com",
                                    "smtproutes: no route; deliver to the host's MX"]),
        ("x@Second-Example.com", ["host: Second-Example.com",
                                  "smtproutes: key 'second-example.com' -> relay relay.isp.net:2525 "
                                  "(no MX lookup)"]),
    ],
)
def test_route_remote(tree: dict[str, Path], address: str, expected: list[str]) -> None:
    out = lines(pqmail(tree, "route", address))
    assert "delivery: remote" in out
    assert out[-2:] == expected


def test_route_envnoathost(tree: dict[str, Path]) -> None:
    out = lines(pqmail(tree, "route", "joe"))
    assert "  no @: appended @mx.isp.test (envnoathost)" in out
    assert "delivery: local" in out
