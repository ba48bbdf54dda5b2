"""``pqmail showctl``: every control setting with its effective value and where it came from.

The counterpart of qmail-showctl. Reads control/ only (through pqmail.config.control); writes
nothing.
"""

from __future__ import annotations

import click

from pqmail.cli.common import root_option
from pqmail.config.control import INT_DEFAULTS, KNOWN_FILES, ME_DERIVED, Control, load_control
from pqmail.paths import Root

MEANING = {
    "me": "this host's name; the default for the names below",
    "bouncefrom": "user name bounces come from",
    "bouncehost": "host name bounces come from",
    "doublebounceto": "user double bounces go to",
    "doublebouncehost": "host double bounces go to",
    "envnoathost": "domain added to recipients without @",
    "helohost": "name sent in HELO by the SMTP client",
    "localiphost": "name that box@[our IP] becomes",
    "smtpgreeting": "SMTP greeting text after 220",
    "defaultdomain": "inject: domain added to hosts without a dot",
    "defaulthost": "inject: host added to addresses without @",
    "idhost": "inject: host in Message-ID",
    "plusdomain": "inject: domain replacing a trailing +",
    "concurrencylocal": "parallel local deliveries (limit 120)",
    "concurrencyremote": "parallel remote deliveries (limit 120)",
    "databytes": "SMTP DATA limit in bytes (0 = none)",
    "queuelifetime": "seconds a message may stay in the queue",
    "timeoutconnect": "SMTP client connect timeout, seconds",
    "timeoutremote": "SMTP client read timeout, seconds",
    "timeoutsmtpd": "SMTP server idle timeout, seconds",
}

SINGLE_ORDER = ["me", *ME_DERIVED[:2], "bouncefrom", "doublebounceto", *ME_DERIVED[2:], *INT_DEFAULTS]


def show(s: str) -> str:
    """A value as the operator should see it: printable text as is, anything else escaped."""
    return s if s.isprintable() else repr(s)


def _source(control: Control, name: str) -> str:
    src = control.sources.get(name, "default")
    if src == "control/me" and name != "me":
        return "default: control/me"
    return src


def render(control: Control, root: Root) -> list[str]:
    """The report as lines (no trailing newlines)."""
    out = [f"pqmail root: {root.path}", ""]
    for name in SINGLE_ORDER:
        value = getattr(control, name)
        if value is None:
            text = "(missing)"
        elif name in control.unset:
            text = "(unset; control/me is missing too)"
        else:
            text = show(str(value))
        out.append(f"{name:<18} {text:<24} [{_source(control, name)}]  {MEANING[name]}")

    out.append("")
    out.extend(_set_lines(control, "locals", control.locals if control.locals_present else None,
                          "local domains",
                          f"messages for {show(control.me)} are local" if control.me
                          else "no local domains (control/me is missing)"))
    out.extend(_set_lines(control, "rcpthosts", control.rcpthosts, "domains SMTP accepts mail for",
                          "NO domain is accepted (pqmail is never an open relay)"))
    mrh_absent = ("no effect" if control.rcpthosts is not None
                  else "no effect: rcpthosts is missing")
    out.extend(_set_lines(control, "morercpthosts", control.morercpthosts,
                          "more rcpthosts (compiled into morercpthosts.cdb)", mrh_absent))
    cdb = control.morercpthosts_cdb
    out.append(f"morercpthosts.cdb  {'present' if cdb else '(missing)'}  "
               f"[{control.sources.get('morercpthosts.cdb', 'missing')}]")
    out.extend(_set_lines(control, "percenthack", control.percenthack or None,
                          "domains where user%host@domain is rewritten", "the percent hack is off"))
    out.extend(_set_lines(control, "badmailfrom", control.badmailfrom or None, "refused envelope senders",
                          "any sender is accepted"))

    out.append(f"virtualdomains  [{control.sources.get('virtualdomains', 'missing')}]")
    if not control.virtualdomains:
        out.append("  (none)")
    for key, prefix in control.virtualdomains.items():
        shown = show(key) if key else "(any other domain)"
        target = f"prefix {show(prefix)}" if prefix else "exception: not virtual"
        out.append(f"  {shown} -> {target}")

    out.append(f"smtproutes  [{control.sources.get('smtproutes', 'missing')}]")
    if not control.smtproutes:
        out.append("  (none: every remote domain by MX)")
    for key, route in control.smtproutes.items():
        shown = show(key) if key else "(any other host)"
        out.append(f"  {shown} -> {show(str(route)) if route else 'exception: MX lookup'}")

    others = _other_files(root)
    if others:
        out.append("")
        out.append("other files in control/ (not read by this report): " + ", ".join(map(show, others)))
    out.append("")
    if control.warnings:
        out.append(f"{len(control.warnings)} warning(s):")
        out.extend(f"  {show(w)}" for w in control.warnings)
    else:
        out.append("no warnings")
    return out


def _set_lines(control: Control, name: str, values: frozenset[str] | None, meaning: str,
               absent: str) -> list[str]:
    head = f"{name}  [{control.sources.get(name, 'missing')}]  {meaning}"
    if values is None:
        return [head, f"  ({absent})"]
    if not values:
        return [head, "  (empty)"]
    return [head, *(f"  {show(v)}" for v in sorted(values))]


def _other_files(root: Root) -> list[str]:
    try:
        names = sorted(p.name for p in root.control.iterdir())
    except FileNotFoundError:
        return []
    return [n for n in names if n not in KNOWN_FILES and not n.startswith(".")]


@click.command("showctl")
@root_option
def showctl(root: Root) -> None:
    """Show every control setting, its effective value and where it came from.

    Like qmail-showctl: for each single-value control file (me, bouncehost, helohost, databytes,
    concurrencylocal, ...) prints the value pqmail uses and its source in brackets: the file itself
    ([control/NAME]), derived from control/me ([default: control/me]) or qmail's built-in default
    ([default]). Then the list files (locals, rcpthosts, morercpthosts, percenthack, badmailfrom,
    virtualdomains, smtproutes) entry by entry, files in control/ it does not know, and warnings:
    lines qmail would misread or ignore, each as FILE:LINE: text.

    \b
    Files read:
      DIR/control/*   every control file (nothing is written)

    \b
    Exit status:
      0    the settings could be read (even with warnings; `pqmail check` judges them)
      111  a control file is unreadable or malformed (the message names FILE:LINE)
    """
    control = load_control(root)
    for line in render(control, root):
        click.echo(line)
