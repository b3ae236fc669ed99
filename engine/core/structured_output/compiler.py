"""GrammarCompiler: a StructuredOutputsParams spec -> a compiled llguidance matcher, cached per distinct spec.

The backend is llguidance. Measured on this project's 2-core CPU with the 152064-token vocabulary
(`python benchmarks/structured_output.py --backends llguidance,xgrammar`): a 200-property JSON schema
compiles in about 8 ms with llguidance against about 430 ms with xgrammar, and the masks of 64 rows take
about 2 ms per decode step with either (the step itself is some 100 ms). Compile time is what a user with a
new schema waits for, and llguidance also has no dependencies, while xgrammar requires torch, transformers
and triton (a CUDA-sized install beside our CPU torch). So llguidance it is.

Compiled grammars are cached (least recently used, bounded); a request gets a deep copy of a cached
template, which costs microseconds. Copies of one template share llguidance's lock (their lexer), so two
threads filling masks of the same lineage take turns: a spec may have several templates (`add_lineages`),
one per thread that fills masks at once. Errors (invalid JSON or schema, bad regex, unknown grammar rule, a
spec that matches nothing) raise GrammarError naming the field and the problem. Thread-safe: the engine core
compiles on a worker thread (llguidance drops the GIL while it compiles) and the front end validates here.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import llguidance
import numpy as np

from omnistream.engine.checkpoint.tokenizer import Tokenizer
from omnistream.scheduler.structured_outputs import StructuredOutputsParams

CACHE_SIZE = 256  # distinct compiled specs kept
# The kinds of spec whose grammars name no special token and no token range, so that their masks agree with
# llguidance's per-token checks outside forced bytes (masks.first_allowed); a Lark grammar may name either.
CHECKABLE_KINDS = ("json", "regex", "choice")
# JSON is written the way json.dumps writes it (", " and ": ", no other whitespace): a model cannot pad a
# document with endless whitespace, so a complete value always comes within reach of max_tokens.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# llguidance's slices: sets of tokens whose mask bits it ORs in at once where the lexer allows every token of
# the set, instead of walking their trie. Its default for string contents is 1-10, 1-30 or any number of
# characters, so a bounded string (`maxLength`) with fewer than 10 characters left walks most of the
# vocabulary; finer lengths take most of those tokens at once (benchmarks/structured_output.py, README).
# Each slice reads every token once when the tokenizer is built: these add about 0.1 s of CPU to the 1 s
# it takes with llguidance's default slices and this vocabulary.
_STRING_CHAR = r'[^"\\\x00-\x1F\x7F]'
STRING_SLICES = (
    [r"[\x20\x0A\x0D\x09]+"]
    + [f"{_STRING_CHAR}{{1,{n}}}" for n in (1, 2, 3, 4, 6, 8, 10, 16, 30)]
    + [f"{_STRING_CHAR}+"]
)


class GrammarError(ValueError):
    """A structured-output spec that cannot be compiled; the message names the field and the problem."""


class GrammarCompiler:
    """Compiles specs against one tokenizer's vocabulary (padded to the model's `vocab_size` rows)."""

    def __init__(
        self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int], cache_size: int = CACHE_SIZE
    ) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos_token_ids = list(eos_token_ids)
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], list[llguidance.LLMatcher]] = OrderedDict()  # templates
        self._lock = threading.Lock()
        self._llg_tokenizer: llguidance.LLTokenizer | None = None
        self._special: np.ndarray | None = None

    @property
    def llg_tokenizer(self) -> llguidance.LLTokenizer:
        """The vocabulary as llguidance indexes it; built on first use (about a second), then kept."""
        with self._lock:
            if self._llg_tokenizer is None:
                self._llg_tokenizer = llguidance.LLTokenizer(
                    self._tokenizer.to_json(),
                    n_vocab=self.vocab_size,
                    eos_token=self._eos_token_ids,
                    slices=STRING_SLICES,
                )
            return self._llg_tokenizer

    @property
    def special_tokens(self) -> np.ndarray:
        """bool [vocab_size]: the tokens llguidance treats as special (end of sequence, control tokens, the
        vocabulary's padding), whose masks per-token checks do not predict; computed once (some 30 ms)."""
        tokenizer = self.llg_tokenizer
        with self._lock:
            if self._special is None:
                special = np.array([tokenizer.is_special_token(t) for t in range(tokenizer.vocab_size)], dtype=bool)
                special = np.pad(special, (0, max(0, self.vocab_size - len(special))), constant_values=True)
                special[[t for t in self._eos_token_ids if t < len(special)]] = True
                self._special = special
            return self._special

    @staticmethod
    def checks_tokens(spec: StructuredOutputsParams) -> bool:
        """Whether per-token checks may stand for `spec`'s masks where masks.first_allowed trusts them."""
        return spec.key[0] in CHECKABLE_KINDS

    def cached(self, spec: StructuredOutputsParams) -> llguidance.LLMatcher | None:
        """A fresh matcher for `spec` if it is compiled already, else None."""
        template = self.template(spec)
        return None if template is None else template.deep_copy()

    def template(self, spec: StructuredOutputsParams, lineage: int = 0) -> llguidance.LLMatcher | None:
        """The compiled template `lineage` of `spec` (never to be advanced: deep-copy it), None if not built."""
        with self._lock:
            templates = self._cache.get(spec.key)
            if templates is None:
                return None
            self._cache.move_to_end(spec.key)
            return templates[lineage] if lineage < len(templates) else None

    def compile(self, spec: StructuredOutputsParams) -> llguidance.LLMatcher:
        """A fresh matcher for `spec`, compiled now unless cached; GrammarError if it cannot be."""
        matcher = self.cached(spec)
        if matcher is not None:
            return matcher
        template = self._build(spec)
        with self._lock:
            self._cache.setdefault(spec.key, [template])
            self._cache.move_to_end(spec.key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return template.deep_copy()

    def add_lineages(self, spec: StructuredOutputsParams, count: int) -> None:
        """Compile more templates of the cached `spec` until it has `count` (nothing if it is not cached)."""
        while (templates := self._templates(spec)) is not None and len(templates) < count:
            template = self._build(spec)
            with self._lock:
                if self._cache.get(spec.key) is templates and len(templates) < count:
                    templates.append(template)

    def _templates(self, spec: StructuredOutputsParams) -> list[llguidance.LLMatcher] | None:
        with self._lock:
            return self._cache.get(spec.key)

    def _build(self, spec: StructuredOutputsParams) -> llguidance.LLMatcher:
        kind, text = spec.key
        field = "json_object" if spec.json_object else kind
        try:
            grammar = _grammar_text(kind, text)
        except ValueError as exc:
            raise GrammarError(f"structured_outputs.{field}: {exc}") from None
        matcher = llguidance.LLMatcher(self.llg_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"structured_outputs.{field}: {matcher.get_error()}")
        matcher.compute_bitmask()  # a grammar whose language is empty fails at its first mask
        if matcher.is_error():
            raise GrammarError(f"structured_outputs.{field}: it matches no text at all (unsatisfiable)")
        return matcher


def _grammar_text(kind: str, text: str) -> str:
    """The llguidance grammar for one kind of spec; ValueError for text that is not what the kind needs."""
    if kind == "json":
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the schema is not valid JSON ({exc})") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError("a JSON schema is an object (or true/false)")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(text)
    if kind == "choice":
        return llguidance.grammar_from("choice", text)
    return llguidance.grammar_from("grammar", text)
