"""pqmail.config.edit: hand-written comments and order survive, edits are atomic, add is idempotent."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pqmail.config import edit
from pqmail.config.edit import ASSIGN, COLON, NAMES, LineConflict, LineFile
from pqmail.errors import ConfigError

RCPTHOSTS = """# accepted domains, kept by hand
mx.isp.test

# customers
example.com
.example.com
"""


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_bytes(text.encode("latin-1"))
    path.chmod(mode)
    return path


def temp_files(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if n.endswith(".tmp")]


# ----------------------------------------------------------------------------- pure edits

@pytest.mark.parametrize("fmt, lines, line, want", [
    (NAMES, ["# c", "a.com"], "b.com", ["# c", "a.com", "b.com"]),
    (NAMES, ["# c", "a.com"], "A.COM", None),  # rcpthosts ignores case: already there
    (NAMES, ["a.com  "], "a.com", None),  # trailing blanks do not count (control_readfile)
    (COLON, ["a.com:a.com", "#x:y"], "b.com:b.com", ["a.com:a.com", "#x:y", "b.com:b.com"]),
    (COLON, ["A.com:a.com"], "a.com:a.com", None),
    (ASSIGN, ["=joe:joe:1:1:/h:::", ".", "junk after the end"], "+x-:u:2:2:/x:-::",
     ["=joe:joe:1:1:/h:::", "+x-:u:2:2:/x:-::", ".", "junk after the end"]),
    (ASSIGN, [], "+x-:u:2:2:/x:-::", ["+x-:u:2:2:/x:-::", "."]),
    (ASSIGN, ["=x-:u:2:2:/x:::", "."], "+x-:u:2:2:/x:-::", ["=x-:u:2:2:/x:::", "+x-:u:2:2:/x:-::", "."]),
])
def test_add_line(fmt, lines, line, want):
    assert edit.add_line(lines, fmt, line) == want


@pytest.mark.parametrize("fmt, lines, line", [
    (COLON, ["# hand", "example.com:ex1"], "example.com:example.com"),
    (ASSIGN, ["+x-:u:2:2:/x:-::", "."], "+X-:u:3:3:/x:-::"),
])
def test_add_refuses_a_different_entry_under_the_same_key(fmt, lines, line):
    with pytest.raises(edit._Conflict) as e:
        edit.add_line(lines, fmt, line)
    assert e.value.index == (1 if lines[0].startswith("#") else 0)


def test_assign_entries_after_the_final_dot_are_not_entries():
    lines = ["=a:a:1:1:/a:::", ".", "+x-:u:2:2:/x:-::"]
    assert edit.add_line(lines, ASSIGN, "+x-:u:2:2:/x:-::") == ["=a:a:1:1:/a:::", "+x-:u:2:2:/x:-::", ".",
                                                              "+x-:u:2:2:/x:-::"]
    assert edit.remove_key(lines, ASSIGN, "+x-") == (lines, 0)


def test_remove_key_and_remove_line():
    lines = ["# keep", "a.com:a", "b.com:b", "A.COM:other", "#a.com:a"]
    assert edit.remove_key(lines, COLON, "a.com") == (["# keep", "b.com:b", "#a.com:a"], 2)
    assert edit.remove_line(lines, COLON, "a.com:a") == (["# keep", "b.com:b", "A.COM:other", "#a.com:a"], 1)
    assert edit.remove_key(lines, COLON, "c.com") == (lines, 0)


def test_replace_line_keeps_the_position_and_drops_duplicates():
    lines = ["# x", "a.com:old", "b.com:b", "a.com:older"]
    assert edit.replace_line(lines, COLON, "a.com:new") == ["# x", "a.com:new", "b.com:b"]
    assert edit.replace_line(["a.com:new"], COLON, "a.com:new") is None
    assert edit.replace_line(["# x"], COLON, "c.com:c") == ["# x", "c.com:c"]


def test_lines_with_newlines_are_refused():
    with pytest.raises(ValueError):
        edit.add_line([], NAMES, "a.com\nevil.com")


# ----------------------------------------------------------------------------- the file

def test_add_keeps_comments_blank_lines_and_order(tmp_path):
    path = write(tmp_path / "rcpthosts", RCPTHOSTS)
    assert LineFile(path, NAMES).add("second-example.com") is True
    assert path.read_text() == RCPTHOSTS + "second-example.com\n"


def test_add_is_idempotent_and_does_not_rewrite(tmp_path):
    path = write(tmp_path / "rcpthosts", RCPTHOSTS)
    before = os.stat(path)
    lf = LineFile(path, NAMES)
    assert lf.add("example.com") is False
    assert lf.add("EXAMPLE.COM") is False
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert path.read_text() == RCPTHOSTS


def test_a_change_replaces_the_file_atomically(tmp_path):
    path = write(tmp_path / "rcpthosts", RCPTHOSTS)
    ino = os.stat(path).st_ino
    with open(path, "rb") as keep:  # a reader that opened the old file keeps seeing all of it
        LineFile(path, NAMES).add("new.example")
        assert os.stat(path).st_ino != ino  # a new file renamed into place, not rewritten in place
        assert keep.read().decode() == RCPTHOSTS
    assert temp_files(tmp_path) == []


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = write(tmp_path / "virtualdomains", "a.com:a\n")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        LineFile(path, COLON).add("b.com:b")
    assert path.read_text() == "a.com:a\n"
    assert temp_files(tmp_path) == []


def test_mode_and_owner_are_kept_without_group_or_world_write(tmp_path):
    path = write(tmp_path / "virtualdomains", "a.com:a\n", mode=0o664)
    LineFile(path, COLON).add("b.com:b")
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o644
    path.chmod(0o640)
    LineFile(path, COLON).add("c.com:c")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_a_new_file_is_created_with_the_given_mode(tmp_path):
    path = tmp_path / "smtproutes"
    assert LineFile(path, COLON, mode=0o644).add("second-example.com:127.0.0.1:2727")
    assert path.read_text() == "second-example.com:127.0.0.1:2727\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_a_last_line_without_newline_gets_one(tmp_path):
    path = write(tmp_path / "rcpthosts", "# x\na.com")
    LineFile(path, NAMES).add("b.com")
    assert path.read_text() == "# x\na.com\nb.com\n"


def test_eight_bit_content_survives(tmp_path):
    path = tmp_path / "virtualdomains"
    path.write_bytes(b"# caf\xe9 \xff\na.com:a\n")
    LineFile(path, COLON).add("b.com:b")
    assert path.read_bytes() == b"# caf\xe9 \xff\na.com:a\nb.com:b\n"


def test_conflict_names_file_and_line_and_changes_nothing(tmp_path):
    path = write(tmp_path / "virtualdomains", "# by hand\nexample.com:ex1\n")
    with pytest.raises(LineConflict) as e:
        LineFile(path, COLON).add("example.com:example.com")
    assert str(e.value).startswith(f"{path}:2: already has 'example.com:ex1'")
    assert e.value.exit_code == 100
    assert path.read_text() == "# by hand\nexample.com:ex1\n"
    with pytest.raises(LineConflict):
        LineFile(path, COLON).check_add("example.com:example.com")
    assert LineFile(path, COLON).check_add("other.com:other.com") is True
    assert path.read_text() == "# by hand\nexample.com:ex1\n"


def test_remove_deletes_only_matching_lines(tmp_path):
    path = write(tmp_path / "rcpthosts", RCPTHOSTS)
    lf = LineFile(path, NAMES)
    assert lf.remove("example.com") == 1
    assert lf.remove(".example.com") == 1
    assert path.read_text() == "# accepted domains, kept by hand\nmx.isp.test\n\n# customers\n"
    before = os.stat(path).st_ino
    assert lf.remove("example.com") == 0
    assert os.stat(path).st_ino == before  # nothing to do: not rewritten


def test_remove_line_leaves_a_hand_changed_entry(tmp_path):
    path = write(tmp_path / "smtproutes", "a.com:relay.isp.net\n")
    assert LineFile(path, COLON).remove_line("a.com:127.0.0.1") == 0
    assert path.read_text() == "a.com:relay.isp.net\n"


def test_assign_insert_goes_before_the_final_dot(tmp_path):
    path = write(tmp_path / "assign", "=postmaster:alias:7:7:/var/qmail/alias:-:postmaster:\n.\n")
    lf = LineFile(path, ASSIGN)
    assert lf.add("+example.com-:nobody:65534:65534:/home/popmail/e/ex1/DOMAINS/example.com:-::")
    assert path.read_text() == ("=postmaster:alias:7:7:/var/qmail/alias:-:postmaster:\n"
                                "+example.com-:nobody:65534:65534:/home/popmail/e/ex1/DOMAINS/example.com:-::\n"
                                ".\n")
    assert lf.find("+EXAMPLE.com-") == [
        (2, "+example.com-:nobody:65534:65534:/home/popmail/e/ex1/DOMAINS/example.com:-::")]
    assert lf.remove("+example.com-") == 1
    assert path.read_text() == "=postmaster:alias:7:7:/var/qmail/alias:-:postmaster:\n.\n"


def test_assign_without_final_dot_is_refused_with_its_line(tmp_path):
    path = write(tmp_path / "assign", "=a:a:1:1:/a:::\n=b:b:1:1:/b:::\n")
    with pytest.raises(ConfigError) as e:
        LineFile(path, ASSIGN).add("+x-:u:2:2:/x:-::")
    assert str(e.value).startswith(f"{path}:2: no final line starting with '.'")
    assert path.read_text() == "=a:a:1:1:/a:::\n=b:b:1:1:/b:::\n"


def test_a_nul_byte_is_a_config_error_with_its_line(tmp_path):
    path = tmp_path / "rcpthosts"
    path.write_bytes(b"a.com\nb\0.com\n")
    with pytest.raises(ConfigError) as e:
        LineFile(path, NAMES).add("c.com")
    assert e.value.line == 2


def test_entries_and_find(tmp_path):
    path = write(tmp_path / "handles", "# handle:base\nex1:/home/popmail\nex2:/srv/pop\n")
    lf = LineFile(path, COLON)
    assert lf.entries() == [(2, "ex1", "ex1:/home/popmail"), (3, "ex2", "ex2:/srv/pop")]
    assert lf.find("ex2") == [(3, "ex2:/srv/pop")]
    assert lf.find("ex3") == []
