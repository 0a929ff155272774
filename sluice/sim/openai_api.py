"""The OpenAI-compatible surface as vLLM serves it: request validation and response shapes.

Pure functions over bytes and values; the HTTP server calls them. Errors are vLLM's flat
shape `{"object": "error", "message", "type", "param", "code"}`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from sluice.sim import tokens

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    408: "RequestTimeoutError",
    413: "RequestEntityTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> bytes:
        return error_body(self.status, self.message, self.param)


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    return orjson.dumps(
        {
            "object": "error",
            "message": message,
            "type": _ERROR_TYPES.get(
                status, "InternalServerError" if status >= 500 else "APIError"
            ),
            "param": param,
            "code": status,
        }
    )


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    chat: bool
    model: str
    prompt_text: str | None  # exactly one of prompt_text / prompt_ids is set
    prompt_ids: tuple[int, ...] | None
    max_tokens: int | None
    stream: bool
    include_usage: bool
    cache_salt: str | None


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse(body: bytes, *, chat: bool) -> ParsedRequest:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise _bad(f"Invalid JSON in request body: {e}") from None
    if not isinstance(data, dict):
        raise _bad("Request body must be a JSON object")
    model = data.get("model")
    if model is None:
        raise _bad("Field 'model' is required", "model")
    if not isinstance(model, str):
        raise _bad(f"Field 'model' must be a string, got {type(model).__name__}", "model")
    text: str | None = None
    ids: tuple[int, ...] | None = None
    if chat:
        text = _messages_text(data.get("messages"))
        limit = data.get("max_completion_tokens")
        limit_field = "max_completion_tokens"
        if limit is None:
            limit, limit_field = data.get("max_tokens"), "max_tokens"
    else:
        text, ids = _prompt(data.get("prompt"))
        limit, limit_field = data.get("max_tokens"), "max_tokens"
    if limit is not None and not _is_int(limit):
        raise _bad(f"Field '{limit_field}' must be an integer", limit_field)
    if limit is not None and limit < 1:
        raise _bad(f"{limit_field} must be at least 1, got {limit}.", limit_field)
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("Field 'stream' must be a boolean", "stream")
    options = data.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise _bad("Field 'stream_options' must be an object", "stream_options")
        if not stream:
            raise _bad("Stream options can only be defined when `stream=True`.", "stream_options")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise _bad("Field 'stream_options.include_usage' must be a boolean", "stream_options")
    n = data.get("n", 1)
    if n is not None and (not _is_int(n) or n != 1):
        raise _bad("The simulator supports only n=1", "n")
    salt = data.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise _bad("Field 'cache_salt' must be a non-empty string", "cache_salt")
    return ParsedRequest(chat, model, text, ids, limit, stream, include_usage, salt)


def _prompt(prompt: object) -> tuple[str | None, tuple[int, ...] | None]:
    if prompt is None:
        raise _bad("Field 'prompt' is required", "prompt")
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list) and prompt:
        if all(_is_int(t) for t in prompt):
            return None, tuple(prompt)
        if len(prompt) == 1 and isinstance(prompt[0], str):
            return prompt[0], None
        if len(prompt) == 1 and isinstance(prompt[0], list) and all(_is_int(t) for t in prompt[0]):
            return None, tuple(prompt[0])
        if len(prompt) > 1 and all(isinstance(p, str | list) for p in prompt):
            raise _bad(
                f"Batched prompts ({len(prompt)} prompts in one request) are not supported "
                "by the simulator; send one prompt per request",
                "prompt",
            )
    raise _bad(
        "Field 'prompt' must be a string, a list of token ids, or a one-element list of either",
        "prompt",
    )


def _messages_text(messages: object) -> str:
    if not isinstance(messages, list) or not messages:
        raise _bad("Field 'messages' is required and must be a non-empty list", "messages")
    pairs: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"messages[{i}] must be an object", "messages")
        role = message.get("role")
        if not isinstance(role, str):
            raise _bad(f"messages[{i}].role must be a string", "messages")
        pairs.append((role, _content_text(message.get("content"), i)))
    return tokens.chat_template(pairs)


def _content_text(content: object, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise _bad(f"messages[{i}].content parts must be objects with a 'type'", "messages")
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise _bad(f"messages[{i}].content text parts need a string 'text'", "messages")
                texts.append(part["text"])
        return "\n".join(texts)
    raise _bad(f"messages[{i}].content must be a string, a list of parts, or null", "messages")


# -- responses -----------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def response_body(
    *,
    chat: bool,
    request_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str | None,
    usage_: Mapping[str, Any],
) -> bytes:
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "tool_calls": []},
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
        }
    else:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
        }
    return orjson.dumps(
        {
            "id": request_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage_,
        }
    )


class StreamChunks:
    """SSE events of one streamed response, in the OpenAI chunk shape."""

    def __init__(self, *, chat: bool, request_id: str, created: int, model: str) -> None:
        self._chat = chat
        self._head = {
            "id": request_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": model,
        }

    def _event(self, payload: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(payload) + b"\n\n"

    def role(self) -> bytes:
        """The opening chat chunk that announces the assistant's role (chat only)."""
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return self._event({**self._head, "choices": [choice]})

    def token(self, text: str, finish_reason: str | None = None) -> bytes:
        if self._chat:
            choice: dict[str, Any] = {
                "index": 0,
                "delta": {"content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": None,
            }
        return self._event({**self._head, "choices": [choice]})

    def usage(self, usage_: Mapping[str, Any]) -> bytes:
        return self._event({**self._head, "choices": [], "usage": usage_})

    @staticmethod
    def done() -> bytes:
        return b"data: [DONE]\n\n"


def model_card(
    name: str, created: int, *, root: str, parent: str | None, max_model_len: int | None
) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": root,
        "parent": parent,
        "max_model_len": max_model_len,
        "permission": [
            {
                "id": f"modelperm-{name}",
                "object": "model_permission",
                "created": created,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ],
    }
