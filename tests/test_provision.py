"""Provisioning: the seed configuration made by the commands alone, read file by file as an admin would."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import PQMAIL, mail_owner, require_tool, run_pqmail
from pqmail.config.assign import UsersDB
from pqmail.maildir import is_maildir
from pqmail.passwords import PasswordStore, verify_password
from pqmail.paths import Root


def pq(seed: dict, *args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return run_pqmail(*args, "--root", str(seed["root"]), input=input, check=check)


def one_line_error(p: subprocess.CompletedProcess, code: int = 100) -> str:
    """The single ``pqmail: ...`` line of a refused command (100: bad input; 111: bad configuration)."""
    assert p.returncode == code, p
    err = p.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("pqmail: "), err
    assert b"Traceback" not in p.stderr
    return err


def ids(seed: dict) -> tuple[int, int]:
    pw = pwd.getpwnam(seed["owner"])
    return pw.pw_uid, pw.pw_gid


def control(seed: dict, name: str) -> str:
    return (seed["root"] / "control" / name).read_text()


def snapshot(*dirs: Path) -> dict[str, bytes | None]:
    """Every file (content) and directory (None) under ``dirs``: to prove that nothing changed."""
    out: dict[str, bytes | None] = {}
    for top in dirs:
        for dirpath, dirnames, filenames in os.walk(top):
            for d in dirnames:
                out[os.path.join(dirpath, d)] = None
            for f in filenames:
                if not f.endswith(".lock"):
                    out[os.path.join(dirpath, f)] = Path(dirpath, f).read_bytes()
    return out


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict:
    """The seed built once, exactly as conftest's ``seed`` builds it, for tests that change nothing."""
    top = tmp_path_factory.mktemp("shared")
    root, base, serial = top / "root", top / "popmail", top / "serialmail"
    base.mkdir()
    serial.mkdir()
    owner = mail_owner()
    r = ["--root", str(root)]
    run_pqmail("init", *r, "--me", "mx.isp.test", "--owner", owner)
    run_pqmail("domain", "add", "example.com", "--handle", "ex1", "--base", str(base), *r)
    for _ in range(3):
        run_pqmail("box", "add", "ex1", "--random-password", *r)
    run_pqmail("alias", "add", "joe@example.com", "ex1-0001", *r)
    run_pqmail("dialup", "add", "some.example.com", "--handle", "ex1", "--relayhost", "127.0.0.1:2626",
               "--base", str(serial), *r)
    return {"root": root, "base": base, "serial": serial, "owner": owner,
            "pop": base / "e" / "ex1" / "POP", "domains": base / "e" / "ex1" / "DOMAINS"}


# ----------------------------------------------------------------------------- the seed, file by file

def test_seed_control_files(seed):
    assert control(seed, "rcpthosts") == "mx.isp.test\nexample.com\n.example.com\nsome.example.com\n"
    assert control(seed, "virtualdomains") == ("example.com:example.com\n.example.com:example.com\n"
                                               "some.example.com:some.example.com\n")
    assert not (seed["root"] / "control" / "smtproutes").exists()


def test_seed_assign_and_cdb(shared):
    uid, gid = ids(shared)
    owner = shared["owner"]
    home = shared["domains"] / "example.com"
    dial = shared["serial"] / "some.example.com"
    assert (shared["root"] / "users" / "assign").read_text() == (
        f"+example.com-:{owner}:{uid}:{gid}:{home}:-::\n"
        f"+some.example.com-:{owner}:{uid}:{gid}:{dial}:-::\n"
        ".\n")
    users = UsersDB(Root(shared["root"]))
    e = users.lookup("example.com-Joe")
    assert (e.user, e.uid, e.gid, e.home, e.dash, e.ext) == (owner, uid, gid, str(home), "-", "Joe")
    assert users.lookup("some.example.com-anyone").home == str(dial)


def test_seed_cdb_matches_tinycdb(shared):
    cdb = require_tool("cdb")
    dump = subprocess.run([cdb, "-d", str(shared["root"] / "users" / "cdb")], capture_output=True,
                          check=True).stdout.decode()
    assert "!example.com-" in dump and "!some.example.com-" in dump


def test_seed_domain_dot_qmail_files(shared):
    home = shared["domains"] / "example.com"
    pop = shared["pop"]
    assert sorted(os.listdir(home)) == [".qmail-default", ".qmail-joe", ".qmail-postmaster"]
    assert (home / ".qmail-postmaster").read_text() == f"{pop / 'ex1-0000'}/\n"
    assert (home / ".qmail-default").read_text() == "&postmaster@example.com\n"
    assert (home / ".qmail-joe").read_text() == f"{pop / 'ex1-0001'}/\n"


def test_seed_dialup_directory(shared):
    d = shared["serial"] / "some.example.com"
    assert sorted(os.listdir(d)) == [".qmail-default", "Maildir", "RELAYHOST"]
    assert (d / "RELAYHOST").read_text() == "127.0.0.1:2626\n"
    assert (d / ".qmail-default").read_text() == "./Maildir/\n"
    assert is_maildir(d / "Maildir")


def test_seed_handles_registry(shared):
    assert (shared["root"] / "users" / "handles").read_text() == f"ex1:{shared['base']}\n"


def test_seed_owners_and_modes(shared):
    uid, gid = ids(shared)
    for top in (shared["base"] / "e", shared["serial"] / "some.example.com"):
        for dirpath, dirnames, filenames in os.walk(top):
            for name in [*dirnames, *filenames]:
                p = Path(dirpath, name)
                st = os.lstat(p)
                assert (st.st_uid, st.st_gid) == (uid, gid), p
                assert not st.st_mode & 0o022, f"{p} is group/world-writable"
                if name.startswith(".qmail") or name == "RELAYHOST":
                    assert stat.S_IMODE(st.st_mode) == 0o644, p
    for box in ("ex1-0000", "ex1-0001", "ex1-0002"):
        for sub in ("", "tmp", "new", "cur"):
            assert stat.S_IMODE(os.stat(shared["pop"] / box / sub).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(shared["domains"] / "example.com").st_mode) == 0o755


def test_seed_boxes_and_passwords(shared):
    assert sorted(os.listdir(shared["pop"])) == ["ex1-0000", "ex1-0001", "ex1-0002"]
    store = PasswordStore(Root(shared["root"]))
    assert store.boxes() == ["ex1-0000", "ex1-0001", "ex1-0002"]
    hashed, maildir = store.get("ex1-0001")
    assert hashed.startswith("$argon2id$")
    assert Path(maildir) == shared["pop"] / "ex1-0001"


def test_seed_check_is_clean(shared):
    p = pq(shared, "check")
    assert p.stdout == b""


# ----------------------------------------------------------------------------- boxes

def test_box_add_prints_name_and_password_that_verifies(seed):
    out = pq(seed, "box", "add", "ex1", "--random-password").stdout.decode()
    box, password = out.split()
    assert out == f"{box} {password}\n" and box == "ex1-0003"
    hashed, _ = PasswordStore(Root(seed["root"])).get(box)
    assert verify_password(hashed, password)
    assert not verify_password(hashed, password + "x")


def test_box_add_password_from_stdin_and_file(seed, tmp_path):
    assert pq(seed, "box", "add", "ex1", input=b"first secret\n").stdout == b"ex1-0003\n"
    pwfile = tmp_path / "pw"
    pwfile.write_text("second secret\nignored\n")
    assert pq(seed, "box", "add", "ex1", "--password-file", str(pwfile)).stdout == b"ex1-0004\n"
    store = PasswordStore(Root(seed["root"]))
    assert verify_password(store.get("ex1-0003")[0], "first secret")
    assert verify_password(store.get("ex1-0004")[0], "second secret")


def test_box_numbers_continue_after_the_highest(seed):
    pq(seed, "box", "remove", "ex1-0002")
    assert pq(seed, "box", "add", "ex1", "--random-password").stdout.split()[0] == b"ex1-0002"
    (seed["pop"] / "ex1-0041").mkdir()  # a box made by hand still takes its number
    assert pq(seed, "box", "add", "ex1", "--random-password").stdout.split()[0] == b"ex1-0042"


def test_box_for_a_new_handle_uses_the_recorded_or_given_base(seed):
    base2 = seed["base"].parent / "pop2"
    base2.mkdir()
    pq(seed, "box", "add", "zz9", "--random-password", "--base", str(base2))
    assert is_maildir(base2 / "z" / "zz9" / "POP" / "zz9-0000")
    assert (seed["root"] / "users" / "handles").read_text() == f"ex1:{seed['base']}\nzz9:{base2}\n"
    pq(seed, "box", "add", "zz9", "--random-password")  # no --base: the recorded one
    assert is_maildir(base2 / "z" / "zz9" / "POP" / "zz9-0001")
    err = one_line_error(pq(seed, "box", "add", "zz9", "--random-password", "--base", str(seed["base"]),
                            check=False))
    assert "users/handles:2" in err and "lives under" in err


def test_box_list(seed):
    msg = seed["pop"] / "ex1-0001" / "new" / "1700000000.M1P1.test"
    msg.write_bytes(b"x" * 100)
    out = pq(seed, "box", "list", "ex1").stdout.decode()
    rows = {line.split()[1]: line for line in out.splitlines() if "ex1-000" in line}
    assert set(rows) == {"ex1-0000", "ex1-0001", "ex1-0002"}
    assert "joe@example.com" in rows["ex1-0001"] and "100 B" in rows["ex1-0001"]
    assert "postmaster@example.com" in rows["ex1-0000"]


def test_box_remove_refuses_while_addresses_point_at_it(seed):
    err = one_line_error(pq(seed, "box", "remove", "ex1-0001", "--force", check=False))
    assert "joe@example.com" in err
    err = one_line_error(pq(seed, "box", "remove", "ex1-0000", check=False))
    assert "postmaster@example.com" in err
    assert is_maildir(seed["pop"] / "ex1-0001")


def test_box_remove_refuses_a_non_empty_box_without_force(seed):
    box = seed["pop"] / "ex1-0002"
    (box / "cur" / "1700000000.M1P1.test:2,S").write_bytes(b"mail\n")
    err = one_line_error(pq(seed, "box", "remove", "ex1-0002", check=False))
    assert "1 messages" in err and "--force" in err
    assert box.exists()
    pq(seed, "box", "remove", "ex1-0002", "--force")
    assert not box.exists()
    assert PasswordStore(Root(seed["root"])).get("ex1-0002") is None
    assert "ex1-0002" not in PasswordStore(Root(seed["root"])).boxes()


def test_box_remove_of_an_unknown_box(shared):
    assert "no such box" in one_line_error(pq(shared, "box", "remove", "ex1-0099", check=False))


# ----------------------------------------------------------------------------- aliases

def test_alias_dots_map_to_colons(seed):
    home = seed["domains"] / "example.com"
    pq(seed, "alias", "add", "John.Smith@Example.COM", "ex1-0002")
    path = home / ".qmail-john:smith"
    assert path.read_text() == f"{seed['pop'] / 'ex1-0002'}/\n"
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o644 and (st.st_uid, st.st_gid) == ids(seed)
    out = pq(seed, "route", "john.smith@example.com").stdout.decode()
    assert ".qmail-john:smith" in out


def test_alias_forward(seed):
    pq(seed, "alias", "add", "sales@example.com", "--forward", "boss@else.where")
    assert (seed["domains"] / "example.com" / ".qmail-sales").read_text() == "&boss@else.where\n"


def test_alias_add_is_idempotent_but_never_overwrites_silently(seed):
    joe = seed["domains"] / "example.com" / ".qmail-joe"
    before = os.stat(joe).st_mtime_ns
    pq(seed, "alias", "add", "joe@example.com", "ex1-0001")
    assert os.stat(joe).st_mtime_ns == before
    err = one_line_error(pq(seed, "alias", "add", "joe@example.com", "ex1-0002", check=False))
    assert ".qmail-joe" in err and "--replace" in err
    pq(seed, "alias", "add", "joe@example.com", "ex1-0002", "--replace")
    assert joe.read_text() == f"{seed['pop'] / 'ex1-0002'}/\n"


def test_alias_list(shared):
    out = pq(shared, "alias", "list", "example.com").stdout.decode()
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 3 and "@" in cells[0]:
            rows[cells[0]] = cells[1]
    assert rows == {"*@example.com": "&postmaster@example.com", "joe@example.com": "ex1-0001",
                    "postmaster@example.com": "ex1-0000"}


def test_alias_remove(seed):
    pq(seed, "alias", "add", "tmp@example.com", "ex1-0002")
    pq(seed, "alias", "remove", "tmp@example.com")
    assert not (seed["domains"] / "example.com" / ".qmail-tmp").exists()
    assert "no alias" in one_line_error(pq(seed, "alias", "remove", "tmp@example.com", check=False))
    assert "postmaster" in one_line_error(pq(seed, "alias", "remove", "postmaster@example.com", check=False))


# ----------------------------------------------------------------------------- domains

def test_relayed_domain(seed):
    pq(seed, "domain", "add", "second-example.com", "--handle", "ex1", "--relay", "127.0.0.1:2727")
    assert control(seed, "smtproutes") == "second-example.com:127.0.0.1:2727\n"
    assert control(seed, "rcpthosts").endswith("some.example.com\nsecond-example.com\n")
    assert "second-example.com" not in control(seed, "virtualdomains")
    out = pq(seed, "domain", "list").stdout.decode()
    assert "second-example.com" in out and "relay" in out and "127.0.0.1:2727" in out
    pq(seed, "domain", "remove", "second-example.com")
    assert control(seed, "smtproutes") == ""
    assert "second-example.com" not in control(seed, "rcpthosts")


def test_domain_list_and_dialup_list(shared):
    out = pq(shared, "domain", "list").stdout.decode()
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith("│")}
    assert "virtual" in lines["example.com"] and "ex1" in lines["example.com"]
    assert "dialup" in lines["some.example.com"]
    out = pq(shared, "dialup", "list").stdout.decode()
    assert "some.example.com" in out and "127.0.0.1:2626" in out


def test_domain_add_twice_changes_nothing(seed):
    before = snapshot(seed["root"] / "control", seed["root"] / "users", seed["base"])
    pq(seed, "domain", "add", "example.com", "--handle", "ex1")
    assert snapshot(seed["root"] / "control", seed["root"] / "users", seed["base"]) == before


def test_domain_add_keeps_hand_written_comments_and_order(seed):
    rcpt = seed["root"] / "control" / "rcpthosts"
    vd = seed["root"] / "control" / "virtualdomains"
    rcpt.write_text("# hand-kept\nmx.isp.test\n\n# customers below\nexample.com\n.example.com\n")
    vd.write_text("# virtual domains\nexample.com:example.com\n.example.com:example.com\n")
    pq(seed, "domain", "add", "foo.test", "--handle", "ex1", "--postmaster", "pm@else.where")
    assert rcpt.read_text() == ("# hand-kept\nmx.isp.test\n\n# customers below\nexample.com\n.example.com\n"
                                "foo.test\n.foo.test\n")
    assert vd.read_text() == ("# virtual domains\nexample.com:example.com\n.example.com:example.com\n"
                              "foo.test:foo.test\n.foo.test:foo.test\n")
    assert (seed["domains"] / "foo.test" / ".qmail-postmaster").read_text() == "&pm@else.where\n"


def test_domain_add_refuses_a_clash_and_changes_nothing(seed):
    vd = seed["root"] / "control" / "virtualdomains"
    vd.write_text(vd.read_text() + "clash.test:someoneelse\n")
    before = snapshot(seed["root"] / "control", seed["root"] / "users", seed["base"])
    err = one_line_error(pq(seed, "domain", "add", "clash.test", "--handle", "ex1", check=False))
    assert "virtualdomains:4" in err and "clash.test:someoneelse" in err
    assert snapshot(seed["root"] / "control", seed["root"] / "users", seed["base"]) == before


def test_domain_add_refuses_a_local_domain(seed):
    assert "local domain" in one_line_error(pq(seed, "domain", "add", "mx.isp.test", "--handle", "ex1",
                                               check=False))


def test_domain_remove_undoes_add_and_keeps_files(seed):
    pq(seed, "domain", "add", "gone.test", "--handle", "ex1")
    home = seed["domains"] / "gone.test"
    assert home.is_dir()
    pq(seed, "domain", "remove", "gone.test")
    assert "gone.test" not in control(seed, "rcpthosts")
    assert "gone.test" not in control(seed, "virtualdomains")
    assert "gone.test" not in (seed["root"] / "users" / "assign").read_text()
    assert UsersDB(Root(seed["root"])).lookup("gone.test-joe") is None  # newu ran
    assert home.is_dir()
    assert control(seed, "rcpthosts") == "mx.isp.test\nexample.com\n.example.com\nsome.example.com\n"
    pq(seed, "domain", "add", "gone.test", "--handle", "ex1")
    pq(seed, "domain", "remove", "gone.test", "--purge")
    assert not home.exists()
    assert "not provisioned" in one_line_error(pq(seed, "domain", "remove", "gone.test", check=False))


def test_domain_remove_of_a_dialup_refuses_to_purge_waiting_mail(seed):
    d = seed["serial"] / "some.example.com"
    (d / "Maildir" / "new" / "1700000000.M1P1.test").write_bytes(b"waiting\n")
    err = one_line_error(pq(seed, "domain", "remove", "some.example.com", "--purge", check=False))
    assert "undelivered" in err
    assert "some.example.com" in control(seed, "rcpthosts")  # nothing was removed
    pq(seed, "domain", "remove", "some.example.com")
    assert "some.example.com" not in control(seed, "virtualdomains")
    assert d.is_dir()


# ----------------------------------------------------------------------------- dial-up

def test_dialup_add_again_changes_only_the_relayhost(seed):
    d = seed["serial"] / "some.example.com"
    pq(seed, "dialup", "add", "some.example.com", "--handle", "ex1", "--relayhost", "10.0.0.9",
       "--base", str(seed["serial"]))
    assert (d / "RELAYHOST").read_text() == "10.0.0.9\n"
    assert control(seed, "virtualdomains").count("some.example.com") == 2  # key and prefix of one line


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("args, text", [
    (["domain", "add", "bad_domain.com", "--handle", "ex1"], "invalid domain"),
    (["domain", "add", "example.com.", "--handle", "ex1"], "trailing dot"),
    (["domain", "add", "localhost", "--handle", "ex1"], "two labels"),
    (["domain", "add", "a/b.com", "--handle", "ex1"], "invalid domain"),
    (["domain", "add", "x.test", "--handle", "Ex1"], "invalid handle"),
    (["domain", "add", "x.test", "--handle", "../x"], "invalid handle"),
    (["domain", "add", "x.test"], "--handle"),
    (["domain", "add", "x.test", "--handle", "ex1", "--base", "/tmp/a:b"], "invalid base"),
    (["domain", "add", "x.test", "--handle", "ex1", "--relay", "h:0"], "out of range"),
    (["domain", "add", "x.test", "--handle", "ex1", "--owner", "root"], "root"),
    (["domain", "add", "x.test", "--handle", "ex1", "--owner", "no-such-user-pqmail"], "no such user"),
    (["domain", "add", "x.test", "--handle", "ex1", "--postmaster", "nobody"], "no '@'"),
    (["box", "add", "ex1", "--random-password", "--password-file", "/dev/null"], "not both"),
    (["box", "add", "ex1", "--password-file", "/nonexistent/pw"], "cannot read"),
    (["box", "add", "no-such"], "invalid handle"),
    (["box", "list", "nohandle"], "unknown handle"),
    (["box", "remove", "ex1-1"], "invalid box name"),
    (["alias", "add", "../etc@example.com", "ex1-0001"], "local part"),
    (["alias", "add", ".joe@example.com", "ex1-0001"], "local part"),
    (["alias", "add", "a/b@example.com", "ex1-0001"], "'/'"),
    (["alias", "add", "a:b@example.com", "ex1-0001"], "':'"),
    (["alias", "add", "a\x01b@example.com", "ex1-0001"], "'\\x01'"),
    (["alias", "add", "x" * 65 + "@example.com", "ex1-0001"], "64"),
    (["alias", "add", "joe", "ex1-0001"], "no '@'"),
    (["alias", "add", "new@example.com", "ex1-0009"], "no such box"),
    (["alias", "add", "new@example.com"], "either a BOX or --forward"),
    (["alias", "add", "new@example.com", "ex1-0001", "--forward", "a@b.c"], "either a BOX or --forward"),
    (["alias", "add", "new@example.com", "--forward", "a b@c.d"], "forward address"),
    (["alias", "add", "new@nowhere.test", "ex1-0001"], "not a virtual domain"),
    (["alias", "add", "x@some.example.com", "ex1-0001"], "dial-up"),
    (["alias", "list", "nowhere.test"], "not a virtual domain"),
    (["dialup", "add", "d.test", "--handle", "ex1", "--relayhost", "a b"], "whitespace"),
    (["dialup", "add", "d.test", "--handle", "ex1"], "--relayhost"),
])
def test_bad_input_is_one_line_exit_100(shared, args, text):
    err = one_line_error(pq(shared, *args, input=b"", check=False))
    assert text in err, err


def test_box_from_another_handle_is_refused(seed):
    pq(seed, "box", "add", "ex2", "--random-password", "--base", str(seed["base"]))
    err = one_line_error(pq(seed, "alias", "add", "x@example.com", "ex2-0000", check=False))
    assert "belongs to ex2" in err


def test_not_a_tree(mailtmp):
    p = run_pqmail("domain", "add", "x.test", "--handle", "ex1", "--root", str(mailtmp / "nothing"),
                   check=False)
    assert "pqmail init" in one_line_error(p)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root must name the mail user")
def test_root_without_mailuser_must_name_the_owner(seed):
    (seed["root"] / "control" / "mailuser").unlink()
    err = one_line_error(pq(seed, "box", "add", "ex1", "--random-password", check=False))
    assert "--owner" in err
    out = pq(seed, "box", "add", "ex1", "--random-password", "--owner", mail_owner()).stdout
    assert out.startswith(b"ex1-0003 ")


def test_a_malformed_assign_stops_domain_add_before_any_change(seed):
    assign = seed["root"] / "users" / "assign"
    assign.write_text(assign.read_text().replace("\n.\n", "\n=broken:line\n.\n"))
    before = snapshot(seed["root"] / "control", seed["root"] / "users", seed["base"])
    err = one_line_error(pq(seed, "domain", "add", "new.test", "--handle", "ex1", check=False), 111)
    assert "users/assign:3:" in err
    assert snapshot(seed["root"] / "control", seed["root"] / "users", seed["base"]) == before


def test_concurrent_box_adds_get_distinct_numbers(seed):
    cmd = [*PQMAIL, "box", "add", "ex1", "--random-password", "--root", str(seed["root"])]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    names = sorted(p.communicate(timeout=120)[0].split()[0].decode() for p in procs)
    assert names == ["ex1-0003", "ex1-0004", "ex1-0005"]
    assert sorted(PasswordStore(Root(seed["root"])).boxes()) == ["ex1-0000", "ex1-0001", "ex1-0002", *names]
    assert all(is_maildir(seed["pop"] / n) for n in names)


def test_dialup_list_shows_waiting_mail_and_last_transfer(seed):
    from pqmail.maildir import deliver

    home = seed["serial"] / "some.example.com"
    deliver(home / "Maildir", [b"Return-Path: <a@b.test>\n",
                               b"Delivered-To: some.example.com-x@some.example.com\n\nhi\n"])
    (home / "LASTTRANSFER").write_text("1700000000 deferred delivered 2, 451 try later\n")
    out = run_pqmail("dialup", "list", "--root", str(seed["root"]), env={"COLUMNS": "250"}).stdout.decode()
    row = next(line for line in out.splitlines() if "some.example.com" in line)
    assert " 1 " in row and "deferred" in row and "0m" in row


def test_box_import_takes_existing_hashes_all_or_nothing(seed, mailtmp):
    from pqmail.hashes import verify_secret
    from pqmail.passwords import PasswordStore

    root = seed["root"]
    store = PasswordStore(root)
    md5 = "$1$saltsalt$9xy1btjgzLYfb7hivXtC//"  # openssl passwd -1 -salt saltsalt secret
    bad = mailtmp / "bad.txt"
    bad.write_text(f"ex1-0000:{md5}\nex1-0001:nonsense\n")
    p = run_pqmail("box", "import", str(bad), "--root", str(root), check=False)
    assert p.returncode == 100 and f"{bad}:2: unsupported hash" in p.stderr.decode()
    assert not verify_secret(store.get("ex1-0000")[0], "secret")  # nothing changed
    good = mailtmp / "good.txt"
    good.write_text(f"# from vpopmail\n\nex1-0000:{md5}\nex1-0001:{{PLAIN}}joes\n")
    out = run_pqmail("box", "import", str(good), "--root", str(root)).stdout.decode()
    assert "imported 2 password hash(es)" in out
    assert verify_secret(store.get("ex1-0000")[0], "secret")
    assert verify_secret(store.get("ex1-0001")[0], "joes")
    assert store.get("ex1-0001")[1] == str(seed["pop"] / "ex1-0001")
    p = run_pqmail("box", "import", "-", "--root", str(root), input=b"ghost-0009:$6$x$y\n", check=False)
    assert p.returncode == 100 and "no box 'ghost-0009' here" in p.stderr.decode()
