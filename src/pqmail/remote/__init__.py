"""Remote delivery (qmail-remote): routing by smtproutes and MX, the SMTP client, and the engine.

The queue manager uses :class:`~pqmail.remote.deliver.RemoteEngine`; the other modules are its parts:
:mod:`pqmail.remote.mx` (where to send), :mod:`pqmail.remote.client` (one SMTP session).
"""

from pqmail.remote.deliver import RemoteEngine, RemoteResult

__all__ = ["RemoteEngine", "RemoteResult"]
