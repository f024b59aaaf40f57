"""Attachment MIME parts, checked and base64-encoded once per job, with RFC 2231
parameters for filenames that are not plain ASCII.

An attachment's content type must be on the job's allow-list
(``RenderLimits.attachment_types``); binary types must also start with their magic
bytes, and text types must be UTF-8. Parts come out as bytes with CRLF line endings,
ready to splice between boundaries.
"""

from __future__ import annotations

import base64
import email.utils
import re

from mailers_runtime.message.headers import CONTROL
from mailers_runtime.message.model import Attachment, RenderError, RenderLimits

_FILENAME_PLAIN = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9 ._()+-]{0,59}\Z")
_CONTENT_TYPE = re.compile(r"\A[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*\Z")
# Magic bytes a binary attachment must start with (ZIP for the office formats).
_ZIP = (b"PK\x03\x04",)
_MAGIC: dict[str, tuple[bytes, ...]] = {
    "application/pdf": (b"%PDF-",),
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": _ZIP,
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": _ZIP,
    "application/vnd.openxmlformats-officedocument.presentationml.presentation": _ZIP,
    "application/vnd.oasis.opendocument.text": _ZIP,
    "application/vnd.oasis.opendocument.spreadsheet": _ZIP,
}


def _quote_param(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _rfc2231_params(param: str, value: str) -> list[str]:
    """``param*=utf-8''...`` (RFC 2231), split into continuations of at most ~60 chars."""
    whole = email.utils.encode_rfc2231(value.encode("utf-8", "replace").decode(), "utf-8")
    quoted = whole.removeprefix("utf-8''")
    if len(quoted) <= 50:
        return [f"{param}*={whole}"]
    chunks: list[str] = []
    while quoted:
        cut = min(50, len(quoted))
        # Never split a %XX triplet.
        percent = quoted.rfind("%", max(0, cut - 2), cut)
        if percent != -1:
            cut = percent
        chunks.append(quoted[:cut])
        quoted = quoted[cut:]
    out = [f"{param}*0*=utf-8''{chunks[0]}"]
    out.extend(f"{param}*{i}*={chunk}" for i, chunk in enumerate(chunks[1:], 1))
    return out


def attachment_part(attachment: Attachment, limits: RenderLimits, where: str) -> bytes:
    """The MIME part of ``attachment``, headers and base64 body, without the final CRLF.

    Raises:
        RenderError: the type, filename or content is not allowed; the message starts
            with ``where``.
    """
    content_type = attachment.content_type.strip().lower()
    if not _CONTENT_TYPE.match(content_type) or content_type not in limits.attachment_types:
        raise RenderError(f"{where}: content type {attachment.content_type!r} is not allowed")
    filename = attachment.filename
    if not filename or CONTROL.search(filename) or "/" in filename or "\\" in filename:
        raise RenderError(f"{where}: filename must be non-empty without controls or slashes")
    if len(filename) > 255:
        raise RenderError(f"{where}: filename is longer than 255 characters")
    data = attachment.content
    magic = _MAGIC.get(content_type)
    if magic is not None and not data.startswith(magic):
        raise RenderError(f"{where}: content does not look like {content_type}")
    if content_type == "image/webp" and not (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        raise RenderError(f"{where}: content does not look like image/webp")
    type_params = ""
    if content_type.startswith("text/") or content_type == "application/json":
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise RenderError(f"{where}: {content_type} content is not UTF-8") from None
        type_params = '; charset="utf-8"'
    if _FILENAME_PLAIN.match(filename):
        names = [f"name={_quote_param(filename)}"], [f"filename={_quote_param(filename)}"]
    else:
        names = _rfc2231_params("name", filename), _rfc2231_params("filename", filename)
    body = base64.encodebytes(data).replace(b"\n", b"\r\n")
    head = (
        f"Content-Type: {content_type}{type_params};\r\n "
        + ";\r\n ".join(names[0])
        + "\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment;\r\n "
        + ";\r\n ".join(names[1])
        + "\r\n\r\n"
    )
    # The CRLF before the next boundary belongs to the delimiter: drop the last one.
    return head.encode("ascii") + body.removesuffix(b"\r\n")
