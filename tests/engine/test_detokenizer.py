"""Incremental detokenization: deltas add up to decode(), partial characters wait, stop strings are cut."""

import random

import pytest

from omnistream.engine.checkpoint.default_model import default_model_path
from omnistream.engine.checkpoint.tokenizer import Tokenizer
from omnistream.engine.frontend.detokenizer import IncrementalDetokenizer

PROMPT = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
TEXT = "Sure! 你好世界 🤖👍🏽🇯🇵 naïve café — `x = {1: 'ß'}`\n<|im_end|>"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMNISTREAM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        return Tokenizer(default_model_path())


def stream(detok, ids, chunk=1):
    deltas = [detok.update(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    return deltas + [detok.flush()]


def byte_ids(tok, text):
    """One token per UTF-8 byte (the byte-level alphabet), so every multibyte character spans tokens."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    unprintable = sorted(set(range(256)) - set(printable))
    symbols = [chr(b) if b in printable else chr(256 + unprintable.index(b)) for b in text.encode()]
    return [tok.token_to_id(symbol) for symbol in symbols]


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("chunk", [1, 3])
def test_real_text_deltas_concatenate_to_decode(tok, skip, chunk):
    ids = tok.encode(TEXT)
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)  # some characters do span tokens
    detok = IncrementalDetokenizer(tok, tok.encode(PROMPT), skip_special_tokens=skip)
    deltas = stream(detok, ids, chunk)
    assert "".join(deltas) == detok.output_text == tok.decode(ids, skip_special_tokens=skip)
    assert detok.stop_string_matched is None


def test_split_multibyte_characters_never_emit_replacement(tok):
    text = "a🤖b你c👍🏽"
    ids = byte_ids(tok, text)
    assert tok.decode(ids) == text
    detok = IncrementalDetokenizer(tok, tok.encode(PROMPT))
    deltas = [detok.update([i]) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[:5] == ["a", "", "", "", "🤖"]
    assert "".join(deltas) + detok.flush() == text


@pytest.mark.parametrize("seed", range(5))
def test_random_tokens(tok, seed):
    rng = random.Random(seed)
    ids = [rng.randrange(len(tok)) for _ in range(200)] + byte_ids(tok, "🤖")[:1]  # ends mid-character
    prompt = [rng.randrange(len(tok)) for _ in range(20)]
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
        assert "".join(stream(detok, ids, rng.randint(1, 4))) == tok.decode(ids, skip_special_tokens=skip)


def test_prompt_ending_mid_character(tok):
    robot = byte_ids(tok, "🤖")
    detok = IncrementalDetokenizer(tok, tok.encode(PROMPT) + robot[:2])
    ids = robot[2:] + tok.encode(" ok")
    assert "".join(stream(detok, ids)) == tok.decode(ids)


def test_stop_string_across_tokens(tok):
    ids = byte_ids(tok, "Hello STOP here")
    detok = IncrementalDetokenizer(tok, [], stop=["xyz", "STOP"])
    deltas = [detok.update([i]) for i in ids]
    assert "".join(deltas) + detok.flush() == "Hello " == detok.output_text
    assert detok.stop_string_matched == "STOP"
    assert all(d == "" for d in deltas[10:])  # nothing after the match


def test_stop_string_held_back_until_ruled_out(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["STOP"])
    assert detok.update(tok.encode("ab ST")) == "ab"  # the last len("STOP") - 1 chars wait
    assert detok.update(tok.encode("ay")) == " S"
    assert detok.flush() == "Tay"
    assert detok.stop_string_matched is None and detok.output_text == "ab STay"


def test_include_stop_str_in_output(tok):
    ids = tok.encode("one two</answer> three")
    detok = IncrementalDetokenizer(tok, [], stop=["</answer>"], include_stop_str_in_output=True)
    deltas = stream(detok, ids)
    assert "".join(deltas) == detok.output_text == "one two</answer>"
    assert detok.stop_string_matched == "</answer>"


def test_earliest_stop_wins_and_special_tokens(tok):
    ids = tok.encode("abc<|im_end|>def")
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=False, stop=["def", "<|im_end|>"])
    assert "".join(stream(detok, ids, chunk=len(ids))) == "abc"
    assert detok.stop_string_matched == "<|im_end|>"
