"""StructuredOutputsParams: what a request's output must match (plain data riding in SamplingParams).

Exactly one constraint per request: a JSON schema (as JSON text), any JSON object, a regular expression,
one of a list of strings, or a grammar (Lark, or GBNF/EBNF as llguidance converts it). The field names are
vLLM's (`structured_outputs` in its requests), so the same request bodies work here. The engine core
compiles the spec (engine/core/structured_output/); the scheduler only carries it.
"""

from __future__ import annotations

import msgspec

MAX_SPEC_BYTES = 256 * 1024  # a schema, regex, grammar or choice list larger than this is refused
MAX_CHOICES = 1024


class StructuredOutputsParams(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True):
    """One output constraint; validation (exactly one set, bounded size) runs in __post_init__."""

    json: str | None = None  # a JSON schema, serialised
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark, or GBNF / EBNF

    def __post_init__(self) -> None:
        kinds = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        kinds += ["json_object"] if self.json_object else []
        if len(kinds) != 1:
            found = ", ".join(kinds) or "none"
            raise ValueError(f"structured_outputs: set exactly one of json, json_object, regex, choice, grammar "
                             f"(got {found})")
        if self.choice is not None:
            if not self.choice or len(self.choice) > MAX_CHOICES:
                raise ValueError(f"structured_outputs.choice: give 1 to {MAX_CHOICES} strings, "
                                 f"got {len(self.choice)}")
            if not all(isinstance(c, str) for c in self.choice):
                raise ValueError("structured_outputs.choice: every choice must be a string")
        size = len(self.key[1].encode("utf-8"))
        if size > MAX_SPEC_BYTES:
            raise ValueError(f"structured_outputs.{kinds[0]}: {size} bytes is over the limit of {MAX_SPEC_BYTES}")

    @property
    def key(self) -> tuple[str, str]:
        """(kind, text): the kind of constraint and its text; equal keys compile to the same grammar."""
        if self.json is not None:
            return "json", self.json
        if self.json_object:
            return "json", '{"type": "object"}'
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", msgspec.json.encode(self.choice).decode()
        return "grammar", self.grammar or ""
