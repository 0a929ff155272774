"""Body parsers: `openai-parser` (default) and `passthrough-parser`.

A body is parsed exactly once (orjson) into :class:`ParsedBody`; everything downstream
(model rewrite, prefix hashing, scheduling) reads that value instead of the bytes again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from epp.errors import bad_request


@dataclass(frozen=True, slots=True)
class ParsedBody:
    api: str  # "chat/completions", "completions", "responses", "embeddings", "conversations", ""
    model: str  # "" when the parser does not read one
    prompt_text: str  # what prefix-cache affinity hashes
    stream: bool = False
    cache_salt: str = ""
    max_tokens: int = 0  # output tokens the client allows; 0: not given
    document: dict[str, Any] | None = None


class BodyParser(Protocol):
    name: str

    def parse(self, path: str, body: bytes) -> ParsedBody: ...


def _text_of_content(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
            elif isinstance(part, str):
                parts.append(part)
        return "".join(parts)
    return ""


def _chat_prompt(document: dict[str, Any]) -> str:
    messages = document.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list")
    pieces = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object")
        role = message.get("role")
        pieces.append(f"<{role}>" if isinstance(role, str) else "<>")
        pieces.append(_text_of_content(message.get("content")))
    return "".join(pieces)


def _completion_prompt(document: dict[str, Any]) -> str:
    if "prompt" not in document:
        raise bad_request("'prompt' is required")
    prompt = document["prompt"]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        # A batch of strings, or token ids: both hash consistently as text.
        return "".join(p if isinstance(p, str) else str(p) for p in prompt)
    raise bad_request("'prompt' must be a string or a list")


def _field_prompt(field: str) -> Callable[[dict[str, Any]], str]:
    def extract(document: dict[str, Any]) -> str:
        if field not in document:
            raise bad_request(f"'{field}' is required")
        value = document[field]
        if isinstance(value, str):
            return value
        return orjson.dumps(value).decode()

    return extract


# Longest suffix first: "/chat/completions" must win over "/completions".
_APIS: tuple[tuple[str, str, Callable[[dict[str, Any]], str]], ...] = (
    ("/chat/completions", "chat/completions", _chat_prompt),
    ("/completions", "completions", _completion_prompt),
    ("/responses", "responses", _field_prompt("input")),
    ("/embeddings", "embeddings", _field_prompt("input")),
    ("/conversations", "conversations", _field_prompt("items")),
)


def _api_for(path: str, document: dict[str, Any]) -> tuple[str, Callable[[dict[str, Any]], str]]:
    path = path.split("?", 1)[0].rstrip("/")
    for suffix, api, prompt in _APIS:
        if path.endswith(suffix):
            return api, prompt
    # Unknown path: infer from the body so gateways that rewrite paths still work.
    if "messages" in document:
        return "chat/completions", _chat_prompt
    if "prompt" in document:
        return "completions", _completion_prompt
    if "input" in document:
        return "responses", _field_prompt("input")
    raise bad_request("body has none of 'messages', 'prompt' or 'input'")


class OpenAIParser:
    name = "openai-parser"

    def parse(self, path: str, body: bytes) -> ParsedBody:
        if not body:
            raise bad_request("request body is empty")
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as error:
            raise bad_request(f"request body is not valid JSON: {error}") from None
        if not isinstance(document, dict):
            raise bad_request("request body must be a JSON object")
        model = document.get("model")
        if model is None:
            raise bad_request("'model' is required")
        if not isinstance(model, str) or not model:
            raise bad_request("'model' must be a non-empty string")
        api, prompt = _api_for(path, document)
        salt = document.get("cache_salt")
        limit = (
            document.get("max_tokens")
            or document.get("max_completion_tokens")
            or document.get("max_output_tokens")
        )
        return ParsedBody(
            api=api,
            model=model,
            prompt_text=prompt(document),
            stream=document.get("stream") is True,
            cache_salt=salt if isinstance(salt, str) else "",
            max_tokens=limit if isinstance(limit, int) and not isinstance(limit, bool) else 0,
            document=document,
        )


class PassthroughParser:
    """Forwards any body untouched; no model, so no rewrite and no prefix affinity."""

    name = "passthrough-parser"

    def parse(self, path: str, body: bytes) -> ParsedBody:
        return ParsedBody(api="", model="", prompt_text="")


PARSERS: dict[str, type[OpenAIParser] | type[PassthroughParser]] = {
    OpenAIParser.name: OpenAIParser,
    PassthroughParser.name: PassthroughParser,
}
