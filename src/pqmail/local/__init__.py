"""Local delivery as qmail-local does it: dot-qmail search and parsing, Maildir, mbox, programs, forwards.

``deliver.deliver_local`` is the entry point (called by the queue manager's delivery workers, already
running as the box owner's uid); ``dotqmail`` parses a dot-qmail file, ``env`` builds the header lines
and the program environment, ``mbox`` appends to an mbox file, ``getpw`` is qmail-getpw's passwd
fallback. See qmail-semantics.md §2.4-§3.10.
"""
