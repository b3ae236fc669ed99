"""The compiler's finer string slices (compiler.STRING_SLICES) change only how fast llguidance fills a mask, never
the mask: along random valid outputs of many specs (bounded, unbounded and patterned strings, numbers, enums,
nested objects, regexes, a Lark grammar), every mask equals the one llguidance computes with no slices at all
(each token walked through the grammar one by one)."""

import json

import llguidance
import llguidance.numpy
import numpy as np
import pytest

from omnistream.engine.checkpoint.default_model import default_model_path
from omnistream.engine.checkpoint.tokenizer import Tokenizer
from omnistream.engine.core.structured_output.compiler import STRING_SLICES, _grammar_text

VOCAB = 152064


def _object(**properties: dict) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


SPECS = [
    ("json", _object(notes={"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 3})),
    ("json", _object(a={"type": "string", "maxLength": 1}, b={"type": "string", "minLength": 2, "maxLength": 5})),
    ("json", _object(s={"type": "string", "minLength": 9, "maxLength": 40}, t={"type": "string"})),
    ("json", _object(p={"type": "string", "pattern": "^[a-z]{2,7}$"}, d={"type": "string", "format": "date"})),
    ("json", _object(n={"type": "number"}, i={"type": "integer", "minimum": -3, "maximum": 900})),
    ("json", _object(e={"enum": ["low", "high", "x y"]}, inner=_object(k={"type": "string", "maxLength": 12}))),
    ("json", {"type": "object"}),
    ("regex", r"[^\"\\]{0,17}\"(ab|c{2,4})"),
    ("regex", r"\w{3,11}( \d+)?"),
    ("grammar", 'start: "<" NAME ">" NAME?\nNAME: /[a-zA-Z ]{1,13}/'),
]


@pytest.fixture(scope="module")
def tokenizers() -> tuple[llguidance.LLTokenizer, llguidance.LLTokenizer]:
    tokenizer = Tokenizer(default_model_path())
    text = tokenizer.to_json()
    eos = tokenizer.eos_token_ids
    sliced = llguidance.LLTokenizer(text, n_vocab=VOCAB, eos_token=eos, slices=STRING_SLICES)
    plain = llguidance.LLTokenizer(text, n_vocab=VOCAB, eos_token=eos, slices=[])
    return sliced, plain


def _mask(matcher: llguidance.LLMatcher) -> np.ndarray:
    bitmask = llguidance.numpy.allocate_token_bitmask(1, VOCAB)
    llguidance.numpy.fill_next_token_bitmask(matcher, bitmask, 0)
    return bitmask[0]


@pytest.mark.parametrize("kind, spec", SPECS)
def test_sliced_masks_equal_the_plain_walk_along_random_outputs(tokenizers, kind, spec):
    sliced_tokenizer, plain_tokenizer = tokenizers
    grammar = _grammar_text(kind, json.dumps(spec) if kind == "json" else spec)
    lengths = np.array([len(plain_tokenizer.decode_bytes([t])) for t in range(VOCAB)])
    rng = np.random.default_rng(len(grammar))
    compared = 0
    for _ in range(4):  # outputs
        sliced = llguidance.LLMatcher(sliced_tokenizer, grammar, log_level=0)
        plain = llguidance.LLMatcher(plain_tokenizer, grammar, log_level=0)
        for _ in range(60):
            want = _mask(plain)
            assert np.array_equal(_mask(sliced), want), (kind, spec, compared)
            compared += 1
            allowed = np.flatnonzero(np.unpackbits(want.view(np.uint8), bitorder="little")[:VOCAB])
            short = allowed[lengths[allowed] <= 2]  # short tokens half the time: every count of characters left
            token = int(rng.choice(short if len(short) and rng.random() < 0.5 else allowed))
            assert sliced.consume_token(token) and plain.consume_token(token)
            if plain.is_stopped():
                break
    assert compared >= 8
