"""A model's own tokenizer in the picker: request bodies to the token ids vLLM will see.

Precise prefix routing matches the token ids a server announced in its KV-cache events,
so the picker must tokenize a request exactly as the server will. That means the model's
tokenizer files, read from a local directory (a Hugging Face model directory, or just its
`tokenizer.json`, `tokenizer_config.json` and optional `chat_template.jinja`), and
vLLM's rules for the OpenAI APIs:

* completions: a string `prompt` is encoded with special tokens, so it starts with BOS
  when the tokenizer adds one (its post-processor, or `add_bos_token: true` in
  `tokenizer_config.json`); a `prompt` of token ids is taken as it is; a batch of prompts
  has no single prefix and is not tokenized.
* chat completions: the messages are rendered through the model's chat template (a
  sandboxed Jinja environment like the one transformers uses, with
  `add_generation_prompt` true unless the request says otherwise), and the text is
  encoded *without* adding special tokens: a template that wants BOS writes
  `{{ bos_token }}` itself. `add_special_tokens`, `add_generation_prompt` and
  `chat_template_kwargs` in the request are honoured.

Tokenizing a long prompt takes milliseconds (see bench/kv_events.py), too long for the
event loop; `TokenizerPool.token_ids` encodes prompts above `inline_chars` on a thread
(the Rust tokenizer releases the GIL). Results are cached by the exact text; a prompt's
prefix is not cached separately, because BPE is not prefix-stable at an arbitrary cut.
"""

from __future__ import annotations

import array
import asyncio
import concurrent.futures
import json
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import jinja2
import jinja2.sandbox
import tokenizers

from epp.bodies.parsers import ParsedBody

TokenIds = Sequence[int]

DEFAULT_INLINE_CHARS: Final = 512  # ~150 tokens, well under a millisecond
DEFAULT_CACHE_TOKENS: Final = 1 << 20  # ~4 MiB of cached ids

_POOL = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="tokenizer")


class TokenizerError(ValueError):
    """A tokenizer directory that cannot be used; the message says why, in one line."""


def _token_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])  # an AddedToken as transformers saves it
    return None


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


class ModelTokenizer:
    """One model's tokenizer and chat template, loaded from `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{directory}: no tokenizer.json (a model or tokenizer directory)")
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exceptions
            raise TokenizerError(f"{path}: cannot load: {exc}") from None
        config = self._read_config(directory / "tokenizer_config.json")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self._special: dict[str, str] = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            text = _token_text(config.get(key))
            if text is not None:
                self._special[key] = text
        bos_id = self._tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        self._bos_id = bos_id if config.get("add_bos_token") is True else None
        self._template = self._load_template(config, directory / "chat_template.jinja")

    @staticmethod
    def _read_config(path: Path) -> dict[str, Any]:
        if not path.is_file():
            return {}
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TokenizerError(f"{path}: not readable JSON: {exc}") from None
        if not isinstance(config, dict):
            raise TokenizerError(f"{path}: must be a JSON object")
        return config

    @staticmethod
    def _load_template(config: Mapping[str, Any], file: Path) -> jinja2.Template | None:
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not isinstance(source, str) and file.is_file():
            source = file.read_text(encoding="utf-8")
        if not isinstance(source, str):
            return None
        environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        environment.filters["tojson"] = lambda value, **kw: json.dumps(value, **kw)
        environment.globals["raise_exception"] = _raise
        try:
            return environment.from_string(source)
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"{file.parent}: chat template does not compile: {exc}") from None

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode_text(self, text: str, add_special_tokens: bool = True) -> TokenIds:
        ids = self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self._bos_id
        if add_special_tokens and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return array.array("I", ids)

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        if self._template is None:
            raise TokenizerError(f"{self.directory}: the tokenizer has no chat template")
        flat = [
            {**m, "content": _content_text(m.get("content"))} if "content" in m else dict(m)
            for m in messages
        ]
        return self._template.render(
            **(extra or {}),
            **self._special,
            messages=flat,
            add_generation_prompt=add_generation_prompt,
        )

    def prompt_of(self, body: ParsedBody) -> tuple[str, bool] | TokenIds | None:
        """What to encode for `body`: (text, add_special_tokens), ids given by the client,
        or None when the body has no single tokenizable prompt."""
        document = body.document
        if document is None:
            return None
        if body.api == "completions":
            prompt = document.get("prompt")
            special = document.get("add_special_tokens", True) is not False
            if isinstance(prompt, str):
                return prompt, special
            if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
                return array.array("I", prompt)
            return None
        if body.api == "chat/completions" and self._template is not None:
            messages = document.get("messages")
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                return None
            extra = document.get("chat_template_kwargs")
            try:
                text = self.render_chat(
                    messages,
                    document.get("add_generation_prompt", True) is not False,
                    extra if isinstance(extra, dict) else None,
                )
            except jinja2.TemplateError:
                return None  # the server will reject it too; nothing to match
            return text, document.get("add_special_tokens") is True
        return None


def _content_text(content: object) -> object:
    """Text parts of a message joined as vLLM does for text-only models."""
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return "\n".join(p for p in parts if isinstance(p, str))
    return content


class TokenizerPool:
    """Tokenizers by model name, a cache of encoded prompts, and the thread they run on.

    A model's tokenizer is loaded when its first request comes (on the thread, like long
    prompts), not when the config is: a cluster mounts tokenizer volumes, and a config
    must validate where they are not. A directory that cannot be loaded is tried again
    after `RETRY_LOAD_S`; until then `failure(model)` says why.
    """

    RETRY_LOAD_S: Final = 60.0

    def __init__(
        self,
        directories: Mapping[str, str | Path] | None = None,
        *,
        inline_chars: int = DEFAULT_INLINE_CHARS,
        cache_tokens: int = DEFAULT_CACHE_TOKENS,
        loaded: Mapping[str, ModelTokenizer] | None = None,
    ) -> None:
        self._directories = {m: Path(d) for m, d in (directories or {}).items()}
        self._by_model: dict[str, ModelTokenizer] = dict(loaded or {})
        self._directories.update({m: t.directory for m, t in self._by_model.items()})
        self._failures: dict[str, tuple[float, str]] = {}
        self.inline_chars = inline_chars
        self.cache_tokens = cache_tokens
        self._cache: OrderedDict[tuple[int, str, bool], TokenIds] = OrderedDict()
        self._cached_tokens = 0

    def configured(self, model: str) -> bool:
        return model in self._directories

    def failure(self, model: str) -> str | None:
        """Why the model's tokenizer could not be loaded, while that holds."""
        failed = self._failures.get(model)
        return failed[1] if failed is not None else None

    def tokenizer(self, model: str) -> ModelTokenizer | None:
        """The model's tokenizer, loading it on this thread if needed; None when it has
        none or it cannot be loaded."""
        found = self._by_model.get(model)
        if found is not None or not self._should_load(model):
            return found
        return self._loaded(model, _try_load(self._directories[model]))

    async def load(self, model: str) -> ModelTokenizer | None:
        """`tokenizer(model)`, loading on the thread pool."""
        found = self._by_model.get(model)
        if found is not None or not self._should_load(model):
            return found
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(_POOL, _try_load, self._directories[model])
        return self._loaded(model, result)

    def _should_load(self, model: str) -> bool:
        if model not in self._directories:
            return False
        failed = self._failures.get(model)
        return failed is None or time.monotonic() - failed[0] >= self.RETRY_LOAD_S

    def _loaded(self, model: str, result: ModelTokenizer | str) -> ModelTokenizer | None:
        if isinstance(result, str):
            self._failures[model] = (time.monotonic(), result)
            return None
        self._failures.pop(model, None)
        self._by_model[model] = result
        return result

    def cached(self, tokenizer: ModelTokenizer, body: ParsedBody) -> TokenIds | None:
        """Ids for `body` if they need no work (cached, short or given), else None."""
        found = self._lookup(tokenizer, body)
        return found if not isinstance(found, tuple) else None

    async def token_ids(self, tokenizer: ModelTokenizer, body: ParsedBody) -> TokenIds | None:
        """The request's token ids; long prompts are encoded on a thread."""
        found = self._lookup(tokenizer, body)
        if not isinstance(found, tuple):
            return found
        text, special = found
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(_POOL, tokenizer.encode_text, text, special)
        self._store(tokenizer, text, special, ids)
        return ids

    def token_ids_now(self, tokenizer: ModelTokenizer, body: ParsedBody) -> TokenIds | None:
        """The request's token ids, encoded on the calling thread whatever the length."""
        found = self._lookup(tokenizer, body)
        if not isinstance(found, tuple):
            return found
        text, special = found
        ids = tokenizer.encode_text(text, special)
        self._store(tokenizer, text, special, ids)
        return ids

    def _lookup(
        self, tokenizer: ModelTokenizer, body: ParsedBody
    ) -> TokenIds | tuple[str, bool] | None:
        prompt = tokenizer.prompt_of(body)
        if not isinstance(prompt, tuple):
            return prompt
        text, special = prompt
        hit = self._cache.get((id(tokenizer), text, special))
        if hit is not None:
            self._cache.move_to_end((id(tokenizer), text, special))
            return hit
        if len(text) <= self.inline_chars:
            ids = tokenizer.encode_text(text, special)
            self._store(tokenizer, text, special, ids)
            return ids
        return prompt

    def _store(self, tokenizer: ModelTokenizer, text: str, special: bool, ids: TokenIds) -> None:
        if len(ids) > self.cache_tokens // 4:
            return  # one huge prompt would flush everything else
        key = (id(tokenizer), text, special)
        if key in self._cache:
            return
        self._cache[key] = ids
        self._cached_tokens += len(ids)
        while self._cached_tokens > self.cache_tokens:
            _, old = self._cache.popitem(last=False)
            self._cached_tokens -= len(old)


_LOADED: dict[tuple[str, float], ModelTokenizer] = {}


def _try_load(directory: Path) -> ModelTokenizer | str:
    try:
        return load(directory)
    except TokenizerError as exc:
        return str(exc)


def load(directory: str | Path) -> ModelTokenizer:
    """The tokenizer in `directory`, loaded once per directory and modification time."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise TokenizerError(f"{path}: not a directory")
    try:
        stamp = (path / "tokenizer.json").stat().st_mtime
    except OSError:
        stamp = 0.0
    key = (str(path.resolve()), stamp)
    found = _LOADED.get(key)
    if found is None:
        found = _LOADED[key] = ModelTokenizer(path)
    return found
