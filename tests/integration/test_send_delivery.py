"""pqmail send end to end on the seed tree: inject, drain, and look in the Maildirs."""

from __future__ import annotations

from pathlib import Path

from conftest import run_pqmail


def _messages(maildir: Path) -> list[bytes]:
    return [p.read_bytes() for d in ("new", "cur") for p in sorted((maildir / d).iterdir())]


def _all_box_messages(pop: Path) -> dict[str, list[bytes]]:
    return {box.name: _messages(box) for box in sorted(pop.iterdir())}


def _inject(root: Path, *rcpts: str, sender: str = "alice@remote.test", body: str = "hello\n") -> None:
    msg = f"From: alice@remote.test\nSubject: test\n\n{body}".encode()
    run_pqmail("inject", "-f", sender, *rcpts, input=msg, env={"PQMAIL_ROOT": str(root)})


def _drain(root: Path) -> str:
    return run_pqmail("send", "--drain", "--root", str(root)).stderr.decode()


def _postmaster_box(seed: dict) -> Path:
    line = (seed["domains"] / "example.com" / ".qmail-postmaster").read_text().strip()
    assert line.endswith("/"), line
    return Path(line)


def test_joe_lands_in_his_box_with_delivered_to(seed):
    _inject(seed["root"], "joe@example.com", body="for joe\n")
    log = _drain(seed["root"])
    msgs = _messages(seed["pop"] / "ex1-0001")
    assert len(msgs) == 1, log
    head = msgs[0].split(b"\n")
    assert head[0] == b"Return-Path: <alice@remote.test>"
    assert head[1] == b"Delivered-To: example.com-joe@example.com"
    assert msgs[0].endswith(b"\n\nfor joe\n")
    assert "delivery 1: success" in log and "end msg" in log
    assert run_pqmail("queue", "stat", "--root", str(seed["root"])).stdout.startswith(b"messages in queue: 0")


def test_unknown_user_reaches_postmaster_through_default(seed):
    _inject(seed["root"], "nobody@example.com", "x@host.example.com")
    _drain(seed["root"])
    pm = _postmaster_box(seed)
    found = b"\n".join(_messages(pm))
    assert b"Delivered-To: example.com-nobody@example.com" in found
    assert b"Delivered-To: example.com-x@host.example.com" in found


def test_dialup_domain_lands_in_its_maildir(seed):
    _inject(seed["root"], "anyone@some.example.com")
    _drain(seed["root"])
    msgs = _messages(seed["serial"] / "some.example.com" / "Maildir")
    assert len(msgs) == 1
    assert msgs[0].split(b"\n")[1] == b"Delivered-To: some.example.com-anyone@some.example.com"


def test_unknown_user_without_default_bounces_in_qsbmf(seed):
    root = seed["root"]
    run_pqmail("domain", "add", "nodefault.test", "--handle", "ex2", "--base", str(seed["base"]),
               "--root", str(root))
    home = seed["base"] / "e" / "ex2" / "DOMAINS" / "nodefault.test"
    (home / ".qmail-default").unlink()
    _inject(root, "ghost@nodefault.test", sender="joe@example.com", body="lost\n")
    log = _drain(root)
    joe = _messages(seed["pop"] / "ex1-0001")
    assert len(joe) == 1, log
    bounce = joe[0].decode()
    assert "\nReturn-Path: <>\n" in bounce or bounce.startswith("Return-Path: <>\n")
    assert "Subject: failure notice\n" in bounce
    body = bounce.split("\n\n", 1)[1]
    assert body.startswith("Hi. This is the qmail-send program at mx.isp.test.\n")
    assert "\n<ghost@nodefault.test>:\nSorry, no mailbox here by that name. (#5.1.1)\n\n" in body
    assert "--- Below this line is a copy of the message.\n\nReturn-Path: <joe@example.com>\n" in body
    assert body.rstrip().endswith("lost")
    assert "bounce msg" in log


def test_bounce_of_a_bounce_goes_to_doublebounceto(seed):
    root = seed["root"]
    run_pqmail("domain", "add", "nodefault.test", "--handle", "ex2", "--base", str(seed["base"]),
               "--root", str(root))
    (seed["base"] / "e" / "ex2" / "DOMAINS" / "nodefault.test" / ".qmail-default").unlink()
    (root / "control" / "doublebounceto").write_text("joe\n")
    (root / "control" / "doublebouncehost").write_text("example.com\n")
    _inject(root, "ghost@nodefault.test", sender="")
    _drain(root)
    joe = _messages(seed["pop"] / "ex1-0001")
    assert len(joe) == 1
    text = joe[0].decode()
    assert text.startswith("Return-Path: <#@[]>\n")
    assert "I tried to deliver a bounce message to this address, but the bounce bounced!" in text
    assert "--- Below this line is the original bounce." in text


def test_deferred_delivery_stays_queued_and_drain_exits(seed):
    root = seed["root"]
    home = seed["domains"] / "example.com"
    (home / ".qmail-later").write_text("|exit 111\n")
    _inject(root, "later@example.com")
    log = _drain(root)
    assert "deferral" in log
    listing = run_pqmail("queue", "--root", str(root)).stdout.decode()
    assert "example.com-later@example.com" in listing and "next attempt in" in listing
    assert run_pqmail("queue", "stat", "--root", str(root)).stdout.startswith(b"messages in queue: 1")


def test_running_send_picks_up_a_new_domain_without_sighup(seed):
    import subprocess
    import time

    from conftest import PQMAIL

    root = seed["root"]
    log = seed["root"] / "send.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*PQMAIL, "send", "--root", str(root)], stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 30
        while b"status: local" not in log.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)  # polling the log for the observable event
        run_pqmail("domain", "add", "new.test", "--handle", "ex1", "--root", str(root))
        _inject(root, "postmaster@new.test", body="to the new domain\n")
        box = seed["pop"] / "ex1-0000" / "new"
        deadline = time.monotonic() + 60
        while not any(b"Delivered-To: new.test-postmaster@new.test\n" in p.read_bytes()
                      for p in box.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert "control files reloaded" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
