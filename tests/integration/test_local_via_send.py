"""qmail-local behaviour through the real ``pqmail send``: programs, forwards, owners, loops, mbox, bounces.

The seed tree's example.com home (``DOMAINS/example.com``, dash ``-``) gets extra dot-qmail files;
messages are injected with ``pqmail inject`` and delivered with ``pqmail send --drain``, as the box
owner from users/assign (``nobody`` when the tests run as root).
"""

from __future__ import annotations

from pathlib import Path

from conftest import run_pqmail


def _home(seed: dict) -> Path:
    return seed["domains"] / "example.com"


def _dotqmail(seed: dict, name: str, text: str) -> None:
    p = _home(seed) / name
    p.write_text(text)
    p.chmod(0o644)


def _messages(maildir: Path) -> list[bytes]:
    return [p.read_bytes() for d in ("new", "cur") for p in sorted((maildir / d).iterdir())]


def _joe(seed: dict) -> list[bytes]:
    return _messages(seed["pop"] / "ex1-0001")


def _inject(seed: dict, *rcpts: str, sender: str = "alice@remote.test", body: str = "hello\n") -> None:
    msg = f"From: alice@remote.test\nSubject: test\n\n{body}".encode()
    run_pqmail("inject", "-f", sender, *rcpts, input=msg, env={"PQMAIL_ROOT": str(seed["root"])})


def _drain(seed: dict) -> str:
    return run_pqmail("send", "--drain", "--root", str(seed["root"])).stderr.decode()


def test_program_sees_qmail_local_environment(seed):
    _dotqmail(seed, ".qmail-prog-default",
              '|printf "%s|%s|%s|%s|%s|%s|%s" "$SENDER" "$RECIPIENT" "$LOCAL" "$EXT" "$EXT2" "$DEFAULT" '
              '"$HOST2" > envdump; cat > stdin\n')
    _inject(seed, "prog-Ab-Cd@example.com", body="program body\n")
    log = _drain(seed)
    dump = (_home(seed) / "envdump").read_text()
    assert dump == ("alice@remote.test|example.com-prog-Ab-Cd@example.com|example.com-prog-Ab-Cd|prog-Ab-Cd|"
                    "Ab-Cd|Ab-Cd|example"), log
    got = (_home(seed) / "stdin").read_bytes()
    assert not got.startswith(b"Return-Path:") and b"Delivered-To:" not in got
    assert got.endswith(b"\n\nprogram body\n")
    assert "did 0+0+1" in log


def test_forward_adds_our_delivered_to_above_the_next_one(seed):
    _dotqmail(seed, ".qmail-fw", "&joe@example.com\n")
    _inject(seed, "fw@example.com", body="forwarded\n")
    log = _drain(seed)
    msgs = _joe(seed)
    assert len(msgs) == 1, log
    lines = msgs[0].split(b"\n")
    assert lines[0] == b"Return-Path: <alice@remote.test>"
    assert lines[1] == b"Delivered-To: example.com-joe@example.com"
    assert b"Delivered-To: example.com-fw@example.com" in lines
    assert lines.index(b"Delivered-To: example.com-fw@example.com") < lines.index(b"Subject: test")
    assert msgs[0].endswith(b"\n\nforwarded\n")


def test_owner_file_changes_the_forwarding_sender(seed):
    _dotqmail(seed, ".qmail-list", "&joe@example.com\n")
    _dotqmail(seed, ".qmail-list-owner", "&joe@example.com\n")
    _inject(seed, "list@example.com")
    _drain(seed)
    msgs = _joe(seed)
    assert len(msgs) == 1
    assert msgs[0].startswith(b"Return-Path: <example.com-list-owner@example.com>\n")


def test_forwarding_loop_bounces_with_5_4_6(seed):
    _dotqmail(seed, ".qmail-loop", "&loop@example.com\n")
    _inject(seed, "loop@example.com", sender="joe@example.com", body="round and round\n")
    log = _drain(seed)
    bounces = [m for m in _joe(seed) if b"Subject: failure notice" in m]
    assert len(bounces) == 1, log
    assert b"<loop@example.com>:\nThis message is looping: it already has my Delivered-To line. (#5.4.6)\n" \
        in bounces[0]


def test_program_exit_100_bounces_with_its_output(seed):
    _dotqmail(seed, ".qmail-refuse", "|echo 'I do not want this.'; exit 100\n")
    _inject(seed, "refuse@example.com", sender="joe@example.com")
    _drain(seed)
    bounces = [m for m in _joe(seed) if b"Subject: failure notice" in m]
    assert len(bounces) == 1
    assert b"<refuse@example.com>:\nI do not want this.\n" in bounces[0]


def test_mbox_line_writes_from_line_and_blank_line(seed):
    _dotqmail(seed, ".qmail-mb", "./mbox-file\n")
    _inject(seed, "mb@example.com", body="From the start\n")
    _drain(seed)
    data = (_home(seed) / "mbox-file").read_bytes()
    assert data.startswith(b"From alice@remote.test ")
    assert b"\nReturn-Path: <alice@remote.test>\nDelivered-To: example.com-mb@example.com\n" in data
    assert data.endswith(b"\n\n>From the start\n\n")
