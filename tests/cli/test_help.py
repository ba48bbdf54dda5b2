"""``pqmail help control``, and the guard that keeps config/reference.py complete and truthful.

The reference must name every file the code reads (a source scan finds them), every entry must name
a file the code really mentions, and the README must mention every entry.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pqmail
from conftest import run_pqmail
from pqmail.cli import help_cmd
from pqmail.config import reference as ref

SRC = Path(pqmail.__file__).resolve().parent
README = Path(__file__).resolve().parents[2] / "README.md"
# Modules that document files rather than read them.
DOC_MODULES = {SRC / "config" / "reference.py", SRC / "cli" / "help_cmd.py"}


def help_control(*args: str) -> subprocess.CompletedProcess:
    """``pqmail help control ARGS`` through the module's own entry point (stdout is a pipe)."""
    p = subprocess.run([sys.executable, "-m", "pqmail.cli.help_cmd", "control", *args],
                       capture_output=True, timeout=60)
    assert b"Traceback" not in p.stderr, p.stderr.decode(errors="replace")
    return p


# ----------------------------------------------------------------------------- the command

def test_table_lists_every_file_once() -> None:
    p = help_control()
    assert p.returncode == 0, p.stderr
    text = p.stdout.decode()
    table = text.split("\nKinds:")[0]
    for e in ref.ENTRIES:
        rows = [ln for ln in table.splitlines() if re.match(rf"  {re.escape(e.name)}\s", ln)]
        assert len(rows) == 1, (e.name, rows)
        assert e.summary in rows[0] and f" {e.origin} " in rows[0]
    for place in ref.PLACES.values():
        assert place in text


def test_one_file_in_detail() -> None:
    p = help_control("rcpthosts")
    assert p.returncode == 0, p.stderr
    text = p.stdout.decode()
    entry = ref.find("rcpthosts")
    assert entry is not None
    assert text.startswith("control/rcpthosts  (qmail's own file")
    assert f"  meaning:  {entry.summary}" in text
    assert f"  default:  {entry.default}" in text
    assert "  read by:  smtpd: on change" in text
    assert "open relay" in text


@pytest.mark.parametrize(("name", "path"), [
    ("control/relayclients", "control/relayclients"),
    ("users/assign", "users/assign"),
    ("DIR/relayhost", "DIR/RELAYHOST"),
    ("SERVERCERT.PEM", "control/servercert.pem"),
])
def test_names_in_any_usual_form(name: str, path: str) -> None:
    entry = ref.find(name)
    assert entry is not None and entry.path == path
    p = help_control(name)
    assert p.returncode == 0 and p.stdout.decode().startswith(path + "  (")


def test_unknown_name_is_a_usage_error() -> None:
    for name in ("qmqpservers", "users/rcpthosts", "nowhere/me"):
        p = help_control(name)
        assert p.returncode == 100
        assert p.stdout == b""
        err = p.stderr.decode()
        assert err.count("\n") == 1 and f"{name}: pqmail reads no such file" in err


def test_rich_table_names_every_file(capsys: pytest.CaptureFixture[str]) -> None:
    help_cmd.print_rich_table()
    out = capsys.readouterr().out
    for e in ref.ENTRIES:
        assert re.search(rf"│ {re.escape(e.name)}\s", out), e.name


def test_pqmail_help_when_registered() -> None:
    from pqmail.cli.main import COMMANDS

    if "help" not in COMMANDS:
        pytest.skip("pqmail help is not registered in cli/main.py COMMANDS yet")
    p = run_pqmail("help", "control", "rcpthosts")
    assert p.stdout.decode().startswith("control/rcpthosts  (")


# ----------------------------------------------------------------------------- the reference itself

def test_entries_are_well_formed() -> None:
    seen = set()
    for e in ref.ENTRIES:
        assert (e.place, e.name) not in seen, e.name
        seen.add((e.place, e.name))
        assert e.place in ref.PLACES and e.kind in ref.KINDS and e.origin in ref.ORIGINS, e.name
        assert e.readers and all(r.service and r.when for r in e.readers), e.name
        assert e.summary and "\n" not in e.summary and "\n" not in e.default, e.name


def _sources() -> list[tuple[Path, str]]:
    return [(p, p.read_text("utf-8")) for p in sorted(SRC.rglob("*.py")) if p not in DOC_MODULES]


# What names a file the code reads, by where it lives. Each pattern is one way the code spells it.
CONTROL_PATTERNS = [
    re.compile(r"""control_file\(\s*["']([^"']+)["']"""),  # root.control_file("rcpthosts")
    re.compile(r"""\bcontrol(?:_dir)?\s*/\s*["']([^"']+)["']"""),  # root.control / "x", control_dir / "x"
    re.compile(r"""(?<![\w/.])control/([a-z0-9][\w.-]*[a-z0-9])"""),  # control/NAME in code and help texts
    re.compile(r"""\b(?:_number|control_number)\(\s*root\s*,\s*["']([^"']+)["']"""),  # numeric settings
    re.compile(r"""\bld\.(?:value|lines|name_set|colon_map|path)\(\s*["']([^"']+)["']"""),  # load_control
]
USERS_PATTERNS = [re.compile(r"""\busers\s*/\s*["']([^"']+)["']""")]  # root.users / "poppasswd"
DIALUP_PATTERNS = [
    re.compile(r"""(?:/\s*|join\([^()]*,\s*)["']([A-Z][A-Z]{3,})["']"""),  # dir / "RELAYHOST"
    re.compile(r"""^([A-Z][A-Z]{3,})\s*=\s*["']\1["']""", re.M),  # ETRNCLIENTS = "ETRNCLIENTS"
]
# Module-level tables of control file names: LIST_FILES, POLICY_FILES, _NUMBERS, INT_DEFAULTS, ...
TABLE_NAME = re.compile(r"(?:^|_)(?:FILES|NUMBERS|NAMES|DEFAULTS|DERIVED)$")
# Not configuration: temporary names and lock files pqmail writes, and the handle layout's directories.
IGNORED_SUFFIXES = (".tmp", ".lock")
LAYOUT_DIRS = {"DOMAINS"}


def _table_names(text: str) -> list[tuple[int, str, str]]:
    """(line, table name, file name) for each string in a module-level table of file names."""
    out = []
    for node in ast.parse(text).body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) and node.value is not None else []
        for target in targets:
            if isinstance(target, ast.Name) and TABLE_NAME.search(target.id):
                value = node.value
                if isinstance(value, ast.Call) and value.args:  # frozenset((...))
                    value = value.args[0]
                items = value.keys if isinstance(value, ast.Dict) else getattr(value, "elts", [])
                out.extend((node.lineno, target.id, item.value) for item in items
                           if isinstance(item, ast.Constant) and isinstance(item.value, str))
    return out


def _found() -> dict[tuple[str, str], list[str]]:
    """(place, name) -> where the code names it."""
    found: dict[tuple[str, str], list[str]] = {}

    def add(place: str, name: str, path: Path, line: int) -> None:
        if name.endswith(IGNORED_SUFFIXES) or name in LAYOUT_DIRS:
            return
        found.setdefault((place, name), []).append(f"{path.relative_to(SRC)}:{line}")

    for path, text in _sources():
        for place, patterns in (("control", CONTROL_PATTERNS), ("users", USERS_PATTERNS),
                                ("dialup", DIALUP_PATTERNS)):
            for pattern in patterns:
                for m in pattern.finditer(text):
                    add(place, m.group(1), path, text.count("\n", 0, m.start()) + 1)
        for line, table, name in _table_names(text):
            add("users" if table.startswith("USERS") else "control", name, path, line)
    return found


def test_the_scan_finds_what_it_must() -> None:
    """The patterns still see files read in each of the ways the code spells them."""
    found = _found()
    for key in [("control", "rcpthosts"), ("control", "relayclients"), ("control", "maxrcpt"),
                ("control", "tlsroutes"), ("control", "timeoutpop3d"), ("control", "serialmailinterval"),
                ("control", "servercert.d"), ("control", "idhost"), ("control", "morercpthosts.cdb"),
                ("control", "mailuser"), ("control", "defaultdelivery"), ("control", "pop3checkpassword"),
                ("users", "poppasswd.cdb"), ("users", "handles"),
                ("dialup", "RELAYHOST"), ("dialup", "ETRNCLIENTS"), ("dialup", "LASTTRANSFER")]:
        assert key in found, key


def test_every_file_the_code_reads_is_documented() -> None:
    documented = {(e.place, e.name) for e in ref.ENTRIES}
    missing = {f"{place}/{name} (named at {', '.join(where[:3])})"
               for (place, name), where in _found().items() if (place, name) not in documented}
    assert not missing, "add these to src/pqmail/config/reference.py:\n" + "\n".join(sorted(missing))


def test_every_documented_file_is_named_by_the_code() -> None:
    code = "\n".join(text for _, text in _sources())
    fictional = [e.path for e in ref.ENTRIES
                 if not any(s in code for s in (f'"{e.name}"', f"'{e.name}'", f"control/{e.name}"))]
    assert not fictional, f"documented but never named in the code: {fictional}"


def test_known_files_of_showctl_come_from_the_reference() -> None:
    from pqmail.config.control import KNOWN_FILES, LOADED_FILES

    assert ref.control_names() <= KNOWN_FILES
    assert LOADED_FILES <= KNOWN_FILES
    assert "qmqpservers" not in KNOWN_FILES  # qmail's, but pqmail does not read it


def test_showctl_does_not_call_pqmail_files_unknown(mailtmp: Path) -> None:
    control = mailtmp / "root" / "control"
    control.mkdir(parents=True)
    files = {"me": "mx.isp.test\n", "rcpthosts": "example.com\n", "relayclients": "10.0.0.0/8\n",
             "tlsroutes": "bank.example:verify\n", "pop3apop": "1\n", "qmqpservers": "10.0.0.1\n"}
    for name, text in files.items():
        (control / name).write_text(text)
    out = run_pqmail("showctl", "--root", str(mailtmp / "root")).stdout.decode()
    others = [ln for ln in out.splitlines() if ln.startswith("other files in control/")]
    assert others == ["other files in control/ (not read by this report): qmqpservers"]


def test_readme_mentions_every_file() -> None:
    text = README.read_text("utf-8")
    missing = [e.path for e in ref.ENTRIES if f"`{e.name}`" not in text and f"`{e.path}`" not in text]
    assert not missing, f"README.md does not mention: {missing}"
