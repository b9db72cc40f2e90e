"""Logging: human-readable lines, or one JSON object per line (GATEWAY_LOG_FORMAT=json).

Lines about one connection carry its id (``conn``). Tokens are never logged anywhere.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


_BEARER = re.compile(r"(bearer\.)[^\s'\",\]]+", re.IGNORECASE)


class RedactBearer(logging.Filter):
    """Masks ``bearer.<token>`` subprotocols in a record. aiohttp logs the subprotocols a client
    offered when none is the server's (a client that forgot "gateway.v1"), token and all."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _BEARER.search(message):
            record.msg, record.args = _BEARER.sub(r"\1***", message), ()
        return True


REDACT_BEARER = RedactBearer()


class QuietBadRequests(logging.Filter):
    """aiohttp logs a request its HTTP parser refuses as an error with a traceback that quotes
    the start of the offending header (part of a token, say). Anyone can send one at will: it
    is not the gateway's error, so it becomes one info line naming the problem, not the bytes.
    The client still gets aiohttp's HTTP 400."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import BadHttpMessage

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, BadHttpMessage):
            peer = record.getMessage().removeprefix("Error handling request from ")
            record.msg, record.args = "bad HTTP request from %s: %s (HTTP 400)", (peer, type(exc).__name__)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)  # as if logged at info
        return True


QUIET_BAD_REQUESTS = QuietBadRequests()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        conn = getattr(record, "conn", None)
        prefix = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{prefix} {record.levelname.lower():7} {record.name}: "
        if conn:
            line += f"[{conn}] "
        line += record.getMessage()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would print every upgrade URL; we never put tokens in URLs,
    # but keep it quiet by default anyway.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
