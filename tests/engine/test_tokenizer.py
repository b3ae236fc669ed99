"""The Tokenizer wrapper against transformers on the default model, and the Qwen3-Omni chat template."""

import json

import jinja2
import pytest

from omnistream.engine.checkpoint.default_model import default_model_path
from omnistream.engine.checkpoint.tokenizer import Tokenizer

OMNI_TOKENS = {
    "<|audio_start|>": 151669,
    "<|audio_end|>": 151670,
    "<tts_pad>": 151671,
    "<tts_text_bos>": 151672,
    "<tts_text_eod>": 151673,
    "<tts_text_bos_single>": 151674,
    "<|audio_pad|>": 151675,
}

TEXTS = [
    "Hello, world! How are you doing today?",
    "你好，世界。今天天气怎么样？",
    "emoji 🤖👍🏽 and a flag 🇯🇵 — done…",
    "def f(x):\n    return {'a': [x ** 2 for _ in range(3)]}\n\n\tprint(f(1))  # ok",
    "<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|>What is this?<|im_end|>\n<|im_start|>assistant\n",
    "<think>\nhmm\n</think>\n\n<tts_pad><tts_text_bos_single><|endoftext|>",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMNISTREAM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        return default_model_path()


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer(model_dir)


@pytest.fixture(scope="module")
def hf_tok(model_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_matches_transformers(tok, hf_tok, text):
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == hf_tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)
    assert tok.convert_ids_to_tokens(ids) == hf_tok.convert_ids_to_tokens(ids)


def test_special_ids(tok, hf_tok):
    for token, token_id in OMNI_TOKENS.items():
        assert tok.encode(token) == [token_id]
        assert tok.decode([token_id], skip_special_tokens=True) == ""
    assert tok.encode("<|im_start|><|im_end|><|image_pad|><|video_pad|>") == [151644, 151645, 151655, 151656]
    assert tok.vocab_size == len(tok) == len(hf_tok) == 151676
    assert tok.eos_token_ids == [151645, 151643]
    assert tok.pad_token_id == 151643


def test_chat_template_text(tok):
    messages = [{"role": "user", "content": "Hi!"}]
    assert tok.apply_chat_template(messages) == "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == "<|im_start|>user\nHi!<|im_end|>\n"


def test_chat_template_system_and_multi_turn(tok):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye."},
    ]
    assert tok.apply_chat_template(messages) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nBye.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_template_content_parts(tok, hf_tok):
    content = [
        {"type": "audio", "audio": "a.wav"},
        {"type": "text", "text": "What sound is this? "},
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
        {"type": "video", "video": "v.mp4"},
        {"type": "text", "text": "And this?"},
    ]
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": content}]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|>What sound is this? "
        "<|vision_start|><|image_pad|><|vision_end|><|audio_start|><|audio_pad|><|audio_end|>"
        "<|vision_start|><|video_pad|><|vision_end|>And this?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(messages) == expected
    assert tok.apply_chat_template(messages, tokenize=True) == tok.encode(expected)
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected


def test_chat_template_rejects_unknown_part(tok):
    with pytest.raises(jinja2.TemplateError, match="unsupported content part type: pdf"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "pdf"}]}])


def test_checkpoint_template_files_win(model_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (tmp_path / name).symlink_to(model_dir / name)
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "J{{ messages[0]['content'] }}"}))
    assert Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "Jx"
    (tmp_path / "chat_template.jinja").write_text("T{{ messages | length }}{{ eos_token }}")
    assert Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "T1<|im_end|>"


def test_fallbacks_without_generation_config(model_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).symlink_to(model_dir / name)
    tok = Tokenizer(tmp_path)
    assert tok.eos_token_ids == [151645] and tok.pad_token_id == 151643
    with pytest.raises(FileNotFoundError):
        Tokenizer(tmp_path / "missing")
