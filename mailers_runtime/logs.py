"""Logging set-up shared by every process: text for people, JSON lines for machines.

``MAILER_LOG_FORMAT=json`` gives one JSON object per line with the time, level,
logger, message, the process's component and id, and any of ``job``, ``batch``,
``node`` passed as ``extra=``. Nothing here logs message bodies or credentials, and
smtplib's debug output (which prints AUTH in clear) is never enabled.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping

_CONTEXT_FIELDS = ("job", "batch", "node", "relay", "epoch")


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str, instance: str) -> None:
        super().__init__()
        self._component = component
        self._instance = instance

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "component": self._component,
            "instance": self._instance,
        }
        for field in _CONTEXT_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup(component: str, instance: str, environ: Mapping[str, str]) -> None:
    """Configure the root logger from MAILER_LOG_LEVEL and MAILER_LOG_FORMAT."""
    handler = logging.StreamHandler(sys.stderr)
    if environ.get("MAILER_LOG_FORMAT", "text").lower() == "json":
        formatter = JsonFormatter(component, instance)
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    else:
        handler.setFormatter(
            logging.Formatter(
                f"%(asctime)s {component}[{instance}] %(levelname)s %(name)s: %(message)s"
            )
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(environ.get("MAILER_LOG_LEVEL", "INFO").upper())
