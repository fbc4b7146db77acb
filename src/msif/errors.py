"""Errors msif raises, and what the CLI may print of them.

The CLI prints an error as one line and exits non-zero (`MsifError.exit_code`); `redact`
keeps credentials out of every line, traceback and log record it prints.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager


class MsifError(Exception):
    """Base class for every error caused by the user's input, data or environment."""

    exit_code = 1  # a runtime error; usage errors exit 2


class MismatchError(MsifError):
    """Artifacts that do not belong together (other model, other factors, other modules)."""


class DataError(MsifError):
    """Input tables or batches that violate the data contract."""


class OptionError(MsifError):
    """A run option with a value it cannot take: a usage error, exit code 2."""

    exit_code = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM raised like Ctrl-C, so that `finally` blocks (staging directories) still run."""


class SubcommandFailed(SystemExit):
    """An in-process `msif` subcommand exited non-zero; it has printed its own error line.

    A SystemExit, so that a KFP task process whose component raised it ends with the node's
    exit code and nothing after that line (kfp's executor would print the traceback of any
    other exception, and a task log should end with the `msif: error:` line).
    """

    def __init__(self, command: str, exit_code: int):
        super().__init__(exit_code)
        self.message = f"msif {command} failed with exit code {exit_code}"
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


# ----------------------------------------------------------------------------- redaction

_SECRETS: set[str] = set()
_REDACTED = "***"
_PATTERNS = (
    # An Authorization or Cookie header's value, however it is quoted or logged.
    (re.compile(r"(?i)((?:authorization|cookie)['\"]?\s*[:=]\s*['\"]?)[^'\"\n,}]+"), r"\1***"),
    # A bearer token wherever it appears (an echoed header, a body); 8+ characters, so that
    # prose such as "a bearer token" stays.
    (re.compile(r"(?i)\b(bearer)(?:\s+|%20)[\w.~+/=-]{8,}"), r"\1 ***"),
    # JSON web tokens (IAP and service-account identity tokens are JWTs).
    (re.compile(r"\beyJ[\w-]+\.[\w-]+\.[\w-]*"), _REDACTED),
    # user:password@ in a URL.
    (re.compile(r"(://)[^/\s@]+@"), r"\1***@"),
)


def add_secret(value: str | None) -> None:
    """Never print value (a token, a client secret): `redact` replaces it wherever it is."""
    if value and len(value.strip()) >= 4:  # shorter strings would blank out ordinary text
        _SECRETS.add(value.strip())


def redact(text: str) -> str:
    """text with registered secrets and anything that looks like a credential replaced."""
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, _REDACTED)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class _RedactFilter(logging.Filter):
    """Redacts a record's message and traceback before a handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken logging call: keep its parts, still redacted
            message = f"{record.msg} {record.args}"
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


@contextmanager
def redacted_logging() -> Iterator[None]:
    """Redact every record reaching the root logger's handlers (or logging's last resort).

    Libraries log at DEBUG what they send and receive (kfp's REST client logs response bodies,
    which may echo the Authorization header), and -v shows DEBUG.
    """
    handlers = [h for h in (*logging.getLogger().handlers, logging.lastResort) if h]
    redacting = _RedactFilter()
    for handler in handlers:
        handler.addFilter(redacting)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(redacting)
