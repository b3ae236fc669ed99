"""EngineCore: the loop of schedule -> execute -> update around one executor (a model runner, or TP ranks).

The order of one step lives in steps.py: synchronous, or overlapped with the device (async_scheduling).
"""

from __future__ import annotations

import logging
import time

import torch

from omnistream.engine.checkpoint.default_model import default_model_path
from omnistream.engine.checkpoint.tokenizer import Tokenizer
from omnistream.engine.core.request import EngineCoreRequest
from omnistream.engine.core.speech_lane import speech_lane_config
from omnistream.engine.core.steps import make_steps
from omnistream.engine.core.structured_output.compiler import GrammarCompiler
from omnistream.engine.core.structured_output.manager import StructuredOutputManager
from omnistream.engine.engine_config import EngineConfig
from omnistream.engine.worker.executor import make_executor
from omnistream.scheduler.outputs import EngineCoreOutput
from omnistream.scheduler.request import Request, RequestStatus
from omnistream.scheduler.sampling_params import SamplingParams
from omnistream.scheduler.scheduler import Scheduler, SchedulerConfig

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.cpu_threads is not None:
            torch.set_num_threads(config.cpu_threads)
        self.model_path = str(config.model or default_model_path())
        self.tokenizer = Tokenizer(self.model_path)
        self.eos_token_ids = list(self.tokenizer.eos_token_ids)
        self.executor = make_executor(config, self.model_path, self.eos_token_ids)
        try:
            self._finish_init(config)
        except BaseException:
            self.executor.shutdown()
            raise

    def _finish_init(self, config: EngineConfig) -> None:
        self.model, self.model_config = self.executor.model, self.executor.model_config  # rank 0's shard
        dtype, device, num_blocks = self.executor.dtype, self.executor.device, self.executor.num_kv_blocks
        capacity = num_blocks * config.block_size
        model_max = self.model_config.text.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > model_max:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's limit of {model_max}")
        if config.max_model_len is not None and config.max_model_len > capacity:
            raise ValueError(
                f"max_model_len {config.max_model_len} needs more KV cache than the {num_blocks} blocks "
                f"({capacity} tokens) available; raise kv_cache_memory/num_kv_blocks or lower max_model_len"
            )
        self.max_model_len = config.max_model_len or min(model_max, capacity)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                block_size=config.block_size,
                num_kv_blocks=num_blocks,
                enable_prefix_caching=config.enable_prefix_caching,
                speech=speech_lane_config(self.executor.speech_config, config),
            )
        )
        vocab_size = self.model_config.text.vocab_size
        compiler = GrammarCompiler(self.tokenizer, vocab_size, self.eos_token_ids)
        self.structured_output = StructuredOutputManager(compiler, device.type)
        self.steps = make_steps(config.overlaps_steps(), self.scheduler, self.executor, self.structured_output)
        logger.info(
            "engine ready: model=%s dtype=%s device=%s tp=%d kv_blocks=%d (%d tokens) max_model_len=%d%s",
            self.model_path, dtype, device, config.tensor_parallel_size, num_blocks, capacity, self.max_model_len,
            " async_scheduling" if config.overlaps_steps() else "",
        )

    def shutdown(self) -> None:
        """Stop the executor (and its worker processes); safe to call twice."""
        if hasattr(self, "structured_output"):
            self.structured_output.shutdown()
        self.executor.shutdown()

    def add_request(self, request: EngineCoreRequest) -> None:
        self._add(
            Request(
                request_id=request.request_id,
                prompt_token_ids=request.prompt_token_ids,
                sampling_params=request.sampling_params,
                eos_token_ids=self.eos_token_ids,
                arrival_time=request.arrival_time,
                priority=request.priority,
                mm_features=request.mm_features,
                position_segments=request.position_segments,
            )
        )

    def _add(self, request: Request) -> None:
        self.scheduler.add_request(request)
        self.structured_output.attach(request, request.sampling_params.structured_outputs)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)
        for req_id in request_ids:
            self.structured_output.forget(req_id)

    def finish_stopped(self, request_ids: list[str]) -> None:
        """Requests that the front end found a stop string in."""
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_STOPPED)

    def has_unfinished_requests(self) -> bool:
        """Requests not finished, or a launched step not settled yet (its results may only be dropped)."""
        return self.scheduler.has_unfinished_requests() or self.steps.in_flight

    def has_work(self) -> bool:
        """Something to compute or report (open sessions between turns do not count)."""
        scheduler = self.scheduler
        if self.steps.in_flight or scheduler.finished_req_ids or scheduler.speech.has_work:
            return True
        return any(r.has_work for r in scheduler.requests.values())

    # ---- live sessions (open-input requests) ---------------------------------------------------

    def open_session(self, session_id: str, prompt_token_ids: list[int], position_segments: list) -> None:
        self.scheduler.add_request(
            Request(
                request_id=session_id,
                prompt_token_ids=prompt_token_ids,
                sampling_params=SamplingParams(max_tokens=1),
                eos_token_ids=self.eos_token_ids,
                arrival_time=time.monotonic(),
                position_segments=position_segments,
                open_input=True,
            )
        )

    def append_input(self, session_id: str, token_ids: list[int], mm_features: list, position_segments: list) -> None:
        self.scheduler.append_input(session_id, token_ids, mm_features, position_segments)

    def commit_turn(
        self, session_id: str, token_ids: list[int], sampling_params: SamplingParams, position_segments: list
    ) -> None:
        self.scheduler.commit_turn(session_id, token_ids, sampling_params, position_segments)
        self.structured_output.attach(self.scheduler.requests[session_id], sampling_params.structured_outputs)

    def rollback_input(self, session_id: str, num_tokens: int) -> None:
        """Drop an open session's input after its first num_tokens tokens (discarded before its commit)."""
        self.scheduler.rollback_input(session_id, num_tokens)

    def cancel_turn(self, session_id: str) -> bool:
        return self.scheduler.cancel_turn(session_id)

    def session_tail(self, session_id: str) -> tuple[int, int | None]:
        """(number of tokens, last token id) of an open session."""
        request = self.scheduler.get_request(session_id)
        if request is None:
            raise ValueError(f"no open session {session_id!r}")
        return request.num_tokens, (request.last_token_id if request.num_tokens else None)

    def step(self) -> list[EngineCoreOutput]:
        return self.steps.step()
