"""Errors raised by the sender node.

One root, :class:`MailerError`, with a transient and a permanent branch, after
``ApplicationError(non_retryable=, next_retry_delay=)`` in temporalio. Outcomes of
SMTP transactions are not exceptions: they are values (see ``classify.py``). A message
that cannot be rendered raises :class:`mailers_runtime.message.RenderError`, which the
coordinator shares and so lives outside this package.
"""

from __future__ import annotations

from mailers_runtime.errors import ConfigError, PermanentError, TransientError
from mailers_runtime.errors import MailersError as MailerError

__all__ = ["ConfigError", "MailerError", "PermanentError", "RegistrationError", "TransientError"]


class RegistrationError(TransientError, ConnectionError):
    """The node could not register in etcd (etcd unreachable or the key is taken)."""
