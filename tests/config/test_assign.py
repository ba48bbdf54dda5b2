"""users/assign -> users/cdb (qmail-newu), the users/cdb lookup (qmail-lspawn), and qmail-newmrh.

The expected cdb records below are written out by hand from notqmail's qmail-newu.c, not computed by
pqmail: keys ``"!" + lower(local) + "\\0"`` (``=``) or ``"!" + lower(loc)`` (``+``), values the six fields
joined by NUL with no final NUL, every line written in file order (duplicates too), then the empty key
holding each distinct last character of a non-empty wildcard ``loc``, in the case written.
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import require_tool, run_pqmail
from pqmail.config.assign import (
    AssignEntry,
    UsersDB,
    assign_records,
    compile_assign,
    compile_morercpthosts,
    parse_assign,
)
from pqmail.errors import ConfigError
from pqmail.paths import Root


def make_root(tmp_path: Path, assign: bytes | None = None) -> Root:
    root = Root(tmp_path / "root")
    root.users.mkdir(parents=True)
    root.control.mkdir()
    if assign is not None:
        root.assign.write_bytes(assign)
    return root


def dump(records: list[tuple[bytes, bytes]]) -> bytes:
    """What tinycdb's ``cdb -d`` prints for these records, in this order."""
    out = b"".join(b"+%d,%d:%s->%s\n" % (len(k), len(v), k, v) for k, v in records)
    return out + b"\n"


def cdb_dump(path: Path) -> bytes:
    return subprocess.run([require_tool("cdb"), "-d", str(path)], check=True, capture_output=True).stdout


# ----------------------------------------------------------------------------- parsing

def test_parse_simple_and_wildcard() -> None:
    lines = parse_assign(b"=joe:joe:1001:1002:/home/joe:::\n"
                         b"+ex1-:popuser:1001:1001:/m/e/ex1/DOMAINS/example.com:-::\n"
                         b"+:alias:7790:2108:/var/qmail/alias:-::\n"
                         b".\n")
    assert [(ln.kind, ln.key, ln.lineno) for ln in lines] == [("=", "joe", 1), ("+", "ex1-", 2), ("+", "", 3)]
    assert lines[0].entry == AssignEntry("joe", 1001, 1002, "/home/joe", "", "")
    assert lines[1].entry == AssignEntry("popuser", 1001, 1001, "/m/e/ex1/DOMAINS/example.com", "-", "")


@pytest.mark.parametrize(("data", "kind", "key", "entry"), [
    # anything after the sixth colon is ignored, including a CR
    (b"=a:u:1:2:/h:-:x:junk:more\r\n.\n", "=", "a", AssignEntry("u", 1, 2, "/h", "-", "x")),
    # any first character other than '+' means '='
    (b"-Foo:u:1:2:/h:::\n.\n", "=", "Foo", AssignEntry("u", 1, 2, "/h", "", "")),
    (b"xfoo:u:1:2:/h:::\n.\n", "=", "foo", AssignEntry("u", 1, 2, "/h", "", "")),
    # the key keeps the case written; latin-1 bytes survive
    (b"+Ex1-\xe4:u:0:0:/h\xe9:-::\n.\n", "+", "Ex1-\xe4", AssignEntry("u", 0, 0, "/h\xe9", "-", "")),
    # "=" with an empty local part is allowed by qmail-newu
    (b"=:u:1:2:/h:::\n.\n", "=", "", AssignEntry("u", 1, 2, "/h", "", "")),
])
def test_parse_qmail_newu_rules(data: bytes, kind: str, key: str, entry: AssignEntry) -> None:
    [line] = parse_assign(data)
    assert (line.kind, line.key, line.entry) == (kind, key, entry)


@pytest.mark.parametrize("tail", [b".\n", b".", b".anything\n", b".\ngarbage without colons\n\0\n"])
def test_final_dot_line_ends_the_file(tail: bytes) -> None:
    assert len(parse_assign(b"=a:u:1:2:/h:::\n" + tail)) == 1


def test_empty_assign_with_only_dot() -> None:
    assert parse_assign(b".\n") == []


@pytest.mark.parametrize(("data", "line", "words"), [
    (b"", 1, "final line starting with '.'"),
    (b"=a:u:1:2:/h:::\n", 2, "final line starting with '.'"),
    (b"=a:u:1:2:/h:::\n=b:u:1:2:/h:::", 2, "no newline"),
    (b"=a:u:1:2:/h:::\n=b:u:1:2\0:/h:::\n.\n", 2, "NUL"),
    (b"=a:u:1:2:/h:::\n\n.\n", 2, "no ':'"),                  # blank lines are not allowed
    (b"# comment\n.\n", 1, "no ':'"),                          # nor comments
    (b"=a:u:1:2:/h:::\n:u:1:2:/h:::\n.\n", 2, "starts with ':'"),
    (b"=a:u:1:2:/h::\n.\n", 1, "5 colons"),                    # trailing ':' missing
    (b"+a:u:1:2:/h\n.\n", 1, "3 colons"),
    (b"=a:u:x1:2:/h:::\n.\n", 1, "uid 'x1'"),
    (b"=a:u:1:2x:/h:::\n.\n", 1, "gid '2x'"),
    (b"=a:u::2:/h:::\n.\n", 1, "uid ''"),
    (b"=a:u:-1:2:/h:::\n.\n", 1, "uid '-1'"),
    (b"=a:u: 1:2:/h:::\n.\n", 1, "uid ' 1'"),
    (b"=a:u:\xb2:2:/h:::\n.\n", 1, "uid"),                     # latin-1 superscript two is no digit
    (b"=a:u:4294967296:2:/h:::\n.\n", 1, "uid"),
])
def test_parse_errors_name_the_line(data: bytes, line: int, words: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_assign(data, "/r/users/assign")
    assert exc.value.path == "/r/users/assign"
    assert exc.value.line == line
    assert words in exc.value.message
    assert str(exc.value).startswith(f"/r/users/assign:{line}: ")


text = st.text(st.characters(min_codepoint=1, max_codepoint=255, blacklist_characters=":\n"), max_size=12)
entries = st.builds(AssignEntry, text, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), text, text, text)


@given(st.lists(st.tuples(st.sampled_from("=+"), text.filter(lambda s: not s.startswith(".")), entries),
                max_size=8))
def test_parse_round_trip(items: list[tuple[str, str, AssignEntry]]) -> None:
    body = "".join(f"{k}{key}:{e.user}:{e.uid}:{e.gid}:{e.home}:{e.dash}:{e.ext}:\n" for k, key, e in items)
    lines = parse_assign((body + ".\n").encode("latin-1"))
    assert [(ln.kind, ln.key, ln.entry) for ln in lines] == items
    assert [ln.lineno for ln in lines] == list(range(1, len(items) + 1))


@given(st.binary(max_size=200))
def test_parse_arbitrary_bytes_only_raises_config_error(data: bytes) -> None:
    try:
        parse_assign(data)
    except ConfigError as e:
        assert e.line is not None and 1 <= e.line <= data.count(b"\n") + 1


# ----------------------------------------------------------------------------- compiling (qmail-newu layout)

EXACT = (b"=joe:joe:1001:1001:/home/joe:::\n"
         b"=mary:mary:1002:100:/home/mary:-:ext:\n"
         b".\n")
EXACT_RECORDS = [
    (b"!joe\0", b"joe\x001001\x001001\x00/home/joe\x00\x00"),
    (b"!mary\0", b"mary\x001002\x00100\x00/home/mary\x00-\x00ext"),
    (b"", b""),
]

WILD = (b"+ex1-:popuser:1001:1001:/m/e/ex1/DOMAINS/example.com:-::\n"
        b"+:alias:7790:2108:/var/qmail/alias:-::\n"
        b"=joe:joe:1001:1001:/home/joe:::\n"
        b".\n")
WILD_RECORDS = [
    (b"!ex1-", b"popuser\x001001\x001001\x00/m/e/ex1/DOMAINS/example.com\x00-\x00"),
    (b"!", b"alias\x007790\x002108\x00/var/qmail/alias\x00-\x00"),
    (b"!joe\0", b"joe\x001001\x001001\x00/home/joe\x00\x00"),
    (b"", b"-"),  # "+:" has no last character: only "ex1-" contributes
]

SEVERAL = (b"+a-:u:1:1:/a:-::\n"
           b"+b.:u:2:2:/b:-::\n"
           b"+c-:u:3:3:/c:-::\n"
           b"+d_:u:4:4:/d:-:pre:\n"
           b"+e.:u:5:5:/e:-::\n"
           b".\n")
SEVERAL_RECORDS = [
    (b"!a-", b"u\x001\x001\x00/a\x00-\x00"),
    (b"!b.", b"u\x002\x002\x00/b\x00-\x00"),
    (b"!c-", b"u\x003\x003\x00/c\x00-\x00"),
    (b"!d_", b"u\x004\x004\x00/d\x00-\x00pre"),
    (b"!e.", b"u\x005\x005\x00/e\x00-\x00"),
    (b"", b"-._"),  # distinct, in order of first appearance
]

DUPLICATES = (b"=joe:first:1:1:/1:::\n"
              b"=JOE:second:2:2:/2:::\n"
              b"+x-:w1:3:3:/3:-::\n"
              b"+x-:w2:4:4:/4:-::\n"
              b".\n")
DUPLICATE_RECORDS = [
    (b"!joe\0", b"first\x001\x001\x00/1\x00\x00"),
    (b"!joe\0", b"second\x002\x002\x00/2\x00\x00"),  # written too; lookups see the first
    (b"!x-", b"w1\x003\x003\x00/3\x00-\x00"),
    (b"!x-", b"w2\x004\x004\x00/4\x00-\x00"),
    (b"", b"-"),
]

UPPER = (b"=JOE:Joe:1001:1001:/Home/Joe:::\n"
         b"+Ex1-Q:PopUser:1001:1001:/M/E:-:Pre:\n"
         b"+ABc:u:1:1:/h:-::\n"
         b"=Weird:u:0100:007:/h:::junk after the sixth colon\n"
         b".\n")
UPPER_RECORDS = [
    (b"!joe\0", b"Joe\x001001\x001001\x00/Home/Joe\x00\x00"),    # keys lowercased, values kept
    (b"!ex1-q", b"PopUser\x001001\x001001\x00/M/E\x00-\x00Pre"),
    (b"!abc", b"u\x001\x001\x00/h\x00-\x00"),
    (b"!weird\0", b"u\x000100\x00007\x00/h\x00\x00"),             # numbers kept as written
    (b"", b"Qc"),  # the wildcard characters keep the case written (taken before lowercasing)
]


@pytest.mark.parametrize(("assign", "records"), [
    (EXACT, EXACT_RECORDS),
    (WILD, WILD_RECORDS),
    (SEVERAL, SEVERAL_RECORDS),
    (DUPLICATES, DUPLICATE_RECORDS),
    (UPPER, UPPER_RECORDS),
    (b".\n", [(b"", b"")]),
], ids=["exact", "wildcards", "several-wildchars", "duplicates", "upper-case", "empty"])
def test_compile_matches_qmail_newu_byte_for_byte(tmp_path: Path, assign: bytes,
                                                  records: list[tuple[bytes, bytes]]) -> None:
    assert assign_records(parse_assign(assign)) == records
    root = make_root(tmp_path, assign)
    assert compile_assign(root) == len(records)
    assert cdb_dump(root.users_cdb) == dump(records)
    assert (root.users_cdb.stat().st_mode & 0o777) == 0o644
    assert not (root.users / "cdb.tmp").exists()


def test_compile_mode_ignores_umask(tmp_path: Path) -> None:
    root = make_root(tmp_path, EXACT)
    old = os.umask(0o077)
    try:
        compile_assign(root)
    finally:
        os.umask(old)
    assert (root.users_cdb.stat().st_mode & 0o777) == 0o644


@pytest.mark.parametrize("bad", [EXACT[:-2], b"=a:u:1:x:/h:::\n.\n", b"=a:u:1\n.\n"])
def test_malformed_assign_leaves_cdb_untouched(tmp_path: Path, bad: bytes) -> None:
    root = make_root(tmp_path, WILD)
    compile_assign(root)
    before = root.users_cdb.read_bytes()
    inode = root.users_cdb.stat().st_ino
    root.assign.write_bytes(bad)
    with pytest.raises(ConfigError) as exc:
        compile_assign(root)
    assert exc.value.path == str(root.assign) and exc.value.line is not None
    assert root.users_cdb.read_bytes() == before
    assert root.users_cdb.stat().st_ino == inode
    assert not (root.users / "cdb.tmp").exists()


def test_missing_assign_is_an_error(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    with pytest.raises(ConfigError, match="unable to read users/assign"):
        compile_assign(root)
    assert not root.users_cdb.exists()


def test_compile_replaces_atomically_new_inode(tmp_path: Path) -> None:
    root = make_root(tmp_path, EXACT)
    compile_assign(root)
    first = root.users_cdb.stat().st_ino
    root.assign.write_bytes(WILD)
    compile_assign(root)
    assert root.users_cdb.stat().st_ino != first  # renamed into place, never rewritten in place


def test_concurrent_compiles_leave_a_valid_cdb(tmp_path: Path) -> None:
    root = make_root(tmp_path, SEVERAL)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                compile_assign(root)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert cdb_dump(root.users_cdb) == dump(SEVERAL_RECORDS)
    assert not (root.users / "cdb.tmp").exists()


# ----------------------------------------------------------------------------- lookup (qmail-lspawn)

LOOKUP = (b"=joe:joe:1001:1001:/home/joe:::\n"
          b"+joe-:joe:1001:1001:/home/joe:-::\n"
          b"+ex1-:popuser:2000:2000:/m/e/ex1/DOMAINS/example.com:-::\n"
          b"+ex1-sales-:sales:2001:2001:/m/sales:-:team-:\n"
          b"+ex1-sales:short:2002:2002:/m/short:-::\n"
          b"+:alias:7790:2108:/var/qmail/alias:-::\n"
          b".\n")


@pytest.fixture
def users(tmp_path: Path) -> UsersDB:
    root = make_root(tmp_path, LOOKUP)
    compile_assign(root)
    return UsersDB(root)


@pytest.mark.parametrize(("local", "expected"), [
    ("joe", AssignEntry("joe", 1001, 1001, "/home/joe", "", "")),               # exact beats "+joe-"
    ("JOE", AssignEntry("joe", 1001, 1001, "/home/joe", "", "")),               # case ignored
    ("joe-list", AssignEntry("joe", 1001, 1001, "/home/joe", "-", "list")),
    ("Joe-List", AssignEntry("joe", 1001, 1001, "/home/joe", "-", "List")),     # rest keeps its case
    ("ex1-Joe", AssignEntry("popuser", 2000, 2000, "/m/e/ex1/DOMAINS/example.com", "-", "Joe")),
    ("ex1-", AssignEntry("popuser", 2000, 2000, "/m/e/ex1/DOMAINS/example.com", "-", "")),
    ("EX1-sales-Bob", AssignEntry("sales", 2001, 2001, "/m/sales", "-", "team-Bob")),  # longest wins
    ("ex1-salesman", AssignEntry("short", 2002, 2002, "/m/short", "-", "man")),
    ("ex1-sales", AssignEntry("short", 2002, 2002, "/m/short", "-", "")),       # the loc itself matches
    ("ex1-sale", AssignEntry("popuser", 2000, 2000, "/m/e/ex1/DOMAINS/example.com", "-", "sale")),
    ("Postmaster", AssignEntry("alias", 7790, 2108, "/var/qmail/alias", "-", "Postmaster")),  # "+:"
    ("", AssignEntry("alias", 7790, 2108, "/var/qmail/alias", "-", "")),
    ("\xe4rger", AssignEntry("alias", 7790, 2108, "/var/qmail/alias", "-", "\xe4rger")),
    ("\u263a", AssignEntry("alias", 7790, 2108, "/var/qmail/alias", "-", "\u263a")),
])
def test_lookup(users: UsersDB, local: str, expected: AssignEntry) -> None:
    assert users.lookup(local) == expected


def test_lookup_without_catch_all(tmp_path: Path) -> None:
    root = make_root(tmp_path, EXACT)
    compile_assign(root)
    users = UsersDB(root)
    assert users.lookup("nobody") is None
    assert users.lookup("joe-x") is None  # "=joe" is exact only
    assert users.lookup("mary") == AssignEntry("mary", 1002, 100, "/home/mary", "-", "ext")


def test_lookup_duplicates_first_wins(tmp_path: Path) -> None:
    root = make_root(tmp_path, DUPLICATES)
    compile_assign(root)
    users = UsersDB(root)
    assert users.lookup("Joe").user == "first"
    assert users.lookup("x-y").user == "w1"


def test_lookup_upper_case_wildcard_matches(tmp_path: Path) -> None:
    # qmail-lspawn would never match "+Ex1-Q" (its wildcard record holds "Q", the address is
    # lowercased); pqmail follows qmail-users(5): keys ignore case.
    root = make_root(tmp_path, UPPER)
    compile_assign(root)
    assert UsersDB(root).lookup("ex1-qRest") == AssignEntry("PopUser", 1001, 1001, "/M/E", "-", "PreRest")


def test_lookup_missing_cdb_is_none(tmp_path: Path) -> None:
    root = make_root(tmp_path, LOOKUP)  # assign exists but was never compiled: it is not read
    assert UsersDB(root).lookup("joe") is None


def test_lookup_sees_a_new_cdb_and_a_removed_one(tmp_path: Path) -> None:
    root = make_root(tmp_path, EXACT)
    compile_assign(root)
    users = UsersDB(root)
    assert users.lookup("ex1-a") is None
    root.assign.write_bytes(WILD)
    compile_assign(root)
    assert users.lookup("ex1-a").user == "popuser"
    root.users_cdb.unlink()
    assert users.lookup("ex1-a") is None


def test_lookup_reads_a_tinycdb_made_file(tmp_path: Path) -> None:
    # A users/cdb made by another tool (here tinycdb, from qmail-newu's records) reads the same.
    root = make_root(tmp_path)
    records = [(b"!ex1-", b"popuser\x001001\x001001\x00/m\x00-\x00"), (b"", b"-")]
    subprocess.run([require_tool("cdb"), "-c", str(root.users_cdb)],
                   input=dump(records), check=True)
    assert UsersDB(root).lookup("ex1-Joe") == AssignEntry("popuser", 1001, 1001, "/m", "-", "Joe")


def test_lookup_cdb_without_wildcard_record_is_trouble(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    subprocess.run([require_tool("cdb"), "-c", str(root.users_cdb)],
                   input=dump([(b"!joe\0", b"joe\x001\x001\x00/h\x00\x00")]), check=True)
    with pytest.raises(ConfigError, match="Trouble reading users/cdb"):
        UsersDB(root).lookup("joe")


def test_lookup_unreadable_cdb_is_trouble(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    root.users_cdb.mkdir()  # something that cannot be read as a cdb
    with pytest.raises(ConfigError, match="Trouble reading users/cdb") as exc:
        UsersDB(root).lookup("joe")
    assert exc.value.exit_code == 111


def test_lookup_concurrent_with_newu(tmp_path: Path) -> None:
    root = make_root(tmp_path, LOOKUP)
    compile_assign(root)
    users = UsersDB(root)
    stop = threading.Event()
    seen: list[object] = []
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                seen.append(users.lookup("ex1-Joe"))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(30):
        compile_assign(root)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert seen and all(e == AssignEntry("popuser", 2000, 2000, "/m/e/ex1/DOMAINS/example.com", "-", "Joe")
                        for e in seen)


# ----------------------------------------------------------------------------- qmail-newmrh

def test_newmrh(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    root.control_file("morercpthosts").write_bytes(
        b"Example.COM  \t\n# comment\n\n  .Sub.Example.net\nlast.example.org")
    assert compile_morercpthosts(root) == 3
    expected = [(b"example.com", b""), (b"  .sub.example.net", b""), (b"last.example.org", b"")]
    assert cdb_dump(root.control_file("morercpthosts.cdb")) == dump(expected)
    assert not root.control_file("morercpthosts.tmp").exists()


def test_newmrh_missing_file(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    with pytest.raises(ConfigError, match="unable to read control/morercpthosts"):
        compile_morercpthosts(root)


# ----------------------------------------------------------------------------- the commands

def test_pqmail_newu(tmp_path: Path) -> None:
    root = make_root(tmp_path, WILD)
    p = run_pqmail("newu", "--root", str(root.path))
    assert b"4 records" in p.stdout
    assert cdb_dump(root.users_cdb) == dump(WILD_RECORDS)


def test_pqmail_newu_bad_assign_exits_111_naming_the_line(tmp_path: Path) -> None:
    root = make_root(tmp_path, WILD)
    run_pqmail("newu", "--root", str(root.path))
    before = root.users_cdb.read_bytes()
    root.assign.write_bytes(b"=a:u:1:1:/h:::\n=b:u:one:1:/h:::\n.\n")
    p = run_pqmail("newu", "--root", str(root.path), check=False)
    assert p.returncode == 111
    assert f"{root.assign}:2: uid 'one'".encode() in p.stderr
    assert len(p.stderr.splitlines()) == 1
    assert root.users_cdb.read_bytes() == before


def test_pqmail_newu_root_from_environment(tmp_path: Path) -> None:
    root = make_root(tmp_path, EXACT)
    run_pqmail("newu", env={"PQMAIL_ROOT": str(root.path)})
    assert root.users_cdb.exists()


def test_pqmail_newmrh(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    root.control_file("morercpthosts").write_text("a.example\nb.example\n")
    p = run_pqmail("newmrh", "--root", str(root.path))
    assert b"2 domains" in p.stdout
    assert run_pqmail("newmrh", "--root", str(tmp_path / "nowhere"), check=False).returncode == 111


@pytest.mark.parametrize("cmd", ["newu", "newmrh"])
def test_help(cmd: str) -> None:
    p = run_pqmail(cmd, "--help")
    assert b"EXIT STATUS" in p.stdout and b"111" in p.stdout


def test_lookup_remembers_answers_only_while_the_same_cdb_is_in_place(tmp_path: Path) -> None:
    root = make_root(tmp_path, LOOKUP)
    compile_assign(root)
    users = UsersDB(root)
    assert users.lookup("ex1-joe").home == "/m/e/ex1/DOMAINS/example.com"
    assert users.lookup("ex1-joe").home == "/m/e/ex1/DOMAINS/example.com"  # from memory this time
    root.assign.write_bytes(LOOKUP.replace(b"/m/e/ex1/DOMAINS/example.com", b"/m/moved"))
    compile_assign(root)  # newu renames a new file into place: the remembered answer goes with it
    assert users.lookup("ex1-joe").home == "/m/moved"
