"""Text ↔ token ids and the chat template of a checkpoint directory, on the `tokenizers` library.

Reads tokenizer.json, tokenizer_config.json, generation_config.json and chat_template.{jinja,json}; needs no transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment


class Tokenizer:
    """A checkpoint's fast tokenizer plus its special-token ids and chat template."""

    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {model_dir}")
        self._tok = tokenizers.Tokenizer.from_file(str(path))
        self._config = _read_json(model_dir / "tokenizer_config.json")
        generation = _read_json(model_dir / "generation_config.json")
        self.chat_template = _load_chat_template(model_dir, self._config)
        self.eos_token_ids = self._eos_ids(generation)
        pad = self._config.get("pad_token")
        self.pad_token_id = self._token_id(pad) if pad else generation.get("pad_token_id")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in it (e.g. `<|im_start|>`) map to their ids. Text that is
        not Unicode (a lone surrogate) is a ValueError."""
        try:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            if isinstance(text, str):  # the library cannot take a lone surrogate
                raise ValueError("the prompt is not valid Unicode text (it holds a lone surrogate)") from None
            raise

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self._tok.id_to_token(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def to_json(self) -> str:
        """The whole tokenizer as tokenizer.json text: what a grammar backend builds its token trie from."""
        return self._tok.to_str()

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (may be below the model's embedding rows)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with the checkpoint's template; extra kwargs (tools, enable_thinking…) reach it."""
        if self.chat_template is None:
            raise ValueError("this checkpoint ships no chat template; pass a raw prompt instead")
        special = {k: _content(self._config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        text = _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special, **kwargs
        )
        return self.encode(text) if tokenize else text

    def _token_id(self, token: str | dict[str, Any]) -> int:
        token_id = self.token_to_id(_content(token))
        if token_id is None:
            raise ValueError(f"special token {_content(token)!r} is not in the vocabulary")
        return token_id

    def _eos_ids(self, generation: dict[str, Any]) -> list[int]:
        eos = generation.get("eos_token_id")
        if eos is not None:
            return eos if isinstance(eos, list) else [eos]
        token = self._config.get("eos_token")
        return [self._token_id(token)] if token else []


def _load_chat_template(model_dir: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja, else chat_template.json, else tokenizer_config.json (HF's precedence)."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(model_dir / "chat_template.json").get("chat_template") or config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    return template


_ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
_ENV.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


_ENV.globals["raise_exception"] = _raise_exception
_TEMPLATES: dict[str, jinja2.Template] = {}


def _compile(source: str) -> jinja2.Template:
    if source not in _TEMPLATES:
        _TEMPLATES[source] = _ENV.from_string(source)
    return _TEMPLATES[source]


def _content(token: str | dict[str, Any] | None) -> str | None:
    """Special tokens in tokenizer_config.json are either strings or AddedToken dicts."""
    return token["content"] if isinstance(token, dict) else token


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
