"""pqmail: a qmail-compatible mail system for ISPs and hosters.

The package keeps qmail's on-disk contract (control/, users/, queue/, dot-qmail files) and its
behaviour; see the README for the commands and control files supported.
"""

__version__ = "0.1.0"
