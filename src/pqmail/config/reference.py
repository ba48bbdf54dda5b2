"""The reference of every configuration file pqmail reads: the single source of ``pqmail help control``.

One :class:`FileDoc` per file: its name and where it lives (``control/``, ``users/``, or a dial-up
customer's directory), its kind, what it means, its default, which service reads it and when that
service reads it again, and whether the name is qmail's, the serialmail set-up's, or pqmail's own.
The README's table and ``pqmail showctl``'s list of known files are derived from it, and a test greps
the source tree so that a file the code reads cannot go undocumented here.

Everything written here must be true of the code; when a service changes what it reads, change the
entry in the same commit.

Pure data: imports nothing from pqmail, reads no file (``pqmail.config.control`` imports it).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ENTRIES",
    "KINDS",
    "ORIGINS",
    "PLACES",
    "FileDoc",
    "Reader",
    "control_names",
    "find",
]

# Where a file lives, as the operator should read the path.
PLACES = {
    "control": "ROOT/control/",
    "users": "ROOT/users/",
    "dialup": "DIR/ (a dial-up customer's directory, e.g. /home/serialmail/some.example.com/)",
}

KINDS = {
    "value": "the first line only, trailing spaces and tabs removed; '#' is not a comment",
    "number": "a number: the leading decimal digits of the first line (none: the default)",
    "list": "one entry a line; empty lines and lines starting with '#' skipped; trailing blanks removed",
    "map": "colon map: key:value lines (key up to the first ':'), '#' comments; the later line wins",
    "directory": "a directory of files",
    "cdb": "a constant database compiled from a text file; never edit it, recompile it",
    "pem": "PEM text: certificate chain and private key in one file",
    "dot-qmail": "dot-qmail lines (./Maildir/, ./Mailbox, |program, &address), the whole file",
    "assign": "qmail's users/assign lines, ending with a '.' line",
    "record": "one line written by pqmail itself (state, not configuration)",
}

ORIGINS = {
    "qmail": "qmail's own file, same name and meaning",
    "serialmail": "the serialmail set-up's convention, as in the seed's dial-up directories",
    "pqmail": "a pqmail addition, in qmail's style",
}

# When a service reads a file again (the same words for the same behaviour everywhere).
SMTPD_CHANGE = "on change: checked at most once a second, at each connection and MAIL; SIGHUP: at once"
START_HUP = "at start and on SIGHUP"
REMOTE_CHANGE = "on change: checked at most once a second, before remote deliveries"
EACH_RUN = "at every run (every serialmailinterval seconds, or serialmail run/flush)"
EACH_CALL = "at every invocation"
EACH_LOOKUP = "at every lookup (re-opened when replaced)"
AT_START = "at start"


@dataclass(frozen=True)
class Reader:
    """A service (or command) that reads the file, and when it reads it again."""

    service: str
    when: str


@dataclass(frozen=True)
class FileDoc:
    """One configuration file: everything an administrator needs to decide what to write in it."""

    name: str
    place: str  # a key of PLACES
    kind: str  # a key of KINDS
    origin: str  # a key of ORIGINS
    default: str  # short: what applies when the file is missing
    summary: str  # one line
    readers: tuple[Reader, ...]
    details: str = ""  # syntax, examples, deviations; several lines

    @property
    def path(self) -> str:
        return f"DIR/{self.name}" if self.place == "dialup" else f"{self.place}/{self.name}"


def _r(*pairs: tuple[str, str]) -> tuple[Reader, ...]:
    return tuple(Reader(s, w) for s, w in pairs)


SEND = ("send", START_HUP)
SMTPD = ("smtpd", SMTPD_CHANGE)
INJECT = ("inject, sendmail", EACH_CALL)
POP3D = ("pop3d", START_HUP)
ODMRD = ("odmrd", START_HUP)
SERIAL = ("serialmail", EACH_RUN)
REMOTE = ("send (remote delivery)", REMOTE_CHANGE)

_CONTROL: tuple[FileDoc, ...] = (
    # ------------------------------------------------------------------ qmail's files
    FileDoc(
        "me", "control", "value", "qmail", "(none)",
        "this host's fully qualified name; the default of most names below",
        _r(SEND, SMTPD, INJECT, POP3D, ODMRD, SERIAL),
        """Written by `pqmail init --me HOST`. It is the default of bouncehost, doublebouncehost,
envnoathost, helohost, localiphost, smtpgreeting, defaultdomain, defaulthost, idhost and plusdomain,
and of locals when that file is absent. smtpd names it in the Received line ("by me"); pop3d and
odmrd greet with it. The remote delivery treats it as one of this host's names (backup-MX rule).
Missing: the derived names become qmail's placeholders; smtpd then answers 421 (unless smtpgreeting
exists) and remote deliveries are deferred (unless helohost exists).""",
    ),
    FileDoc(
        "locals", "control", "list", "qmail", "me",
        "domains delivered to local users (no virtualdomains prefix)",
        _r(SEND, SMTPD),
        """An address whose domain is listed (exactly, ignoring case) is local and keeps its local part:
joe@mx.example.com goes to the users/assign entry or system user "joe". A missing file means the value
of me; an empty file means no local domain. The queue manager also counts these names as this host for
the backup-MX rule. smtpd consults it only to judge an address that percenthack rewrites.
Like qmail-send, pqmail send reads it at start and on SIGHUP: send SIGHUP to pqmail serve after a change.""",
    ),
    FileDoc(
        "rcpthosts", "control", "list", "qmail", "none: no domain",
        "domains SMTP accepts mail for; .example.com covers hosts below it",
        _r(SMTPD),
        """One domain a line. example.com matches example.com only; .example.com matches every host below
it (x.example.com, a.b.example.com) but not example.com itself, and never notexample.com. A recipient
whose domain (after the last @) is not listed gets "553 sorry, that domain isn't in my list of allowed
rcpthosts", unless the client may relay (control/relayclients or SMTP AUTH). postmaster without a
domain is always accepted; any other address without @ is judged as address@envnoathost.
Deviation from qmail: without this file qmail is an open relay; pqmail accepts no domain at all
(pqmail serve --check and pqmail showctl say so). Written by pqmail init, domain add and dialup add.""",
    ),
    FileDoc(
        "morercpthosts", "control", "list", "qmail", "(none)",
        "more rcpthosts entries; only its compiled cdb is consulted",
        _r(("pqmail newmrh", EACH_CALL)),
        """For sites with too many domains for rcpthosts. Edit it, then run `pqmail newmrh`, which
writes morercpthosts.cdb atomically. pqmail showctl and pqmail check warn when the cdb is missing or
older than this file.""",
    ),
    FileDoc(
        "morercpthosts.cdb", "control", "cdb", "qmail", "(none)",
        "compiled morercpthosts (pqmail newmrh), same cdb as qmail-newmrh",
        _r(("smtpd", "at every RCPT that rcpthosts does not match (opened afresh)")),
        """Consulted with the same keys as rcpthosts (the domain, then each .suffix), and only when
control/rcpthosts exists.""",
    ),
    FileDoc(
        "virtualdomains", "control", "map", "qmail", "(none)",
        "domain:prefix lines: virtual domains and users",
        _r(SEND, ("pop3d", "on change (address logins; each answer cached 30 s)"), SMTPD, SERIAL),
        """Keys are tried in qmail's order, the first present wins:
  joe@example.com:prefix   one virtual user
  example.com:prefix       a virtual domain
  .example.com:prefix      every host below example.com (not example.com itself)
  :prefix                  every non-local domain
  sub.example.com:         an empty prefix: an exception, mail for it goes remote
A virtual address joe@example.com becomes the local address prefix-joe@example.com, which users/assign
routes (pqmail domain add writes example.com:example.com and .example.com:example.com). pqmail send reads
it at start and on SIGHUP, as qmail-send does: send SIGHUP to pqmail serve after a change, including
after pqmail domain add and dialup add, which do not signal anything. pop3d reads it for address logins
(joe@example.com); serialmail reads it to find the dial-up customers.""",
    ),
    FileDoc(
        "percenthack", "control", "list", "qmail", "(none)",
        "domains where user%host@domain is rewritten to user@host",
        _r(SEND, SMTPD),
        """While the domain is listed and the local part holds a '%', the last '%' becomes the '@'.
smtpd then also requires the rewritten domain to be accepted (rcpthosts), so the rewrite cannot open a
relay.""",
    ),
    FileDoc(
        "smtproutes", "control", "map", "qmail", "(none): MX",
        "artificial routes: domain:relay[:port]",
        _r(SEND, ("provisioning, serialmail", "at every invocation or run")),
        """First key present wins: the host, then each .suffix, then the empty key.
  example.com:relay.isp.net          relay on port 25 (its A/AAAA records, no MX lookup)
  example.com:relay.isp.net:2525     relay on port 2525
  .example.com:relay.isp.net         every host below example.com
  :smarthost.isp.net                 everything else
  example.com:                       an exception: look up MX as usual
  example.com:[2001:db8::1]:2525     IPv6 relay (pqmail's extension; qmail cannot name one)
A line that cannot work (empty host, bad port, an unbracketed IPv6 address with a port) is an error
naming the file and line; qmail would ignore or misread it. Deviation: qmail-remote reads the file at
each delivery; pqmail send reads it at start and on SIGHUP. pqmail domain add --relay writes it.""",
    ),
    FileDoc(
        "defaultdomain", "control", "value", "qmail", "me",
        "inject: domain added to a host name without a dot",
        _r(INJECT),
        "$QMAILDEFAULTDOMAIN overrides it. pqmail init writes it from --me as config-fast does "
        "(mx.isp.test -> isp.test).",
    ),
    FileDoc(
        "defaulthost", "control", "value", "qmail", "me",
        "inject: host added to an address without @",
        _r(INJECT),
        "$QMAILDEFAULTHOST overrides it.",
    ),
    FileDoc(
        "plusdomain", "control", "value", "qmail", "me",
        "inject: replaces a trailing + in a host name",
        _r(INJECT),
        "$QMAILPLUSDOMAIN overrides it. pqmail init writes the last two labels of --me (a.b.c.d -> c.d).",
    ),
    FileDoc(
        "idhost", "control", "value", "qmail", "me",
        "inject: host name in Message-ID",
        _r(INJECT),
        "Message-ID is <YYYYMMDDhhmmss.pid.n@idhost>. $QMAILIDHOST overrides it.",
    ),
    FileDoc(
        "envnoathost", "control", "value", "qmail", "me",
        "domain added to an envelope recipient without @",
        _r(SEND, SMTPD),
        "",
    ),
    FileDoc(
        "bouncefrom", "control", "value", "qmail", "MAILER-DAEMON",
        "user name bounces come from",
        _r(SEND, SERIAL, ODMRD),
        "Bounces are From: bouncefrom@bouncehost, with the null envelope sender.",
    ),
    FileDoc(
        "bouncehost", "control", "value", "qmail", "me",
        "host name bounces come from",
        _r(SEND, SERIAL, ODMRD),
        "",
    ),
    FileDoc(
        "doublebounceto", "control", "value", "qmail", "postmaster",
        "user a bounce that cannot be delivered goes to",
        _r(SEND, SERIAL, ODMRD),
        "A double bounce goes to doublebounceto@doublebouncehost; a failing double bounce is dropped.",
    ),
    FileDoc(
        "doublebouncehost", "control", "value", "qmail", "me",
        "host double bounces go to",
        _r(SEND, SERIAL, ODMRD),
        "",
    ),
    FileDoc(
        "queuelifetime", "control", "number", "qmail", "604800",
        "seconds a message may stay queued before it bounces",
        _r(SEND),
        """After birth + queuelifetime a message gets one more attempt; a temporary failure then becomes
permanent (local and remote deliveries alike).""",
    ),
    FileDoc(
        "concurrencylocal", "control", "number", "qmail", "10",
        "local deliveries at once (at most 120)",
        _r(SEND),
        "Values above 120 (qmail's conf-spawn) are read as 120, with a warning in pqmail showctl.",
    ),
    FileDoc(
        "concurrencyremote", "control", "number", "qmail", "20",
        "remote deliveries at once (at most 120)",
        _r(SEND),
        "Values above 120 (qmail's conf-spawn) are read as 120, with a warning in pqmail showctl.",
    ),
    FileDoc(
        "databytes", "control", "number", "qmail", "0 (= 64 MiB)",
        "largest message smtpd accepts, in bytes",
        _r(SMTPD),
        """Bigger messages get 552; a MAIL with SIZE= above twice the limit is refused at once.
Deviation: qmail reads 0 as "no limit"; pqmail holds a message in memory until it is queued, so 0
means 64 MiB (67108864 bytes).""",
    ),
    FileDoc(
        "helohost", "control", "value", "qmail", "me",
        "name sent in EHLO/HELO when pqmail is the SMTP client",
        _r(SEND, SERIAL, ODMRD),
        "Used by remote delivery and by serialmail/ODMR transfers to dial-up customers.",
    ),
    FileDoc(
        "localiphost", "control", "value", "qmail", "me",
        "name that box@[our IP address] becomes in smtpd",
        _r(SMTPD),
        """Our IP addresses are the one the client connected to, plus 0.0.0.0, 127.0.0.1, :: and ::1.""",
    ),
    FileDoc(
        "smtpgreeting", "control", "value", "qmail", "me",
        "text after 220 in smtpd's greeting",
        _r(SMTPD),
        "Neither it nor me present: smtpd answers 421 unable to read controls, as qmail-smtpd does.",
    ),
    FileDoc(
        "timeoutconnect", "control", "number", "qmail", "60",
        "seconds to connect to a remote SMTP server",
        _r(SEND, SERIAL),
        """Also bounds the DNS lookups for one delivery in all, and the connection of a serialmail
transfer.""",
    ),
    FileDoc(
        "timeoutremote", "control", "number", "qmail", "1200",
        "seconds to wait for each reply of a remote SMTP server",
        _r(SEND),
        "serialmail transfers use serialsmtp's fixed timeouts instead (81 s read, 73 s write).",
    ),
    FileDoc(
        "timeoutsmtpd", "control", "number", "qmail", "1200",
        "seconds smtpd waits for a client before 451 and closing",
        _r(SMTPD),
        "The TLS handshake is bounded by the same value, at most 60 s.",
    ),
    FileDoc(
        "badmailfrom", "control", "list", "qmail", "(none)",
        "refused envelope senders: an address, or @domain",
        _r(SMTPD),
        """Matching ignores case. As in qmail-smtpd the refusal (553) comes at each RCPT, not at MAIL.""",
    ),
    # ------------------------------------------------------------------ pqmail's additions
    FileDoc(
        "mailuser", "control", "value", "pqmail", "(none)",
        "system user owning mailboxes and queue; network services run as it",
        _r(("serve, smtpd, pop3d, odmrd, serialmail daemon", AT_START),
           ("provisioning (domain, box, alias, dialup)", EACH_CALL)),
        """Written by pqmail init --owner. As root, pqmail serve, smtpd, pop3d, serialmail daemon and
odmrd bind their sockets, then become this user (setgroups([]), setgid to its primary group, setuid);
they refuse to start when the file is missing or names root. Provisioning gives every box, domain
directory and dial-up Maildir to it (--owner overrides); not as root, the invoking user is the default.
Because services drop their supplementary groups, files they must read (control/, servercert.pem,
users/poppasswd.cdb) must be readable by this user or by its primary group.""",
    ),
    FileDoc(
        "defaultdelivery", "control", "dot-qmail", "pqmail", "./Maildir/",
        "delivery for a user without a dot-qmail file, or with an empty one",
        _r(SEND),
        """The whole file, as dot-qmail lines (e.g. ./Maildir/ or ./Mailbox). It replaces the argument
qmail-start takes (the name is the one Life-with-qmail installations use for that argument).
pqmail's default is ./Maildir/, where qmail's usual rc uses ./Mailbox.""",
    ),
    FileDoc(
        "relayclients", "control", "list", "pqmail", "(none)",
        "client IPs or CIDR networks that may relay",
        _r(SMTPD),
        """One IPv4 or IPv6 address or network a line (192.0.2.7, 192.0.2.0/24, 2001:db8::/32); this is
tcprules' RELAYCLIENT of qmail set-ups. A tcprules-style prefix (192.168.) is not accepted. A line that
is neither an address nor a network is an error naming file and line: at start smtpd refuses to run,
on a re-read it keeps the previous settings and logs a warning.""",
    ),
    FileDoc(
        "badrcptto", "control", "list", "pqmail", "(none)",
        "refused recipients: an address, or @domain",
        _r(SMTPD),
        "553 at RCPT; matching ignores case. Applies to relaying clients too.",
    ),
    FileDoc(
        "maxrcpt", "control", "number", "pqmail", "100",
        "recipients per message; more get 452",
        _r(SMTPD),
        "0: no limit.",
    ),
    FileDoc(
        "maxsessions", "control", "number", "pqmail", "200",
        "concurrent SMTP sessions in all; more get 421",
        _r(SMTPD),
        "0: no limit. Counts the sessions of every smtpd process of pqmail serve together.",
    ),
    FileDoc(
        "maxsessionsperip", "control", "number", "pqmail", "20",
        "concurrent SMTP sessions per client IP",
        _r(SMTPD),
        "0: no limit. More get 421 and the connection is closed. Loopback clients and relayclients "
        "are exempt. Counted over every smtpd process of pqmail serve.",
    ),
    FileDoc(
        "maxheaderbytes", "control", "number", "pqmail", "262144",
        "bytes of message header smtpd accepts; more get 552",
        _r(SMTPD),
        "The header is everything up to the first empty line. 0: no limit.",
    ),
    FileDoc(
        "maxsessiontime", "control", "number", "pqmail", "3600",
        "seconds an SMTP session may last; then 421",
        _r(SMTPD),
        "0: no limit.",
    ),
    FileDoc(
        "servercert.pem", "control", "pem", "pqmail", "(none): no TLS",
        "TLS certificate chain and key (STARTTLS, STLS, ports 465/995)",
        _r(SMTPD, POP3D, ("serve", "at start (whether to open the implicit-TLS listeners)")),
        """The name of the qmail TLS patch's file. Without it smtpd offers no STARTTLS and so no AUTH
(the submission port is then useless), pop3d no STLS, and pqmail serve opens no 465/995 listener
unless one is asked for with --smtps/--pop3s (which is then an error). TLS 1.2 at least. The services
read it after dropping privileges: make it readable by the mail user (e.g. owner root, group the mail
user's primary group, mode 0640).""",
    ),
    FileDoc(
        "servercert.d", "control", "directory", "pqmail", "(none)",
        "per-host certificates HOST.pem, chosen by SNI",
        _r(("smtpd", SMTPD_CHANGE + " (the directory's own change time)")),
        """control/servercert.d/mail.example.com.pem is used when a client asks for mail.example.com
(lowercase file names); other names get servercert.pem. Replace files by rename (or send SIGHUP) so that
the directory's change is noticed. smtpd only: pop3d uses servercert.pem alone.""",
    ),
    FileDoc(
        "resolvers", "control", "list", "pqmail", "system resolvers",
        "DNS servers for MX/A lookups: IP or IP:port a line",
        _r(REMOTE),
        """192.0.2.53, 192.0.2.53:5353, 2001:db8::53 or [2001:db8::53]:5353. When present it replaces
/etc/resolv.conf's servers. A bad line defers every remote delivery with the error (#4.3.0).""",
    ),
    FileDoc(
        "ipme", "control", "list", "pqmail", "(none)",
        "extra addresses or networks that are this host (backup-MX rule)",
        _r(REMOTE),
        """Interface addresses (read from /proc/net) and loopback always count; list here addresses
that reach this host without being on an interface (e.g. a NAT address). A bad line defers remote
deliveries with the error.""",
    ),
    FileDoc(
        "notipme", "control", "list", "pqmail", "(none)",
        "addresses or networks that are NOT this host, though local",
        _r(REMOTE),
        """Removes addresses from the detected interface addresses and loopback (the name qmail's
moreipme patch uses), e.g. when another MTA listens on a loopback address. ipme wins over notipme.""",
    ),
    FileDoc(
        "remoteport", "control", "number", "pqmail", "25",
        "port for MX and A deliveries (smtproutes ports override it)",
        _r(REMOTE),
        """1 to 65535; anything else defers every remote delivery with an error naming the file. For
test set-ups and port-redirecting firewalls.""",
    ),
    FileDoc(
        "tlsroutes", "control", "map", "pqmail", "may",
        "TLS per destination: domain:off|may|require|verify",
        _r(REMOTE),
        """Keys as in smtproutes (domain, .domain, empty key for the default; the later line wins):
  bank.example:verify       STARTTLS required, certificate checked (system CAs) against the MX/relay name
  partner.example:require   STARTTLS required, any certificate
  old.example:off           never STARTTLS
  example.net:              the default: may (opportunistic STARTTLS, no verification)
A line without ':' or with another mode defers remote deliveries with an error naming file and line.""",
    ),
    FileDoc(
        "serialmailinterval", "control", "number", "pqmail", "120",
        "seconds between scheduled serialmail runs in pqmail serve",
        _r(("serialmail (in serve, and serialmail daemon)", "after every run")),
        "At least 1. SIGALRM to pqmail serve starts a run at once.",
    ),
    FileDoc(
        "serialmailconcurrency", "control", "number", "pqmail", "10",
        "dial-up transfers at once in one serialmail run",
        _r(SERIAL),
        "At least 1; `pqmail serialmail run --concurrency N` overrides it.",
    ),
    FileDoc(
        "serialmaillifetime", "control", "number", "pqmail", "604800",
        "seconds before a deferred dial-up message is bounced",
        _r(SERIAL, ODMRD),
        """Age counts from the message file's mtime. A message ages out only after the customer's server
answered 4xx; while the host cannot be reached nothing is bounced. `serialmail flush --lifetime`
overrides it.""",
    ),
    FileDoc(
        "timeoutpop3d", "control", "number", "pqmail", "600",
        "idle seconds before pop3d closes a session",
        _r(POP3D),
        "RFC 1939 asks for at least 10 minutes. At least 1.",
    ),
    FileDoc(
        "concurrencypop3", "control", "number", "pqmail", "500",
        "POP3 sessions at once in all",
        _r(POP3D),
        "At least 1. Counts the sessions of every pop3d process of pqmail serve (or pop3d --workers).",
    ),
    FileDoc(
        "concurrencypop3perip", "control", "number", "pqmail", "50",
        "POP3 sessions at once from one client address",
        _r(POP3D),
        "At least 1.",
    ),
    FileDoc(
        "pop3faildelay", "control", "number", "pqmail", "1",
        "seconds before the reply to a failed POP3 login",
        _r(POP3D),
        "Unknown login and wrong password get the same reply after the same delay.",
    ),
    FileDoc(
        "pop3authfailures", "control", "number", "pqmail", "10",
        "failed POP3 logins per address in 5 minutes before refusal",
        _r(POP3D),
        "Counted per pop3d process. 0: no limit.",
    ),
    FileDoc(
        "pop3authcache", "control", "number", "pqmail", "300",
        "seconds a verified POP3 password is remembered (0: never)",
        _r(POP3D),
        """Kept as an HMAC of box, password and stored hash under a per-process random key, never the
password; changing the password invalidates it. Saves the hash cost for clients polling every minute.""",
    ),
    FileDoc(
        "pop3tlsonly", "control", "number", "pqmail", "0",
        "1: no USER/PASS/AUTH before STLS on port 110",
        _r(POP3D),
        "",
    ),
    FileDoc(
        "pop3apop", "control", "number", "pqmail", "0",
        "1: offer APOP (boxes with a {PLAIN} secret only)",
        _r(POP3D),
        "",
    ),
    FileDoc(
        "pop3checkpassword", "control", "value", "pqmail", "(none)",
        "a checkpassword program that decides every POP3 login",
        _r(POP3D),
        """The program's absolute path and arguments (shell-like quoting), e.g.
/usr/local/bin/checkvpw. It gets login\\0password\\0timestamp\\0 on fd 3 and answers by exit status
(0 good, 1 bad, 111 temporary); the Maildir is $HOME/Maildir, or $HOME itself, as the program sets
$HOME. When set, users/poppasswd is not consulted for POP3.""",
    ),
)

_USERS: tuple[FileDoc, ...] = (
    FileDoc(
        "assign", "users", "assign", "qmail", "(none)",
        "address -> user, uid, gid, home, dash, extension",
        _r(("pqmail newu", EACH_CALL), ("provisioning, serialmail", "at every invocation or run")),
        """  =local:user:uid:gid:home:dash:ext:     exactly the address local
  +prefix:user:uid:gid:home:dash:pre:    every address starting with prefix
  .
Delivery never reads this file: run `pqmail newu` after every edit (provisioning does). pqmail is
stricter than qmail-newu: uid and gid must be decimal numbers. pqmail domain add writes
+example.com-:mailuser:uid:gid:BASE/e/ex1/DOMAINS/example.com:-::""",
    ),
    FileDoc(
        "cdb", "users", "cdb", "qmail", "(none)",
        "users/assign compiled by pqmail newu (qmail-newu's layout)",
        _r(("send", EACH_LOOKUP), ("pop3d", EACH_LOOKUP)),
        """Replaced atomically by pqmail newu; services see the new one at their next lookup. Without it,
local parts fall back to system users (qmail-getpw) and the alias user.""",
    ),
    FileDoc(
        "poppasswd", "users", "map", "pqmail", "(none)",
        "box:hash:maildir lines: POP box (and dial-up) passwords",
        _r(("provisioning, pqmail passwd, serialmail passwd", EACH_CALL)),
        """Mode 0600. Hashes: argon2id (written by pqmail), or imported $1$/$5$/$6$ crypt and
$2a$/$2b$/$2y$ bcrypt (pqmail passwd --hash), optionally behind a {SCHEME} prefix; {PLAIN}secret for
dial-up ODMR logins. Every change made through pqmail (box add/remove, pqmail passwd, serialmail passwd)
rewrites it, keeping comments and order, and recompiles users/poppasswd.cdb from the whole file. There is
no separate compile command: an edit by hand reaches the cdb with the next such change.""",
    ),
    FileDoc(
        "poppasswd.cdb", "users", "cdb", "pqmail", "(none)",
        "compiled users/poppasswd: what logins are checked against",
        _r(("pop3d, smtpd (AUTH, ETRN), odmrd", EACH_LOOKUP)),
        """smtpd's AUTH currently accepts argon2id hashes only; pop3d accepts every scheme listed under
users/poppasswd; odmrd accepts {PLAIN} secrets (CRAM-MD5, PLAIN, LOGIN) and hashes (PLAIN, LOGIN).""",
    ),
    FileDoc(
        "handles", "users", "map", "pqmail", "(none)",
        "handle:base lines: where each customer handle's tree lives",
        _r(("provisioning", EACH_CALL)),
        "Recorded the first time a handle is used; the default --base for that handle afterwards.",
    ),
)

_DIALUP: tuple[FileDoc, ...] = (
    FileDoc(
        "RELAYHOST", "dialup", "value", "serialmail", "(none)",
        "the customer's own SMTP server: host[:port]; also the transfer lock",
        _r(("serialmail, odmrd (the lock only), dialup list", "at every transfer or invocation")),
        """host, host:port, [IP] or [IP]:port (port 25 by default). Every transfer takes an exclusive,
non-blocking lock on this file, so one transfer per customer runs at a time. Written by pqmail dialup
add --relayhost; a directory holding it is a dial-up customer for serialmail run --base.""",
    ),
    FileDoc(
        "ETRNCLIENTS", "dialup", "list", "pqmail", "(none)",
        "client IPs or CIDR networks that may ask ETRN for this customer",
        _r(("smtpd (ETRN)", "at every ETRN")),
        """One address or network a line (192.0.2.7, 192.0.2.0/24); unusable lines are ignored. A client
listed here may send `ETRN some.example.com` (or `ETRN @example.com` for every dial-up domain below
it) to start the customer's flush at once. The alternative is SMTP AUTH as the customer (login = the
domain, password from pqmail serialmail passwd); smtpd's AUTH checks argon2id hashes only, so that
password must be stored with --hashed.""",
    ),
    FileDoc(
        "LASTTRANSFER", "dialup", "record", "pqmail", "(none)",
        "outcome of the latest transfer: <unix time> <status> <summary>",
        _r(("dialup list", EACH_CALL)),
        "Written atomically by every flush (scheduled, serialmail flush/run, ODMR). Status: ok, empty, "
        "deferred (a 4xx stopped it), failed, or interrupted (the service stopped midway). "
        "Not configuration.",
    ),
)

ENTRIES: tuple[FileDoc, ...] = _CONTROL + _USERS + _DIALUP


def find(name: str) -> FileDoc | None:
    """The entry for ``name`` (``rcpthosts``, ``control/rcpthosts``, ``users/assign``, ``DIR/RELAYHOST``).

    Exact names first, then ignoring case; None when nothing matches.
    """
    key = name.strip().rstrip("/")
    for prefix in ("ROOT/", "./"):
        key = key.removeprefix(prefix)
    place = None
    if "/" in key:
        head, _, key = key.partition("/")
        place = {"control": "control", "users": "users", "dir": "dialup"}.get(head.lower())
        if place is None:
            return None
    candidates = [e for e in ENTRIES if place is None or e.place == place]
    for e in candidates:
        if e.name == key:
            return e
    for e in candidates:
        if e.name.lower() == key.lower():
            return e
    return None


def control_names() -> frozenset[str]:
    """The names of every file in ``control/`` that pqmail reads."""
    return frozenset(e.name for e in ENTRIES if e.place == "control")
