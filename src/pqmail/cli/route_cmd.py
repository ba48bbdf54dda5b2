"""``pqmail route ADDRESS``: show how an envelope recipient would be delivered, step by step.

Runs the same routing core the queue manager uses (pqmail.routing) on the live control files and
users/cdb, then looks in the home directory to say which dot-qmail file would be used. Reads only;
never delivers and never writes.
"""

from __future__ import annotations

import errno
import os
import stat

import click

from pqmail import routing
from pqmail.cli.common import root_option
from pqmail.config.control import Control, load_control, smtproute_match
from pqmail.paths import Root
from pqmail.routing import LocalRoute, RemoteRoute


def show(s: str) -> str:
    return s if s.isprintable() else repr(s)


def _argv_text(arg: str) -> str:
    """The argument's bytes as latin-1 text, as pqmail reads every address and control file."""
    return os.fsencode(arg).decode("latin-1")


def _file_state(path: str) -> str:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except PermissionError:
        return "unreadable (delivery would be deferred)"
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:  # qmail treats it as missing
            return "missing"
        return f"unreadable: {e.strerror} (delivery would be deferred)"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (counts as missing)"
    return "exists"


def describe(control: Control, users: routing.UsersLike, address: str) -> list[str]:
    """The routing report for ``address`` as lines."""
    r = routing.route(control, users, address)
    out = [f"recipient: {show(address)}"]
    rw = r.rewrite
    if rw is not None:
        out.extend(f"  {show(step)}" for step in rw.steps)
        if rw.rule == "locals":
            out.append(f"  domain {show(rw.key or '')} is in control/locals")
        elif rw.rule == "virtualdomains":
            key = f"'{show(rw.key)}'" if rw.key else "'' (catch-all)"
            out.append(f"  virtualdomains key {key}: prefix {show(rw.prefix or '')} -> {show(rw.address)}")
        elif rw.rule == "exception":
            out.append(f"  virtualdomains key '{show(rw.key or '')}' has an empty prefix: not virtual")
        else:
            out.append("  not in control/locals or control/virtualdomains")
    if isinstance(r, RemoteRoute):
        out.append("delivery: remote")
        out.append(f"address: {show(r.address)}")
        out.append(f"host: {show(r.domain)}")
        found = smtproute_match(control, r.domain)
        if found is None:
            out.append("smtproutes: no route; deliver to the host's MX")
        else:
            key, relay = found
            k = f"'{show(key)}'" if key else "'' (default route)"
            if relay is None:
                out.append(f"smtproutes: key {k} is an exception; deliver to the host's MX")
            else:
                out.append(f"smtproutes: key {k} -> relay {show(str(relay))} (no MX lookup)")
        return out
    assert isinstance(r, LocalRoute)
    out.append("delivery: local")
    out.append(f"address: {show(r.address)}")
    out.append(f"local part: {show(r.local)}")
    out.append(f"domain: {show(r.domain)}")
    if r.trash:
        out.append("empty local part: a trash address, accepted and delivered nowhere")
        return out
    e = r.entry
    if e is None:
        out.append("users/assign: no entry for this local part; qmail-getpw would look for a system "
                   "account, then the alias user")
        return out
    out.append(f"users/assign: user {show(e.user)} uid {e.uid} gid {e.gid} home {show(e.home)} "
               f"dash {e.dash!r} ext {e.ext!r}")
    out.append(f"dot-qmail files, in order, in {show(e.home)}:")
    used = None
    width = max(len(show(n)) for n, _ in r.candidates)
    for name, default in r.candidates:
        state = _file_state(os.path.join(e.home, name))
        note = ""
        if used is None and state == "exists":
            used = name
            note = "  <- used" + (f" (DEFAULT={show(default)})" if default is not None else "")
        elif used is not None:
            note = "  (not reached)"
        out.append(f"  {show(name):<{width}}  {state}{note}")
    if used is None:
        if e.dash:
            out.append("none exists: the message bounces (no mailbox here by that name, #5.1.1)")
        else:
            out.append("none exists: defaultdelivery applies (the user's own address)")
    return out


@click.command("route")
@click.argument("address")
@root_option
def route_cmd(address: str, root: Root) -> None:
    """Show how ADDRESS, an envelope recipient, would be delivered.

    Applies qmail-send's rewriting (envnoathost, percenthack, locals, virtualdomains) and prints
    each step. For a local address it then shows the users/assign entry found in users/cdb (user,
    uid, gid, home, dash, ext) and the dot-qmail files qmail-local would try, in order, saying which
    exist in the home directory and which one would be used (with its DEFAULT). For a remote
    address it shows the destination host and the control/smtproutes route, if any.

    \b
    Files read (nothing is written, nothing is delivered):
      DIR/control/*   locals, percenthack, virtualdomains, envnoathost, smtproutes, ...
      DIR/users/cdb   the compiled users/assign (run `pqmail newu` after editing assign)
      HOME/.qmail*    only whether each candidate file exists

    \b
    Exit status:
      0    the decision was printed
      111  control/ or users/cdb cannot be read (the message names the file)
    """
    control = load_control(root)
    from pqmail.config.assign import UsersDB  # here: showctl and --help need no cdb code

    for line in describe(control, UsersDB(root), _argv_text(address)):
        click.echo(line)


route = route_cmd
