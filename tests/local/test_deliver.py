"""qmail-local's behaviour, one delivery at a time: ``deliver_local`` on temporary home directories.

Each case builds a home directory, dot-qmail files and Maildirs, delivers one message and asserts the
exact bytes on disk, the report letter and text, the forwards, or the program's environment, as
qmail-local (notqmail 1.08, conf-patrn 022) would produce them (qmail-semantics.md §3).
"""

from __future__ import annotations

import os
import re
import stat
import time
from pathlib import Path

import pytest

from pqmail import maildir
from pqmail.config.assign import AssignEntry
from pqmail.local.deliver import LocalJob, LocalResult, deliver_local

MSG = b"From: alice@remote.test\nSubject: hi\n\nbody line\n"
SENDER = "alice@remote.test"
NO_MAILBOX = "Sorry, no mailbox here by that name. (#5.1.1)\n"
LOOP = "This message is looping: it already has my Delivered-To line. (#5.4.6)\n"
UFLINE_RE = re.compile(
    rb"From (\S+) (Mon|Tue|Wed|Thu|Fri|Sat|Sun) (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
    rb"(\d\d) (\d\d):(\d\d):(\d\d) (\d{4})\n"
)


class Box:
    """A home directory (0755) with helpers to write dot-qmail files and Maildirs, and to deliver."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.home = base / "home"
        self.home.mkdir()
        self.home.chmod(0o755)
        self.msgfile = base / "message"

    def qmail(self, name: str, text: str | bytes, mode: int = 0o644) -> Path:
        p = self.home / name
        p.write_bytes(text.encode("latin-1") if isinstance(text, str) else text)
        p.chmod(mode)
        return p

    def maildir(self, rel: str = "Maildir") -> Path:
        top = self.home / rel if not rel.startswith("/") else Path(rel)
        for sub in ("tmp", "new", "cur"):
            (top / sub).mkdir(parents=True, exist_ok=True)
        return top

    def deliver(self, recipient: str = "pre-ext@example.com", *, ext: str = "ext", dash: str = "-",
                sender: str = SENDER, message: bytes = MSG, default_delivery: str = "./Maildir/\n",
                home: str | None = None, user: str = "popuser") -> LocalResult:
        self.msgfile.write_bytes(message)
        entry = AssignEntry(user, os.getuid(), os.getgid(), str(self.home) if home is None else home,
                            dash, ext)
        return deliver_local(LocalJob(self.msgfile, sender, recipient, entry, default_delivery))

    def run_program(self, command: str, **kw) -> LocalResult:
        """Deliver through ``.qmail-ext`` = ``|command`` and return the result."""
        self.qmail(kw.pop("file", ".qmail-ext"), f"|{command}\n")
        return self.deliver(**kw)


def messages(maildir: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((maildir / "new").iterdir())]


def delivered(recipient: str = "pre-ext@example.com", sender: str = SENDER, message: bytes = MSG) -> bytes:
    """What qmail-local writes into a Maildir: RPLINE, DTLINE, the message."""
    head = f"Return-Path: <{sender}>\nDelivered-To: {recipient}\n"
    return head.encode("utf-8", "surrogateescape") + message


def ok(files: int = 0, forwards: int = 0, programs: int = 0) -> str:
    return f"did {files}+{forwards}+{programs}\n"


@pytest.fixture
def box(mailtmp: Path) -> Box:
    return Box(mailtmp)


# ============================================================================ §3.1 which file

SEARCH_CASES = [
    # dash, ext, files present, file expected, DEFAULT expected (None: unset)
    ("-", "foo-bar", [".qmail-foo-bar", ".qmail-foo-default", ".qmail-default"], ".qmail-foo-bar", None),
    ("-", "foo-bar", [".qmail-foo-default", ".qmail-default"], ".qmail-foo-default", "bar"),
    ("-", "foo-bar", [".qmail-default"], ".qmail-default", "foo-bar"),
    ("-", "a-b-c", [".qmail-a-b-default", ".qmail-a-default"], ".qmail-a-b-default", "c"),
    ("-", "a-b-c", [".qmail-a-default", ".qmail-default"], ".qmail-a-default", "b-c"),
    ("-", "a-", [".qmail-a-", ".qmail-a-default"], ".qmail-a-", None),
    ("-", "a-", [".qmail-a-default", ".qmail-default"], ".qmail-a-default", ""),
    ("-", "", [".qmail-", ".qmail-default"], ".qmail-", None),
    ("-", "", [".qmail-default"], ".qmail-default", ""),
    ("", "", [".qmail", ".qmaildefault"], ".qmail", None),
    ("", "", [".qmaildefault"], ".qmaildefault", ""),
    ("-", "Joe.Smith", [".qmail-joe:smith", ".qmail-default"], ".qmail-joe:smith", None),
    ("-", "Joe.Smith", [".qmail-joe.smith", ".qmail-default"], ".qmail-default", "Joe.Smith"),
    ("-", "FOO-Bar", [".qmail-foo-default"], ".qmail-foo-default", "Bar"),
    ("-", "x-default", [".qmail-x-default", ".qmail-default"], ".qmail-x-default", "default"),
    ("-", "a.b-c", [".qmail-a:b-default"], ".qmail-a:b-default", "c"),
]


@pytest.mark.parametrize(("dash", "ext", "files", "expected", "default"), SEARCH_CASES)
def test_dot_qmail_search_order_and_default(box, dash, ext, files, expected, default):
    for name in files:
        box.qmail(name, f'|printf "%s %s" {name} "${{DEFAULT-unset}}"\n')
    r = box.deliver(ext=ext, dash=dash)
    shown = "unset" if default is None else default
    assert (r.status, r.report) == ("K", f"{expected} {shown}" + ok(0, 0, 1))


def test_directory_named_like_the_file_counts_as_missing(box):
    (box.home / ".qmail-ext").mkdir()
    box.qmail(".qmail-default", "./Maildir/\n")
    md = box.maildir()
    r = box.deliver()
    assert (r.status, r.report) == ("K", ok(1))
    assert messages(md) == [delivered()]


def test_fifo_named_like_the_file_counts_as_missing_and_does_not_hang(box):
    os.mkfifo(box.home / ".qmail-ext")
    r = box.deliver()
    assert (r.status, r.report) == ("D", NO_MAILBOX)


def test_nothing_found_with_a_dash_bounces(box):
    r = box.deliver(ext="nobody")
    assert r == LocalResult("D", NO_MAILBOX, [], "", b"")


def test_missing_dot_qmail_with_empty_dash_uses_default_delivery(box):
    md = box.maildir()
    r = box.deliver("joe@example.com", dash="", ext="")
    assert (r.status, r.report) == ("K", ok(1))
    assert messages(md) == [delivered("joe@example.com")]


def test_empty_dot_qmail_uses_default_delivery(box):
    box.qmail(".qmail-ext", "")
    box.qmail("Mailbox", "")
    r = box.deliver(default_delivery="./Mailbox\n")
    assert (r.status, r.report) == ("K", ok(1))
    assert (box.home / "Mailbox").read_bytes().startswith(b"From alice@remote.test ")


def test_empty_dot_qmail_with_x_bit_still_uses_default_delivery(box):
    box.qmail(".qmail-ext", "", mode=0o744)
    md = box.maildir()
    r = box.deliver()
    assert (r.status, messages(md)) == ("K", [delivered()])


def test_empty_file_and_empty_default_delivery_is_a_blank_first_line(box):
    box.qmail(".qmail-ext", "")
    r = box.deliver(default_delivery="")
    assert (r.status, r.report) == ("Z", "Uh-oh: first line of .qmail file is blank. (#4.2.1)\n")


@pytest.mark.parametrize(("ext", "used"), [
    ("../x", ".qmail-:::x"),
    ("a/b", ".qmail-a:b"),
    (".qmail", ".qmail-:qmail"),
    ("a\nb\x01c\x7fd", ".qmail-a:b:c:d"),
    ("..", ".qmail-::"),
])
def test_hostile_extensions_map_to_names_inside_home(box, ext, used):
    box.qmail(used, f'|printf "%s" "{used}"\n')
    r = box.deliver(f"pre-{ext}@example.com", ext=ext)
    assert (r.status, r.report) == ("K", used + ok(0, 0, 1))


@pytest.mark.parametrize("ext", ["../x", "../../home/.qmail-x", "/etc/passwd", "a/../../b", ".qmail"])
def test_hostile_extensions_never_reach_files_outside_home(box, ext):
    # Files a naive join would find: in the parent, and in a subdirectory qmail itself would enter.
    (box.base / ".qmail-x").write_text("|echo escaped\n")
    (box.home / ".qmail-::").mkdir()
    (box.home / ".qmail-::" / "x").write_text("|echo escaped\n")
    r = box.deliver(f"pre-{ext}@example.com", ext=ext)
    assert r == LocalResult("D", NO_MAILBOX, [], "", b"")


def test_hostile_extension_reaches_default_with_original_text(box):
    box.qmail(".qmail-default", '|printf "%s" "$DEFAULT"\n')
    r = box.deliver("pre-../x@example.com", ext="../x")
    assert (r.status, r.report) == ("K", "../x" + ok(0, 0, 1))


# ============================================================================ §3.2 permissions

@pytest.mark.parametrize(("mode", "report"), [
    (0o775, "Uh-oh: home directory is writable. (#4.7.0)\n"),
    (0o757, "Uh-oh: home directory is writable. (#4.7.0)\n"),
    (0o1755, "Home directory is sticky: user is editing his .qmail file. (#4.2.1)\n"),
])
def test_home_directory_mode_is_a_temporary_failure(box, mode, report):
    box.qmail(".qmail-ext", "./Maildir/\n")
    md = box.maildir()
    box.home.chmod(mode)
    r = box.deliver()
    assert (r.status, r.report, messages(md)) == ("Z", report, [])


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_writable_dot_qmail_is_a_temporary_failure(box, mode):
    box.qmail(".qmail-ext", "./Maildir/\n", mode=mode)
    md = box.maildir()
    r = box.deliver()
    assert (r.status, r.report, messages(md)) == ("Z", "Uh-oh: .qmail file is writable. (#4.7.0)\n", [])


def test_writable_default_file_stops_the_search(box):
    box.qmail(".qmail-foo-default", "./Maildir/\n", mode=0o664)
    box.qmail(".qmail-default", "./Maildir/\n")
    r = box.deliver(ext="foo-bar")
    assert (r.status, r.report) == ("Z", "Uh-oh: .qmail file is writable. (#4.7.0)\n")


def test_missing_home_is_a_temporary_failure(box):
    home = str(box.base / "nohome")
    r = box.deliver(home=home)
    assert (r.status, r.report) == ("Z", f"Unable to switch to {home}: file does not exist. (#4.3.0)\n")


def test_home_that_is_a_file_is_a_temporary_failure(box):
    (box.base / "afile").write_text("")
    home = str(box.base / "afile")
    r = box.deliver(home=home)
    assert (r.status, r.report) == ("Z", f"Unable to switch to {home}: not a directory. (#4.3.0)\n")


def test_relative_home_is_refused(box):
    r = box.deliver(home="relative/home")
    assert r.status == "D" and "not an absolute path" in r.report


@pytest.mark.parametrize(("text", "report"), [
    ("./Maildir/\n", "Uh-oh: .qmail has file delivery but has x bit set. (#4.7.0)\n"),
    ("./Mailbox\n", "Uh-oh: .qmail has file delivery but has x bit set. (#4.7.0)\n"),
    ("|echo hi\n", "Uh-oh: .qmail has prog delivery but has x bit set. (#4.7.0)\n"),
])
def test_user_x_bit_makes_the_file_forward_only(box, text, report):
    box.qmail(".qmail-ext", "&first@example.org\n" + text, mode=0o744)
    md = box.maildir()
    r = box.deliver()
    assert (r.status, r.report, r.forwards, messages(md)) == ("Z", report, [], [])


def test_x_bit_file_with_forwards_only_succeeds(box):
    box.qmail(".qmail-ext", "&a@example.org\nb@example.org\n", mode=0o744)
    r = box.deliver()
    assert (r.status, r.report, r.forwards) == ("K", ok(0, 2), ["a@example.org", "b@example.org"])


def test_plus_list_makes_later_lines_forward_only(box):
    box.qmail(".qmail-ext", "./Maildir/\n+list\n&a@example.org\n./Other/\n")
    md, other = box.maildir(), box.maildir("Other")
    r = box.deliver()
    assert (r.status, r.report) == ("Z", "Uh-oh: .qmail has file delivery but has x bit set. (#4.7.0)\n")
    assert (messages(md), messages(other), r.forwards) == ([delivered()], [], [])


@pytest.mark.parametrize("line", ["+lists", "+List", "+", "+list x"])
def test_other_plus_lines_are_ignored(box, line):
    box.qmail(".qmail-ext", f"{line}\n./Maildir/\n")
    md = box.maildir()
    r = box.deliver()
    assert (r.status, r.report, messages(md)) == ("K", ok(1), [delivered()])


# ============================================================================ §3.3 line types

def test_comments_only_delivers_nothing(box):
    box.qmail(".qmail-ext", "# nothing here\n#./Maildir/\n")
    md = box.maildir()
    r = box.deliver()
    assert (r.status, r.report, messages(md)) == ("K", ok(), [])


def test_blank_first_line_is_a_temporary_failure(box):
    box.qmail(".qmail-ext", "\n./Maildir/\n")
    md = box.maildir()
    r = box.deliver()
    assert (r.status, r.report) == ("Z", "Uh-oh: first line of .qmail file is blank. (#4.2.1)\n")
    assert messages(md) == []


def test_whitespace_only_first_line_counts_as_blank(box):
    box.qmail(".qmail-ext", " \t\n./Maildir/\n")
    assert box.deliver().status == "Z"


def test_later_blank_lines_are_ignored(box):
    box.qmail(".qmail-ext", "./Maildir/\n\n   \n\n./Other/\n")
    md, other = box.maildir(), box.maildir("Other")
    r = box.deliver()
    assert (r.status, r.report, messages(md), messages(other)) == ("K", ok(2), [delivered()], [delivered()])


def test_trailing_spaces_and_tabs_are_removed(box):
    box.qmail(".qmail-ext", "./Maildir/ \t \n./Mailbox\t \n&fw@example.org  \n")
    md = box.maildir()
    r = box.deliver()
    assert (r.status, r.forwards) == ("K", ["fw@example.org"])
    assert messages(md) == [delivered()]
    assert (box.home / "Mailbox").exists() and not (box.home / "Mailbox\t").exists()


def test_missing_final_newline_is_supplied(box):
    box.qmail(".qmail-ext", "./Maildir/\n./Other/")
    md, other = box.maildir(), box.maildir("Other")
    assert box.deliver().report == ok(2)
    assert messages(md) == messages(other) == [delivered()]


def test_leading_space_makes_a_forward_of_the_whole_line(box):
    box.qmail(".qmail-ext", " ./Maildir/\n")
    r = box.deliver()
    assert (r.status, r.forwards) == ("K", [" ./Maildir/"])


@pytest.mark.parametrize(("text", "forwards"), [
    ("&joe@example.org\n", ["joe@example.org"]),
    ("joe@example.org\n", ["joe@example.org"]),
    ("&joe\n", ["joe"]),
    ("&a@x.test\nb@y.test\n&c@z.test\n", ["a@x.test", "b@y.test", "c@z.test"]),
    ("J\xf6rg@example.org\n", ["J\udcf6rg@example.org"]),  # the queue's text for byte 0xf6
])
def test_forward_lines(box, text, forwards):
    box.qmail(".qmail-ext", text)
    r = box.deliver()
    assert r == LocalResult("K", ok(0, len(forwards)), forwards, SENDER,
                            b"Delivered-To: pre-ext@example.com\n")


def test_several_maildirs_and_an_mbox_in_one_file(box, mailtmp):
    absolute = mailtmp / "elsewhere" / "Maildir"
    box.qmail(".qmail-ext", f"./Maildir/\n./sub/Second/\n{absolute}/\n./Mailbox\n")
    m1, m2, m3 = box.maildir(), box.maildir("sub/Second"), box.maildir(str(absolute))
    r = box.deliver()
    assert (r.status, r.report) == ("K", ok(4))
    assert messages(m1) == messages(m2) == messages(m3) == [delivered()]
    mb = (box.home / "Mailbox").read_bytes()
    first, rest = mb.split(b"\n", 1)
    assert UFLINE_RE.fullmatch(first + b"\n")
    assert rest == delivered() + b"\n"


def test_maildir_file_is_exactly_rpline_dtline_message(box):
    box.qmail(".qmail-ext", "./Maildir/\n")
    md = box.maildir()
    msg = b"Subject: 8bit \xe4\xf6\xfc\r\n\r\nno final newline \x00\xff"
    box.deliver("pre-Ext@Example.COM", message=msg)
    assert messages(md) == [b"Return-Path: <alice@remote.test>\nDelivered-To: pre-Ext@Example.COM\n" + msg]
    name = next((md / "new").iterdir())
    assert stat.S_IMODE(name.stat().st_mode) == 0o600
    assert list((md / "tmp").iterdir()) == []


def test_missing_maildir_is_a_temporary_failure(box):
    box.qmail(".qmail-ext", "./NoSuchMaildir/\n")
    r = box.deliver()
    assert (r.status, r.report) == ("Z", "Unable to chdir to maildir. (#4.2.1)\n")


def test_first_failure_stops_everything(box):
    box.qmail(".qmail-ext", "./Maildir/\n&fw@example.org\n|exit 111\n./Other/\n")
    md, other = box.maildir(), box.maildir("Other")
    r = box.deliver()
    assert r == LocalResult("Z", "", [], "", b"")
    assert (messages(md), messages(other)) == ([delivered()], [])


def test_permanent_program_failure_cancels_forwards(box):
    box.qmail(".qmail-ext", "&fw@example.org\n|echo refused; exit 100\n")
    assert box.deliver() == LocalResult("D", "refused\n", [], "", b"")


def test_exit_99_stops_but_keeps_earlier_forwards(box):
    box.qmail(".qmail-ext", "&a@example.org\n|echo stop; exit 99\n&b@example.org\n./Maildir/\n")
    md = box.maildir()
    r = box.deliver()
    assert (r.status, r.report, r.forwards) == ("K", "stop\n" + ok(0, 1, 1), ["a@example.org"])
    assert messages(md) == []


def test_exit_99_after_deliveries(box):
    box.qmail(".qmail-ext", "./Maildir/\n|exit 99\n./Other/\n")
    md, other = box.maildir(), box.maildir("Other")
    r = box.deliver()
    assert (r.status, r.report, messages(md), messages(other)) == ("K", ok(1, 0, 1), [delivered()], [])


def test_message_passed_as_a_descriptor_is_used_and_left_open(box):
    # The delivery workers name the queued message /proc/self/fd/N (a descriptor from the manager).
    box.qmail(".qmail-ext", "./Maildir/\n|cat > one\n|cat > two\n")
    md = box.maildir()
    box.msgfile.write_bytes(MSG)
    fd = os.open(box.msgfile, os.O_RDONLY)
    try:
        os.lseek(fd, 7, os.SEEK_SET)  # wherever the offset is, the whole message is delivered
        entry = AssignEntry("popuser", os.getuid(), os.getgid(), str(box.home), "-", "ext")
        r = deliver_local(LocalJob(Path(f"/proc/self/fd/{fd}"), SENDER, "pre-ext@example.com", entry, ""))
        assert (r.status, r.report) == ("K", ok(1, 0, 2))
        assert messages(md) == [delivered()]
        assert (box.home / "one").read_bytes() == (box.home / "two").read_bytes() == MSG
        os.fstat(fd)  # still open: the worker closes it
    finally:
        os.close(fd)


def test_unreadable_message_is_a_temporary_failure(box):
    box.qmail(".qmail-ext", "./Maildir/\n")
    entry = AssignEntry("popuser", os.getuid(), os.getgid(), str(box.home), "-", "ext")
    r = deliver_local(LocalJob(box.base / "no-such-message", SENDER, "pre-ext@example.com", entry, ""))
    assert (r.status, r.report) == ("Z", "Unable to read message: file does not exist. (#4.3.0)\n")


# ============================================================================ §3.6 programs

@pytest.mark.parametrize(("code", "status"), [
    (0, "K"), (99, "K"),
    (100, "D"), (64, "D"), (65, "D"), (70, "D"), (76, "D"), (77, "D"), (78, "D"), (112, "D"),
    (111, "Z"), (1, "Z"), (2, "Z"), (71, "Z"), (75, "Z"), (101, "Z"), (255, "Z"),
])
def test_program_exit_codes(box, code, status):
    r = box.run_program(f"exit {code}")
    assert r.status == status
    assert r.report == (ok(0, 0, 1) if status == "K" else "")


def test_program_killed_by_a_signal_is_temporary(box):
    r = box.run_program("echo before; kill -9 $$")
    assert (r.status, r.report) == ("Z", "before\nAack, child crashed. (#4.3.0)\n")


def test_program_gets_the_message_without_rpline_and_dtline(box):
    r = box.run_program("cat > got")
    assert r.status == "K"
    assert (box.home / "got").read_bytes() == MSG


def test_every_program_line_reads_the_whole_message(box):
    box.qmail(".qmail-ext", "|cat > one\n|head -c 5 > two\n|cat > three\n")
    assert box.deliver().status == "K"
    assert [(box.home / n).read_bytes() for n in ("one", "two", "three")] == [MSG, MSG[:5], MSG]


def test_program_runs_in_home_with_umask_077(box):
    r = box.run_program("pwd; umask")
    assert r.report == f"{box.home}\n0077\n" + ok(0, 0, 1)


def test_program_output_and_errors_form_the_report(box):
    r = box.run_program("echo out; echo err >&2; exit 111")
    assert (r.status, r.report) == ("Z", "out\nerr\n")


def test_reports_of_several_programs_accumulate(box):
    box.qmail(".qmail-ext", "|echo one\n|echo two\n")
    assert box.deliver().report == "one\ntwo\n" + ok(0, 0, 2)


def test_long_program_output_is_truncated_as_qmail_lspawn_does(box):
    r = box.run_program("head -c 10000 /dev/zero | tr '\\0' x")
    assert r.report == "x" * 2966 + "\nError report too long, sorry.\n"
    assert r.status == "K"


def test_report_ends_at_a_nul_byte(box):
    r = box.run_program("printf 'a\\000b'")
    assert (r.status, r.report) == ("K", "a")


def _env_value(box: Box, var: str, **kw) -> str:
    r = box.run_program(f'printf "%s" "${{{var}-unset}}"', **kw)
    assert r.status == "K", r.report
    assert r.report.endswith(ok(0, 0, 1))
    return r.report[: -len(ok(0, 0, 1))]


@pytest.mark.parametrize(("var", "kw", "expected"), [
    ("SENDER", {}, SENDER),
    ("SENDER", {"sender": ""}, ""),
    ("NEWSENDER", {}, SENDER),
    ("NEWSENDER", {"sender": "#@[]"}, "#@[]"),
    ("RECIPIENT", {}, "pre-ext@example.com"),
    ("RECIPIENT", {"recipient": "Pre-Ext@Example.COM"}, "Pre-Ext@Example.COM"),
    ("USER", {}, "popuser"),
    ("LOCAL", {"recipient": "pre-ext@a@example.com"}, "pre-ext@a"),
    ("HOST", {"recipient": "pre-ext@a@example.com"}, "example.com"),
    ("HOST", {"recipient": "pre-ext@a.b.c.d"}, "a.b.c.d"),
    ("HOST2", {"recipient": "pre-ext@a.b.c.d"}, "a.b.c"),
    ("HOST3", {"recipient": "pre-ext@a.b.c.d"}, "a.b"),
    ("HOST4", {"recipient": "pre-ext@a.b.c.d"}, "a"),
    ("HOST2", {"recipient": "pre-ext@example.com"}, "example"),
    ("HOST3", {"recipient": "pre-ext@example.com"}, "example"),
    ("HOST4", {"recipient": "pre-ext@localhost"}, "localhost"),
    ("HOST2", {"recipient": "pre-ext@"}, ""),
    ("EXT", {"ext": "Ext-One-Two-Three-Four", "file": ".qmail-default"}, "Ext-One-Two-Three-Four"),
    ("EXT2", {"ext": "a-b-c-d-e", "file": ".qmail-default"}, "b-c-d-e"),
    ("EXT3", {"ext": "a-b-c-d-e", "file": ".qmail-default"}, "c-d-e"),
    ("EXT4", {"ext": "a-b-c-d-e", "file": ".qmail-default"}, "d-e"),
    ("EXT2", {"ext": "plain", "file": ".qmail-default"}, ""),
    ("EXT3", {"ext": "a-b", "file": ".qmail-default"}, ""),
    ("EXT2", {"ext": "a-", "file": ".qmail-default"}, ""),
    ("EXT2", {"ext": "-a", "file": ".qmail-default"}, "a"),
    ("EXT4", {"ext": "a--", "file": ".qmail-default"}, ""),
    ("DEFAULT", {}, "unset"),
    ("DEFAULT", {"ext": "List-Bob", "file": ".qmail-list-default"}, "Bob"),
    ("DTLINE", {}, "Delivered-To: pre-ext@example.com\n"),
    ("DTLINE", {"recipient": "pre-e\nxt@example.com"}, "Delivered-To: pre-e_xt@example.com\n"),
    ("RPLINE", {}, f"Return-Path: <{SENDER}>\n"),
    ("RPLINE", {"sender": ""}, "Return-Path: <>\n"),
    ("RPLINE", {"sender": "a b@example.org"}, 'Return-Path: <"a b"@example.org>\n'),
])
def test_program_environment(box, var, kw, expected):
    assert _env_value(box, var, **kw) == expected


def test_program_environment_home(box):
    assert _env_value(box, "HOME") == str(box.home)


def test_inherited_default_is_not_passed_on(box, monkeypatch):
    monkeypatch.setenv("DEFAULT", "inherited")
    assert _env_value(box, "DEFAULT") == "unset"


@pytest.mark.parametrize(("sender", "who"), [
    (SENDER, SENDER), ("", "MAILER-DAEMON"), ("a b\tc@x.test", "a-b-c@x.test"),
])
def test_program_ufline(box, sender, who):
    before = int(time.time())
    value = _env_value(box, "UFLINE", sender=sender).encode()
    after = int(time.time())
    m = UFLINE_RE.fullmatch(value)
    assert m and m.group(1).decode() == who
    stamp = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(before)).encode()
    stamp2 = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(after)).encode()
    assert value[len(f"From {who} "):-1] in (stamp, stamp2)


# ============================================================================ §3.7 forwarding sender

@pytest.mark.parametrize(("files", "sender", "new_sender"), [
    ([], SENDER, SENDER),
    ([".qmail-ext-owner"], SENDER, "pre-ext-owner@example.com"),
    ([".qmail-ext-owner", ".qmail-ext-owner-default"], SENDER, "pre-ext-owner-@example.com-@[]"),
    ([".qmail-ext-owner-default"], SENDER, SENDER),
    ([".qmail-ext-owner", ".qmail-ext-owner-default"], "", ""),
    ([".qmail-ext-owner", ".qmail-ext-owner-default"], "#@[]", "#@[]"),
])
def test_newsender_for_forwards(box, files, sender, new_sender):
    for name in files:
        box.qmail(name, "./Maildir/\n")
    box.qmail(".qmail-ext", "&list-member@example.org\n|printf '%s' \"$NEWSENDER\"\n")
    r = box.deliver(sender=sender)
    assert r == LocalResult("K", new_sender + ok(0, 1, 1), ["list-member@example.org"], new_sender,
                            b"Delivered-To: pre-ext@example.com\n")


def test_owner_files_follow_the_lowercased_extension(box):
    box.qmail(".qmail-list:x-owner", "")
    box.qmail(".qmail-list:x", "&m@example.org\n")
    r = box.deliver("pre-List.X@example.com", ext="List.X")
    assert (r.new_sender, r.forwards) == ("pre-List.X-owner@example.com", ["m@example.org"])


def test_owner_file_for_a_default_match_uses_the_full_extension(box):
    # qmeox looks for .qmail + dash + safeext + -owner, whatever file matched.
    box.qmail(".qmail-default", "&m@example.org\n")
    box.qmail(".qmail-ext-owner", "")
    r = box.deliver()
    assert r.new_sender == "pre-ext-owner@example.com"


# ============================================================================ §3.5 loops

DT = b"Delivered-To: pre-ext@example.com\n"


@pytest.mark.parametrize(("message", "status"), [
    (DT + MSG, "D"),
    (b"Received: x\n" + DT + b"Subject: y\n\nbody\n", "D"),
    (b"Subject: y\n" + DT, "D"),
    (b"Subject: y\n\n" + DT, "K"),
    (b"Subject: y\n\nbody\n" + DT, "K"),
    (b"\n" + DT, "K"),
    (b"Delivered-To: Pre-Ext@Example.com\n\nbody\n", "K"),
    (b"Delivered-To: pre-ext@example.com \n\nbody\n", "K"),
    (b"X-Delivered-To: pre-ext@example.com\n\nbody\n", "K"),
    (b"Delivered-To: other@example.com\n" + b"\n" + b"body\n", "K"),
    (b"Subject: y\n" + DT[:-1], "K"),
    (b"Subject: y\r\n\r\n" + DT, "D"),
])
def test_loop_detection_on_exact_header_line(box, message, status):
    box.qmail(".qmail-ext", "./Maildir/\n")
    md = box.maildir()
    r = box.deliver(message=message)
    assert r.status == status
    if status == "D":
        assert (r.report, messages(md)) == (LOOP, [])
    else:
        assert messages(md) == [delivered(message=message)]


def test_loop_is_detected_before_the_dot_qmail_search(box):
    r = box.deliver(ext="nobody", recipient="pre-nobody@example.com",
                    message=b"Delivered-To: pre-nobody@example.com\n\n")
    assert (r.status, r.report) == ("D", LOOP)


def test_home_check_comes_before_loop_detection(box):
    box.home.chmod(0o775)
    r = box.deliver(message=DT + MSG)
    assert r.status == "Z"


# ============================================================================ §3.4 / §3.10 mbox

def _mbox(box: Box, message: bytes, sender: str = SENDER) -> bytes:
    box.qmail(".qmail-ext", "./Mailbox\n")
    r = box.deliver(message=message, sender=sender)
    assert (r.status, r.report) == ("K", ok(1))
    return (box.home / "Mailbox").read_bytes()


@pytest.mark.parametrize(("message", "body"), [
    (b"Subject: s\n\nFrom here\n", b"Subject: s\n\n>From here\n\n"),
    (b"Subject: s\n\n>From here\n>>From there\n", b"Subject: s\n\n>>From here\n>>>From there\n\n"),
    (b"From x\n\nFromage\n From y\nFrom\n", b">From x\n\nFromage\n From y\nFrom\n\n"),
    (b"Subject: s\n\nno final newline", b"Subject: s\n\nno final newline\n\n"),
    (b"Subject: s\n\nFrom the end", b"Subject: s\n\n>From the end\n\n"),
    (b"", b"\n"),
    (b"Subject: s\n\n\n", b"Subject: s\n\n\n\n"),
])
def test_mbox_from_quoting_and_final_blank_line(box, message, body):
    data = _mbox(box, message)
    first, rest = data.split(b"\n", 1)
    assert UFLINE_RE.fullmatch(first + b"\n")
    assert rest == b"Return-Path: <alice@remote.test>\nDelivered-To: pre-ext@example.com\n" + body


def test_mbox_ufline_empty_sender_and_odd_sender(box):
    assert _mbox(box, MSG, sender="").startswith(b"From MAILER-DAEMON ")
    (box.home / "Mailbox").unlink()
    data = _mbox(box, MSG, sender="a b@x.test")
    assert data.startswith(b"From a-b@x.test ")
    assert b'\nReturn-Path: <"a b"@x.test>\n' in data


def test_mbox_appends_and_is_created_0600(box):
    box.qmail(".qmail-ext", "./Mailbox\n")
    box.deliver(message=b"one\n")
    box.deliver(message=b"two\n")
    data = (box.home / "Mailbox").read_bytes()
    head = b"Return-Path: <alice@remote.test>\nDelivered-To: pre-ext@example.com\n"
    first, second = data.split(b"\n\nFrom ")
    assert UFLINE_RE.fullmatch(first.split(b"\n", 1)[0] + b"\n")
    assert first.split(b"\n", 1)[1] == head + b"one"
    assert second.split(b"\n", 1)[1] == head + b"two\n\n"
    assert stat.S_IMODE((box.home / "Mailbox").stat().st_mode) == 0o600


def test_mbox_date_is_now_in_utc(box):
    before = int(time.time())
    data = _mbox(box, MSG)
    after = int(time.time())
    line = data.split(b"\n", 1)[0] + b"\n"
    stamps = {time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(t)).encode() for t in (before, after)}
    assert line[len("From alice@remote.test "):-1] in stamps


def test_mbox_write_error_is_temporary(box):
    box.qmail(".qmail-ext", "/dev/full\n")
    r = box.deliver()
    assert (r.status, r.report) == ("Z", "Unable to write /dev/full: out of disk space. (#4.3.0)\n")


def test_mbox_open_error_is_temporary(box):
    box.qmail(".qmail-ext", "./no/such/dir/Mailbox\n")
    r = box.deliver()
    assert r.status == "Z"
    assert r.report == "Unable to open ./no/such/dir/Mailbox: file does not exist. (#4.2.1)\n"


# ============================================================================ §3.4 Return-Path / Delivered-To

@pytest.mark.parametrize(("sender", "rpline"), [
    ("", b"Return-Path: <>\n"),
    ("bob@example.org", b"Return-Path: <bob@example.org>\n"),
    ("a b@example.org", b'Return-Path: <"a b"@example.org>\n'),
    ('a"b@example.org', b'Return-Path: <"a\\"b"@example.org>\n'),
    (".bob@example.org", b'Return-Path: <".bob"@example.org>\n'),
    ("bo..b@example.org", b'Return-Path: <"bo..b"@example.org>\n'),
    ("@example.org", b'Return-Path: <""@example.org>\n'),
    ("#@[]", b"Return-Path: <#@[]>\n"),
    ("x@y@example.org", b'Return-Path: <"x@y"@example.org>\n'),
    ("j\udcf6rg@example.org", b'Return-Path: <"j\xf6rg"@example.org>\n'),
    ("j\xf6rg@example.org", b'Return-Path: <"j\xc3\xb6rg"@example.org>\n'),
    ("a\nb@example.org", b'Return-Path: <"a\\_b"@example.org>\n'),
    ("list-owner-bob=x.net@ex.org", b"Return-Path: <list-owner-bob=x.net@ex.org>\n"),
])
def test_return_path_in_maildir(box, sender, rpline):
    box.qmail(".qmail-ext", "./Maildir/\n")
    md = box.maildir()
    box.deliver(sender=sender)
    assert messages(md) == [rpline + b"Delivered-To: pre-ext@example.com\n" + MSG]


def test_eight_bit_recipient_and_sender_bytes_pass_unchanged(box):
    box.qmail(".qmail-default", "./Maildir/\n")
    md = box.maildir()
    r = box.deliver("pre-m\udcfcller@ex\u00e4mple.com", ext="m\udcfcller", sender="\udce9@x")
    assert r.status == "K"
    head = b'Return-Path: <"\xe9"@x>\nDelivered-To: pre-m\xfcller@ex\xc3\xa4mple.com\n'
    assert messages(md) == [head + MSG]


def test_delivered_to_keeps_case_and_replaces_newline(box):
    box.qmail(".qmail-ext", "./Maildir/\n")
    md = box.maildir()
    box.deliver("Pre-E\nXT@Example.COM")
    assert messages(md)[0].split(b"\n")[1] == b"Delivered-To: Pre-E_XT@Example.COM"


# ============================================================================ group commit

def _group_deliver(box: Box, group: maildir.SyncGroup, tag: object) -> LocalResult:
    box.msgfile.write_bytes(MSG)
    entry = AssignEntry("popuser", os.getuid(), os.getgid(), str(box.home), "-", "ext")
    return deliver_local(LocalJob(box.msgfile, SENDER, "pre-ext@example.com", entry, "./Maildir/\n"),
                         group, tag)


@pytest.mark.skipif(not maildir.group_commit_available(), reason="SyncGroup delivers at once here")
def test_in_a_group_the_maildir_counts_at_commit(box):
    md = box.maildir()
    box.qmail(".qmail-ext", "./Maildir/\n")
    group = maildir.SyncGroup()
    assert _group_deliver(box, group, 1).report == ok(files=1)
    assert messages(md) == []
    group.commit()
    assert group.failed == {}
    assert messages(md) == [delivered()]


def test_in_a_group_a_program_sees_the_lines_above_it_delivered(box):
    md = box.maildir()
    box.qmail(".qmail-ext", "./Maildir/\n|ls Maildir/new | wc -l\n")
    group = maildir.SyncGroup()
    result = _group_deliver(box, group, 1)
    assert result.status == "K"
    assert result.report == "1\n" + ok(files=1, programs=1)
    assert len(group) == 0 and messages(md) == [delivered()]
