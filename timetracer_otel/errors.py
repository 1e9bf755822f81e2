"""Errors a user can cause. Each message is one sentence that says what to do next."""

from __future__ import annotations

import re

# scheme://user:password@ in a message (an endpoint URL quoted by botocore, a DSN): the
# password goes, the rest stays.
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^/:@\s\"']*):[^/@\s\"']*@")


def without_passwords(text: str) -> str:
    """``text`` with the passwords of the URLs in it replaced by ``***``.

    >>> without_passwords('Could not connect to "http://user:s3cret@host:9/b"')
    'Could not connect to "http://user:***@host:9/b"'
    """
    return _URL_PASSWORD.sub(r"\1:***@", text)


class TimetracerError(Exception):
    """Base class of every error this package raises on purpose."""


class CassetteError(TimetracerError):
    """A cassette cannot be read or written: missing, corrupt, unknown version, unwritable."""


class ConfigError(TimetracerError, ValueError):
    """A setting (environment variable, argument, marker option) has an invalid value."""


class ReplayMissError(TimetracerError):
    """A call made during replay has no recorded interaction.

    Replay never falls back to the network unless the library's miss policy says so
    (``on_miss="passthrough"`` or ``"record"``).
    """

    def __init__(self, message: str, *, library: str = "", key: str = "") -> None:
        super().__init__(message)
        self.library = library
        self.key = key


class ReplayUnsupportedError(TimetracerError):
    """The recorded interaction cannot be replayed (truncated payload, unknown value type...)."""
