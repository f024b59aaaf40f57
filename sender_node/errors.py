"""Errors raised by the sender node.

One root, :class:`MailerError`, with a transient and a permanent branch, after
``ApplicationError(non_retryable=, next_retry_delay=)`` in temporalio. Outcomes of
SMTP transactions are not exceptions: they are values (see ``classify.py``).
"""

from __future__ import annotations

from datetime import timedelta


class MailerError(Exception):
    """Root of every error this package raises on purpose."""


class TransientError(MailerError):
    """Trying again later may succeed.

    Args:
        message: What went wrong.
        retry_after: How long to wait first, when known.
    """

    def __init__(self, message: str, retry_after: timedelta | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(MailerError):
    """Trying again with the same input fails the same way."""


class ConfigError(PermanentError, ValueError):
    """A MAILER_* setting is missing or malformed."""


class RenderError(PermanentError):
    """A message cannot be rendered: a bad header, address, or template.

    Raised per job (bad content) or per recipient (bad address); either way the
    affected recipients fail permanently, since retrying renders the same bytes.
    """


class RegistrationError(TransientError):
    """The node could not register in etcd (etcd unreachable or the key is taken)."""
