"""The speech lane's runner: the talker's paged KV pool, one talker forward per step over every scheduled
request's rows, codebook 0 and the code predictor's 15 codebooks sampled per request, and a stateful
streaming code2wav per voice, run for all voices at once.

Rows are built on the device from ids alone (text-only user turns): user and header rows from the thinker's
embedding table through text_projection, decode rows from the fed-back frame's code embeddings plus a text row.
Per-request state here (the code2wav stream, the c0 seen so far) lives until the scheduler ends its speech, so a
talker preemption (recomputed rows) leaves the audio stream untouched; the thinker rows kept for a request
(talker_rows.py, projected to the talker's width) live until the scheduler releases it or a live session rolls
back past them (a session keeps them from turn to turn: every spoken turn's prompt holds every user turn).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from omnistream.engine.model_executor.attention.backend import AttentionMetadata
from omnistream.engine.model_executor.models.code2wav_voices import Code2WavVoices
from omnistream.engine.model_executor.models.talker_prompt import assistant_rows, tts_rows, tts_token_ids
from omnistream.engine.model_executor.speech_loader import SpeechModels
from omnistream.engine.worker.code_predictor_block import CodePredictorBlock
from omnistream.engine.worker.code_predictor_graphs import CodePredictorGraphs, code_predictor_graphs_off_reason
from omnistream.engine.worker.cuda_graphs import CudaGraphCapture
from omnistream.engine.worker.kv_memory import zeroed_kv_cache
from omnistream.engine.worker.speech_sampler import SpeechDraws, sample_c0
from omnistream.engine.worker.talker_positions import talker_prompt_positions
from omnistream.engine.worker.talker_rows import TalkerRows
from omnistream.scheduler.media_layout import AUDIO
from omnistream.scheduler.speech_outputs import SpeechFrame, SpeechSchedule, TalkerPrompt, TalkerStep


def to_pcm16(samples: torch.Tensor) -> bytes:
    """float samples in [-1, 1] -> PCM16 little-endian bytes: round(clamp(x, -1, 1) * 32767)."""
    ints = (samples.float().clamp(-1.0, 1.0) * 32767.0).round().to(torch.int16)
    return ints.cpu().numpy().astype("<i2").tobytes()


class SpeechRunner:
    def __init__(
        self,
        models: SpeechModels,
        embed_tokens: torch.nn.Module,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        *,
        max_num_voices: int,  # voices decoded at once: the code2wav pool and the code predictor's buffers
        enforce_eager: bool,  # no CUDA graphs of the code predictor
    ) -> None:
        self.config, self.talker, self.code2wav = models.config, models.talker, models.code2wav
        self.embed_tokens = embed_tokens  # the thinker's token embedding, whole (thinker ids -> rows)
        self.block_size = block_size
        self.device = device
        self.dtype = self.talker.codec_head.weight.dtype
        shape = self.talker.kv_cache_shape_per_layer(num_blocks, block_size)
        self.kv_caches = [zeroed_kv_cache(shape, self.dtype, device) for _ in range(self.talker.num_layers)]
        self.streams = Code2WavVoices(self.code2wav, max_num_voices)
        self.streams.warm_up()
        self.code_predictor = self._code_predictor(max_num_voices, enforce_eager)
        # [vocab] bool per request: the c0 it has sampled (repetition penalty)
        self.seen: dict[str, torch.Tensor] = {}
        # speaking requests' and sessions' user-turn media: hidden_projection of the thinker's rows there
        self.kept = TalkerRows()
        # requests whose user turns hold images or video: the talker prompt's M-RoPE positions [3, P], decode delta
        self.prompt_positions: dict[str, tuple[torch.Tensor, float]] = {}
        with torch.inference_mode():
            self.tts = tts_rows(self.talker, self._embed(tts_token_ids(self.config)))

    def _code_predictor(self, max_num_voices: int, enforce_eager: bool) -> CodePredictorBlock | CodePredictorGraphs:
        """The block for every voice's 15 codebooks, replayed from CUDA graphs unless they are off."""
        block = CodePredictorBlock(self.talker.code_predictor, max_num_voices)
        if code_predictor_graphs_off_reason(self.device, enforce_eager) is not None:
            return block
        graphs = CodePredictorGraphs(block, CudaGraphCapture())
        graphs.capture_all()
        return graphs

    def _embed(self, ids: list[int]) -> torch.Tensor:
        """Thinker embeddings of ids, in the talker's dtype."""
        table_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        return self.embed_tokens(table_ids).to(self.dtype)

    @torch.inference_mode()
    def execute(self, schedule: SpeechSchedule) -> list[SpeechFrame]:
        """One talker step per scheduled request."""
        for req_id in schedule.finished_req_ids:
            self.streams.drop(req_id)
            for state in (self.seen, self.prompt_positions):
                state.pop(req_id, None)
        for req_id in schedule.released_req_ids:
            self.kept.release(req_id)
        for req_id, num_tokens in schedule.rolled_back.items():
            self.kept.roll_back(req_id, num_tokens)
        for req_id, positions in schedule.capture.items():
            self.kept.want(req_id, positions)
        steps = schedule.steps
        if not steps:
            return []
        rows, positions = self._rows(steps)
        counts = [step.num_rows for step in steps]
        ends = [step.num_computed + n for step, n in zip(steps, counts)]
        width = max(len(step.block_ids) for step in steps)
        table = [step.block_ids + [0] * (width - len(step.block_ids)) for step in steps]
        metadata = AttentionMetadata.build(counts, ends, table, self.block_size, self.device)
        hidden = self.talker(rows, positions, self.kv_caches, metadata)
        last = hidden[torch.as_tensor(np.cumsum(counts) - 1, device=self.device)]
        draws = SpeechDraws(
            seeds=torch.tensor([step.seed for step in steps], dtype=torch.long, device=self.device),
            frames=torch.tensor([step.frame_index for step in steps], dtype=torch.long, device=self.device),
            do_sample=torch.tensor([step.do_sample for step in steps], dtype=torch.bool, device=self.device),
        )
        vocab = self.talker.config.text.vocab_size
        for step in steps:
            if step.req_id not in self.seen:
                self.seen[step.req_id] = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        seen = torch.stack([self.seen[step.req_id] for step in steps])
        eos = self.config.talker.codec_eos_token_id
        c0 = sample_c0(self.talker.compute_logits(last), seen, draws, eos)
        any_greedy = not all(step.do_sample for step in steps)
        prediction = self.code_predictor(last, self.talker.embed_codec(c0), draws, any_greedy)
        codes = torch.cat((c0.unsqueeze(1), prediction.codes), dim=1)  # [B, G]
        host_codes = codes.tolist()
        speaking = [i for i, frame in enumerate(host_codes) if frame[0] != eos]
        pcm: dict[int, bytes] = {}
        if speaking:
            for i in speaking:
                self.seen[steps[i].req_id][host_codes[i][0]] = True
            voices = self.streams.push([steps[i].req_id for i in speaking], codes[speaking].unsqueeze(2))
            data = to_pcm16(voices.samples)  # every voice's samples converted at once
            pcm = {i: data[2 * start : 2 * stop] for i, (start, stop) in zip(speaking, voices.spans)}
        return [
            SpeechFrame(req_id=step.req_id, codes=host_codes[i] if i in pcm else [], pcm=pcm.get(i, b""))
            for i, step in enumerate(steps)
        ]

    def _rows(self, steps: list[TalkerStep]) -> tuple[torch.Tensor, torch.Tensor]:
        """The flat input rows [T, H] of the steps, in order, and their positions [3, T] (text-only prompts:
        the talker's own row index on all three axes)."""
        frames = [codes for step in steps for codes in step.frames]
        frame_rows = None
        if frames:
            codes = torch.tensor(frames, dtype=torch.long, device=self.device)  # [F, G]
            text_ids = [text_id for step in steps for text_id in step.text_ids]
            frame_rows = self.talker.embed_codec(codes[:, 0]) + self._residual(codes[:, 1:])
            frame_rows = frame_rows + self.talker.text_projection(self._embed(text_ids))
        pieces, taken = [], 0
        for step in steps:
            if step.prompt is not None:
                prompt = step.prompt
                pieces.append(self._user_rows(step.req_id, prompt))
                pieces.append(
                    assistant_rows(
                        self.talker, self.config, self._embed(prompt.header_ids), self.tts, prompt.speaker
                    )
                )
            if step.frames:
                pieces.append(frame_rows[taken : taken + len(step.frames)])
                taken += len(step.frames)
        return torch.cat(pieces), torch.cat([self._positions(step) for step in steps], dim=1)

    def _positions(self, step: TalkerStep) -> torch.Tensor:
        """M-RoPE positions [3, n] of a step's rows: the row index on all three axes for text and audio
        prompts; the prompt's own positions, then index + delta, where user turns hold images or video."""
        rows = np.arange(step.num_computed, step.num_computed + step.num_rows)
        prompt = step.prompt
        if prompt is not None and any(piece.layout.kind != AUDIO for piece in prompt.media):
            self.prompt_positions[step.req_id] = talker_prompt_positions(
                self.config, len(prompt.user_ids), prompt.media
            )
        explicit = self.prompt_positions.get(step.req_id)
        if explicit is None:
            return torch.from_numpy(rows).to(self.device).expand(3, -1)
        prompt, delta = explicit
        after = torch.from_numpy(rows[rows >= prompt.shape[1]] + delta).float().expand(3, -1)
        return torch.cat((prompt[:, rows[rows < prompt.shape[1]]], after), dim=1).to(self.device)

    def _user_rows(self, req_id: str, prompt: TalkerPrompt) -> torch.Tensor:
        """text_projection of the thinker's embeddings; at media the kept hidden_projection of its rows."""
        rows = self.talker.text_projection(self._embed(prompt.user_ids))
        if prompt.media_rows:
            index = torch.tensor(prompt.media_rows, dtype=torch.long, device=self.device)
            rows[index] = self.kept.gather(req_id, prompt.media_positions)
        return rows

    @property
    def wants_thinker_rows(self) -> bool:
        return bool(self.kept.wanted)

    @contextmanager
    def capturing(
        self, thinker: torch.nn.Module, req_ids: list[str], ends: list[int], counts: list[int]
    ) -> Iterator[None]:
        """Around one thinker forward over the flat batch (req_ids with `counts` rows ending at positions
        `ends`): keep hidden_projection of HF's hidden_states[accept_hidden_layer] at the wanted positions, on
        the device: the output of layer accept_hidden_layer - 1 (final-normed when it is the last)."""
        flat, owners, offset = [], {}, 0
        for req_id, end, count in zip(req_ids, ends, counts):
            wanted = self.kept.wanted.get(req_id, ())
            for position in range(end - count, end):
                if position in wanted:
                    owners.setdefault(req_id, []).append((len(flat), position))
                    flat.append(offset + position - (end - count))
            offset += count
        if not flat:
            yield
            return
        index = torch.tensor(flat, dtype=torch.long, device=self.device)
        kept: list[torch.Tensor] = []
        level, layers = self.config.talker.accept_hidden_layer, thinker.model.layers
        if level == len(layers):  # HF's last hidden state is the final-normed one
            handle = thinker.model.norm.register_forward_hook(
                lambda module, args, output: kept.append(output.index_select(0, index))
            )
        else:  # HF records layer level-1's output, before any DeepStack rows are added to it
            handle = layers[level - 1].register_forward_hook(
                lambda module, args, output: kept.append(output.index_select(0, index))
            )
        try:
            yield
        finally:
            handle.remove()
        projected = self.talker.hidden_projection(kept[0].to(self.dtype))
        for req_id, rows in owners.items():
            index = torch.tensor([i for i, _ in rows], dtype=torch.long, device=self.device)
            self.kept.add(req_id, [position for _, position in rows], projected.index_select(0, index))

    def _residual(self, codes: torch.Tensor) -> torch.Tensor:
        """Σ_g E_cp[g](codes[:, g]) [F, H], summed in the code predictor's order."""
        tables = self.talker.code_predictor.model.codec_embedding
        residual = torch.zeros(
            codes.shape[0], self.talker.config.text.hidden_size, dtype=self.dtype, device=self.device
        )
        for g, table in enumerate(tables):
            residual = residual + table(codes[:, g])
        return residual
