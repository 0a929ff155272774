"""Errors a request can end with, as the client sees them.

The body format `inference error: <Code> - <message>` and the status codes follow the
upstream endpoint picker so clients and dashboards keep working.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class InferenceError(Exception):
    status: int
    code: str
    message: str
    retry_after_s: int | None = None

    def __str__(self) -> str:
        return f"inference error: {self.code} - {self.message}"

    @property
    def body(self) -> bytes:
        return str(self).encode()


def bad_request(message: str) -> InferenceError:
    return InferenceError(400, "BadRequest", message)


def too_large(message: str) -> InferenceError:
    return InferenceError(413, "RequestTooLarge", message)


def internal(message: str) -> InferenceError:
    return InferenceError(500, "Internal", message)


def unavailable(message: str) -> InferenceError:
    return InferenceError(503, "ServiceUnavailable", message)


def exhausted(message: str, retry_after_s: int | None = None) -> InferenceError:
    return InferenceError(429, "ResourceExhausted", message, retry_after_s)
