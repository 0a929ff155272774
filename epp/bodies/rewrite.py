"""Changing the model name in a JSON body without touching any other byte.

Inside a JSON string every `"` is escaped, so an unescaped `"model"` followed by `:` can
only be an object key. When the body has exactly one such key we splice the new value in
place; otherwise (nested `model` keys) we re-serialise the parsed document, which is
rare and still correct.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

_MODEL_KEY = re.compile(rb'(?<!\\)"model"\s*:\s*("(?:[^"\\]|\\.)*")')


def replace_model(body: bytes, document: dict[str, Any], new_model: str) -> bytes:
    matches = list(_MODEL_KEY.finditer(body))
    new_value = orjson.dumps(new_model)
    if len(matches) == 1:
        start, end = matches[0].span(1)
        return body[:start] + new_value + body[end:]
    return orjson.dumps({**document, "model": new_model})


class ModelNameRestorer:
    """Rewrites `"model": "<target>"` back to the name the client sent, in response bytes.

    Works chunk by chunk for SSE; a model value split across two chunks is left as it is,
    which only affects a cosmetic field.
    """

    __slots__ = ("_pattern", "_replacement")

    def __init__(self, sent_model: str, target_model: str) -> None:
        target = re.escape(orjson.dumps(target_model))
        self._pattern = re.compile(rb'("model"\s*:\s*)' + target)
        self._replacement = orjson.dumps(sent_model)

    def restore(self, data: bytes) -> bytes:
        if b'"model"' not in data:
            return data
        replacement = self._replacement
        return self._pattern.sub(lambda m: m.group(1) + replacement, data)
