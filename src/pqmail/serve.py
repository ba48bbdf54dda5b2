"""Assemble the services of ``pqmail serve``: check the configuration, bind, and supervise.

Binding happens here, in the supervisor, before any fork: as root that is the only moment ports
below 1024 can be had, and it lets every smtpd worker share (or, with SO_REUSEPORT, split) the
listeners. Services are plain functions run in forked children (pqmail.supervisor).
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pqmail.config.control import load_control
from pqmail.errors import UsageError
from pqmail.paths import Root
from pqmail.supervisor import (
    Service,
    Supervisor,
    bind_listener,
    mail_user_ids,
    parse_hostport,
    worker_services,
)


@dataclass
class ServeOptions:
    smtp: list[str]
    submission: list[str]
    smtps: list[str]
    explicit_smtps: bool
    workers: int
    pidfile: str | None
    pop3: list[str] = field(default_factory=list)
    pop3s: list[str] = field(default_factory=list)
    explicit_pop3s: bool = False
    odmr: list[str] = field(default_factory=list)
    serialmail: bool = True


@dataclass
class Listener:
    """A bound socket and what it serves: ``smtp``, ``submission`` (AUTH required), ``smtps``,
    ``pop3``, ``pop3s`` or ``odmr``."""

    kind: str
    sock: socket.socket
    address: str


def check_config(root: Root, opts: ServeOptions) -> list[str]:
    """Problems that stop pqmail serve from working; empty when the configuration is usable."""
    problems: list[str] = []
    if not root.control.is_dir():
        return [f"{root.control}: missing; create the tree with pqmail init"]
    try:
        control = load_control(root)
    except Exception as e:  # ConfigError and friends: report, never a traceback
        return [str(e)]
    if control.rcpthosts is None:
        problems.append(f"{root.control_file('rcpthosts')}: missing; pqmail would accept mail for no "
                        "domain (qmail would be an open relay)")
    if not root.queue.is_dir():
        problems.append(f"{root.queue}: missing; create the tree with pqmail init")
    if os.geteuid() == 0:
        try:
            mail_user_ids(root.control)
        except UsageError as e:
            problems.append(str(e))
    for spec in opts.smtp + opts.submission + opts.smtps + opts.pop3 + opts.pop3s + opts.odmr:
        try:
            parse_hostport(spec)
        except UsageError as e:
            problems.append(str(e))
    cert = root.control_file("servercert.pem")
    if opts.explicit_smtps and not cert.exists():
        problems.append(f"{cert}: missing; the implicit-TLS listener (--smtps) needs it")
    if opts.explicit_pop3s and not cert.exists():
        problems.append(f"{cert}: missing; the implicit-TLS POP3 listener (--pop3s) needs it")
    return problems


def queue_warnings(root: Root) -> list[str]:
    """How queue/ differs from what pqmail init makes (modes, owner, missing directories): mail may
    be refused (451) or stay queued, so serve says so at start, and --check counts them."""
    if not root.queue.is_dir():
        return []  # check_config reports it
    from pqmail.queue.layout import layout_report

    return [f"{path}: {text}" for path, text in layout_report(root.queue)]


def run_serve(root: Root, opts: ServeOptions, check_only: bool = False) -> int:
    problems = check_config(root, opts)
    if check_only:
        problems += queue_warnings(root)
        for p in problems:
            print(p)
        if not problems:
            print("pqmail serve: configuration ok")
        return 100 if problems else 0
    if problems:
        raise UsageError("; ".join(problems))
    for w in queue_warnings(root):
        print(f"pqmail serve: warning: {w}", file=sys.stderr, flush=True)
    if not root.control_file("servercert.pem").exists():
        # no certificate: no implicit-TLS listener unless asked for explicitly
        if not opts.explicit_smtps:
            opts.smtps = []
        if not opts.explicit_pop3s:
            opts.pop3s = []
    drop = mail_user_ids(root.control) if os.geteuid() == 0 else None
    listeners = _bind(opts)
    services = [Service("send", lambda: _run_send(root), drop_to=None)]
    smtp = [(li.kind, li.sock) for li in listeners if li.kind in ("smtp", "submission", "smtps")]
    pop3 = [(li.kind, li.sock) for li in listeners if li.kind in ("pop3", "pop3s")]
    odmr = [(li.kind, li.sock) for li in listeners if li.kind == "odmr"]
    if smtp:
        from pqmail.smtp.server import serve_listeners

        services += worker_services("smtpd", opts.workers, drop,
                                    lambda counter: serve_listeners(root, smtp, sessions=counter))
    if pop3:
        from pqmail.pop3.server import serve_pop3_listeners

        # each reads control/servercert.pem (root-only is fine) before dropping to the mail user
        services += worker_services(
            "pop3d", opts.workers, None,
            lambda counter: serve_pop3_listeners(root, pop3, drop_to=drop, counts=counter))
    if odmr:
        from pqmail.serialmail.odmr import serve_odmr_listeners

        services.append(Service("odmrd", lambda: serve_odmr_listeners(root, odmr), drop_to=drop))
    if opts.serialmail:
        from pqmail.serialmail.runner import serialmail_service

        services.append(Service("serialmail", lambda: serialmail_service(root), drop_to=drop))
    for li in listeners:
        print(f"pqmail serve: {li.kind} listening on {li.address}", flush=True)
    pidfile = Path(opts.pidfile) if opts.pidfile else root.path / "serve.pid"
    return Supervisor(services, pidfile=pidfile).run()


def _bind(opts: ServeOptions) -> list[Listener]:
    out: list[Listener] = []
    for kind, specs in (("smtp", opts.smtp), ("submission", opts.submission), ("smtps", opts.smtps),
                        ("pop3", opts.pop3), ("pop3s", opts.pop3s), ("odmr", opts.odmr)):
        for spec in specs:
            host, port = parse_hostport(spec)
            out.append(Listener(kind, bind_listener(host, port), f"{host}:{port}"))
    return out


def _run_send(root: Root) -> None:
    from pqmail.queue.manager import Manager

    raise SystemExit(Manager(root).run())
