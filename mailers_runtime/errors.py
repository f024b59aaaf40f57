"""The root of every error the servers raise on purpose, with stdlib bases.

One tree, after ``ApplicationError(non_retryable=, next_retry_delay=)`` in temporalio:
:class:`TransientError` (trying again later may succeed; ``retry_after`` says when, if
known) and :class:`PermanentError` (the same input fails the same way). Each concrete
error also derives from the standard exception that says what it is, so callers that
know only the standard library still catch it: bad input is a ``ValueError``, an
unreachable dependency a ``ConnectionError``, a deadline a ``TimeoutError``, a missing
object a ``LookupError``. SMTP outcomes are values, not exceptions (``classify``), and
the SDK keeps its own tree (``client_sdk.errors``): it is the API's, shipped apart.
"""

from __future__ import annotations

from datetime import timedelta


class MailersError(Exception):
    """Root of every error the coordinator, the sender node and their library raise."""


class TransientError(MailersError):
    """Trying again later may succeed.

    Args:
        message: What went wrong.
        retry_after: How long to wait first, when known.
    """

    def __init__(self, message: str, retry_after: timedelta | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(MailersError):
    """Trying again with the same input fails the same way."""


class ConfigError(PermanentError, ValueError):
    """A MAILER_* setting is missing or malformed; the message names the variable."""
