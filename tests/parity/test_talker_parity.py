"""The talker and code predictor against HF transformers (fp32, tiny stack in the real schema, weights saved
by save_pretrained and read by our speech loader): talker logits for a prefill and teacher-forced decodes at
text and M-RoPE positions, code-predictor logits and codes for all 15 steps, and the talker's input rows (user
turns, the 9 assistant rows, the text rows that follow) as HF's `generate` builds them, all within 1e-4.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from omnistream.engine.model_executor.attention.backend import AttentionMetadata
from omnistream.engine.model_executor.loader import load_model
from omnistream.engine.model_executor.models.talker_prompt import (
    assistant_rows,
    speaker_id,
    tts_rows,
    tts_token_ids,
    user_rows,
    user_turn_positions,
)
from omnistream.engine.model_executor.speech_loader import load_speech_models
from tests.parity.speech_oracle import build_hf_omni, save_hf_omni

TOL = 1e-4
BLOCK = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    hf = build_hf_omni(seed=5)
    path = save_hf_omni(hf, tmp_path_factory.mktemp("omni"))
    thinker, _ = load_model(path)
    return hf, load_speech_models(path), thinker


class TalkerRunner:
    """One request's talker steps over contiguous blocks of a paged KV cache."""

    def __init__(self, talker, max_len: int = 64) -> None:
        self.talker, self.blocks = talker, -(-max_len // BLOCK)
        shape = talker.kv_cache_shape_per_layer(self.blocks, BLOCK)
        self.kv_caches = [torch.zeros(shape) for _ in range(talker.num_layers)]
        self.num_computed = 0

    @torch.no_grad()
    def step(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        count = rows.shape[0]
        self.num_computed += count
        metadata = AttentionMetadata.build([count], [self.num_computed], [list(range(self.blocks))], BLOCK)
        return self.talker.compute_logits(self.talker(rows, positions, self.kv_caches, metadata))


@pytest.mark.parametrize("mrope", [False, True])
@torch.no_grad()
def test_talker_logits_match_hf_for_a_prefill_and_teacher_forced_decodes(omni, mrope):
    hf, models, _ = omni
    generator = torch.Generator().manual_seed(11)
    hidden = models.config.talker.text.hidden_size
    rows = torch.randn(14, hidden, generator=generator)
    if mrope:  # distinct T/H/W rows, as at image positions
        positions = torch.stack([torch.arange(14), torch.arange(14) * 2 % 5, torch.arange(14) % 3 + 4])
    else:
        positions = torch.arange(14).expand(3, -1)
    prefill, decodes = 11, [11, 12, 13]
    cache = DynamicCache(config=hf.talker.config.text_config)
    out = hf.talker(
        inputs_embeds=rows[None, :prefill],
        position_ids=positions[:, None, :prefill],
        cache=cache,
        use_cache=True,
    )
    expected = [out.logits[0]]
    for i in decodes:
        out = hf.talker(
            inputs_embeds=rows[None, i : i + 1],
            position_ids=positions[:, None, i : i + 1],
            cache=cache,
            use_cache=True,
            generation_step=0,
        )  # HF counts steps for its own generate
        expected.append(out.logits[0])
    runner = TalkerRunner(models.talker)
    ours = [runner.step(rows[:prefill], positions[:, :prefill])]
    ours += [runner.step(rows[i : i + 1], positions[:, i : i + 1]) for i in decodes]
    for a, b in zip(ours, expected):
        assert (a - b).abs().max() <= TOL
    assert torch.cat(expected).std() > 0.5  # O(1) logits: the comparison is not between near-zeros


@torch.no_grad()
def test_code_predictor_logits_and_codes_match_hf_for_all_15_steps(omni):
    hf, models, _ = omni
    generator = torch.Generator().manual_seed(12)
    hidden = torch.randn(3, models.config.talker.text.hidden_size, generator=generator)
    c0 = torch.tensor([5, 2047, 900])
    c0_embeds = models.talker.embed_codec(c0)
    prediction = models.talker.code_predictor.predict(hidden, c0_embeds)
    assert prediction.codes.shape == (3, 15) and prediction.logits.shape == (3, 15, 2048)
    predictor = hf.talker.code_predictor
    for b in range(3):
        inputs = torch.stack((hidden[b], hf.talker.get_input_embeddings()(c0[b])))[None]
        result = predictor.generate(
            inputs_embeds=inputs,
            max_new_tokens=15,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        assert prediction.codes[b].tolist() == result.sequences[0].tolist()
        assert (prediction.logits[b] - torch.cat(result.logits)).abs().max() <= TOL
        embeds = sum(predictor.get_input_embeddings()[g](result.sequences[0, g]) for g in range(15))
        assert (prediction.residual_embeds[b] - embeds).abs().max() <= TOL
    assert len(set(prediction.codes.flatten().tolist())) > 15  # the steps do not all pick one id


def _embed(thinker, ids: list[int]) -> torch.Tensor:
    return thinker.embed_input_ids(torch.tensor(ids))


@torch.no_grad()
def test_user_rows_with_media_match_hf(omni):
    hf, models, thinker = omni
    ids = [151644, 872, 198, 151669, 151675, 151675, 151670, 3838, 151645, 198]
    mask = torch.tensor([t == 151675 for t in ids])
    hidden = torch.randn(len(ids), 128, generator=torch.Generator().manual_seed(13))
    embeds = _embed(thinker, ids)
    ours = user_rows(models.talker, embeds, mask, hidden[mask])
    expected = hf._get_talker_user_parts(0, len(ids), mask[None], hidden[None], embeds[None])[0]
    assert (ours - expected).abs().max() <= TOL
    with pytest.raises(ValueError, match="media positions"):
        user_rows(models.talker, embeds, mask, hidden[:1])


@torch.no_grad()
def test_the_talker_prompt_equals_what_hf_generate_gives_the_talker(omni, monkeypatch):
    """System turn, two user turns and an assistant turn; HF's thinker answers 3 greedy tokens (no EOS)."""
    hf, models, thinker = omni
    config = models.config
    prompt = (
        [151644, 8948, 198, 2610, 151645, 198, 151644, 872, 198, 9707, 11, 151645, 198]
        + [151644, 77091, 198, 13048, 151645, 198, 151644, 872, 198, 3838, 30, 151645, 198]
        + [151644, 77091, 198]
    )
    captured = {}

    def capture(**kwargs):
        captured.update(kwargs)
        raise StopIteration

    monkeypatch.setattr(hf.talker, "generate", capture)
    with pytest.raises(StopIteration):
        hf.generate(
            input_ids=torch.tensor([prompt]),
            speaker="Chelsie",
            thinker_max_new_tokens=3,
            thinker_do_sample=False,
            talker_do_sample=False,
        )
    reply = hf.thinker.generate(input_ids=torch.tensor([prompt]), max_new_tokens=3, do_sample=False)[
        0, len(prompt) :
    ]
    kept = user_turn_positions(prompt, config)
    assert [prompt[i] for i in kept] == prompt[6:13] + prompt[19:26]
    assert (
        captured["talker_input_ids"][0].tolist() == [prompt[i] for i in kept] + [config.tts_pad_token_id] * 9
    )

    user_ids = [prompt[i] for i in kept]
    tts = tts_rows(models.talker, _embed(thinker, tts_token_ids(config)))
    header = _embed(thinker, [151644, 77091, 198, int(reply[0])])
    rows = torch.cat(
        (
            user_rows(
                models.talker,
                _embed(thinker, user_ids),
                torch.zeros(len(user_ids), dtype=torch.bool),
                torch.zeros(0, 128),
            ),
            assistant_rows(models.talker, config, header, tts, speaker_id(config, "CHELSIE")),
        )
    )
    assert (rows - captured["inputs_embeds"][0]).abs().max() <= TOL
    trailing = torch.cat((models.talker.text_projection(_embed(thinker, [int(reply[1])])), tts.eos[None]))
    assert (trailing - captured["trailing_text_hidden"][0]).abs().max() <= TOL
    assert (tts.pad - captured["tts_pad_embed"].reshape(-1)).abs().max() <= TOL


def test_an_unknown_voice_names_the_checkpoints_voices(omni):
    with pytest.raises(ValueError, match=r"unknown voice 'alloy'.*\['aiden', 'chelsie', 'ethan'\]"):
        speaker_id(omni[1].config, "alloy")
