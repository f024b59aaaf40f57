"""Rendering a job's content into one RFC 5322 message per recipient.

Shared by the coordinator, which runs :func:`check_templates` on a job at submit, and
the sender node, which renders and sends it; neither imports the other. A job's content
is compiled once (:class:`CompiledMessage`, cached by job id in :class:`TemplateCache`)
and each recipient's message is spliced together from bytes.

- ``model``: the values (:class:`Mailbox`, :class:`Attachment`, :class:`Content`,
  :class:`RenderLimits`, :class:`MessageSigner`) and :class:`RenderError`.
- ``headers``: RFC 2047 encoded words, folding, addresses, allowed header names.
- ``text``: HTML to text, newlines, quoted-printable.
- ``templates``: the Jinja sandbox and its policy, compiled fields.
- ``mime``: attachment parts and RFC 2231 parameters.
- ``compiler``: :class:`CompiledMessage`, :class:`TemplateCache`,
  :func:`check_templates`, :func:`template_variables`.

Variables are the recipient's ``variables`` plus ``email`` and ``name`` (explicit
variables win). Values are HTML-escaped in the HTML body (autoescape, HTML only),
percent-encoded in the unsubscribe URL, and, in every header, control characters (C0,
DEL, C1 including NEL, U+2028, U+2029) become a space *after* rendering, so nothing a
recipient's data or a template produces can start a header line. Header names come from
an allow-list (``X-*`` and :data:`ALLOWED_HEADERS`).

Guarantees of every rendered message:

- CRLF line endings, 7-bit clean, lines within 78 characters except for unbreakable
  ASCII header words (never above 998): bodies are quoted-printable UTF-8, attachments
  base64, non-ASCII header text RFC 2047 encoded, non-ASCII filenames RFC 2231 encoded.
- ``Message-ID`` is ``<{job_id}.{index}@{domain of From}>``: the same recipient of the
  same job always gets the same id, which lets relays and readers drop duplicates.
- Multipart boundaries start with ``=_``, which neither quoted-printable nor base64
  output ever contains, so they cannot collide with a body.
"""

from mailers_runtime.message.compiler import (
    CompiledMessage,
    TemplateCache,
    check_templates,
    template_variables,
)
from mailers_runtime.message.headers import (
    ALLOWED_HEADERS,
    RESERVED_HEADERS,
    clean_display_name,
    clean_header_value,
    encode_words,
    fold_ascii,
)
from mailers_runtime.message.model import (
    ATTACHMENT_TYPES,
    MAX_RECIPIENTS_PER_MESSAGE,
    SHARED_TO,
    Attachment,
    Content,
    Header,
    Mailbox,
    MessageSigner,
    RenderError,
    RenderLimits,
)
from mailers_runtime.message.text import html_to_text

__all__ = [
    "ALLOWED_HEADERS",
    "ATTACHMENT_TYPES",
    "MAX_RECIPIENTS_PER_MESSAGE",
    "RESERVED_HEADERS",
    "SHARED_TO",
    "Attachment",
    "CompiledMessage",
    "Content",
    "Header",
    "Mailbox",
    "MessageSigner",
    "RenderError",
    "RenderLimits",
    "TemplateCache",
    "check_templates",
    "clean_display_name",
    "clean_header_value",
    "encode_words",
    "fold_ascii",
    "html_to_text",
    "template_variables",
]
