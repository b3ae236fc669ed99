"""The code predictor's block replayed from recorded graphs (CUDA graphs on a GPU): one frame of every voice per
replay, one graph per bucket of voices (1, 2, 4, 8, ... up to max_num_voices, as the decode graphs).

A step's rows are copied into static inputs sized for the largest bucket; the padded rows compute a frame nobody
reads (each row owns its K/V buffer row, so they disturb no voice). Recording goes through cuda_graphs.py's
`GraphCapture`, so tests plug in a stand-in that reruns the block eagerly on the same buffers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from omnistream.engine.worker.code_predictor_block import BlockOutput, CodePredictorBlock
from omnistream.engine.worker.cuda_graphs import GraphCapture, StepGraph, bucket_for, capture_sizes
from omnistream.engine.worker.speech_sampler import SpeechDraws

logger = logging.getLogger(__name__)


def code_predictor_graphs_off_reason(device: torch.device, enforce_eager: bool) -> str | None:
    """Why the code predictor runs its block eagerly, or None when it replays graphs."""
    if enforce_eager:
        return "enforce_eager is set"
    if device.type != "cuda":
        return f"graphs run on CUDA only, the speech lane is on {device.type}"
    return None


class CodePredictorGraphs:
    """One recorded block per bucket over static inputs; called like the block."""

    def __init__(self, block: CodePredictorBlock, capture: GraphCapture) -> None:
        self.block, self.capture = block, capture
        self.sizes = capture_sizes(block.max_batch)
        n, hidden = block.max_batch, block.heads.shape[-1]
        weight = block.heads
        self.hidden = weight.new_zeros(n, hidden)
        self.c0_embeds = weight.new_zeros(n, hidden)
        self.seeds = torch.zeros(n, dtype=torch.long, device=weight.device)
        self.frames = torch.zeros(n, dtype=torch.long, device=weight.device)
        self.do_sample = torch.zeros(n, dtype=torch.bool, device=weight.device)
        self.graphs: dict[int, StepGraph] = {}
        self.outputs: dict[int, BlockOutput] = {}

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Warm up, then record every bucket, largest first (the smaller graphs reuse its memory pool)."""
        start = time.perf_counter()
        for size in reversed(self.sizes):
            step = self._step(size)
            step()
            self.graphs[size] = self.capture(step)
        logger.info(
            "CUDA graphs: captured the code predictor for %d voice buckets %s in %.1f s",
            len(self.sizes),
            self.sizes,
            time.perf_counter() - start,
        )

    def _step(self, size: int) -> Callable[[], None]:
        draws = SpeechDraws(self.seeds[:size], self.frames[:size], self.do_sample[:size])

        def step() -> None:
            self.outputs[size] = self.block(self.hidden[:size], self.c0_embeds[:size], draws)

        return step

    @torch.inference_mode()
    def __call__(
        self, hidden: torch.Tensor, c0_embeds: torch.Tensor, draws: SpeechDraws, any_greedy: bool = True
    ) -> BlockOutput:
        """The block's output for these rows (views of the static outputs: read them before the next call); the
        graphs always hold the greedy rows' argmax, whatever `any_greedy` says."""
        batch = hidden.shape[0]
        size = bucket_for(batch, self.sizes)
        self.hidden[:batch].copy_(hidden)
        self.c0_embeds[:batch].copy_(c0_embeds)
        self.seeds[:batch].copy_(draws.seeds)
        self.frames[:batch].copy_(draws.frames)
        self.do_sample[:batch].copy_(draws.do_sample)
        self.graphs[size].replay()
        codes, residual = self.outputs[size]
        return BlockOutput(codes[:batch], residual[:batch])
