"""EngineCore: the loop of schedule -> execute -> update around one model runner."""

from __future__ import annotations

import logging
import math

import torch

from omnistream.engine.default_model import default_model_path
from omnistream.engine.engine_config import EngineConfig
from omnistream.engine.loader import load_model
from omnistream.engine.messages import EngineCoreRequest
from omnistream.engine.model_runner import ModelRunner
from omnistream.engine.tokenizer import Tokenizer
from omnistream.scheduler.outputs import EngineCoreOutput
from omnistream.scheduler.request import Request, RequestStatus
from omnistream.scheduler.scheduler import Scheduler, SchedulerConfig

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_path = str(config.model or default_model_path())
        device = config.torch_device()
        self.model, self.model_config = load_model(
            self.model_path, None if config.dtype == "auto" else config.dtype, device
        )
        dtype = next(self.model.parameters()).dtype
        self.tokenizer = Tokenizer(self.model_path)
        self.eos_token_ids = list(self.tokenizer.eos_token_ids)
        num_blocks = self._num_kv_blocks(dtype, device)
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
            )
        )
        self.runner = ModelRunner(
            self.model,
            num_kv_blocks=num_blocks,
            block_size=config.block_size,
            dtype=dtype,
            device=device,
            eos_token_ids=self.eos_token_ids,
            seed=config.seed,
        )
        logger.info(
            "engine ready: model=%s dtype=%s device=%s kv_blocks=%d (%d tokens) max_model_len=%d",
            self.model_path, dtype, device, num_blocks, capacity, self.max_model_len,
        )

    def _num_kv_blocks(self, dtype: torch.dtype, device: torch.device) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        per_block = math.prod(self.model.kv_cache_shape_per_layer(1, self.config.block_size)) * self.model.num_layers
        num_blocks = self.config.kv_cache_bytes(device) // (per_block * dtype.itemsize)
        if num_blocks < 1:
            raise ValueError("kv_cache_memory is too small for a single KV block")
        return int(num_blocks)

    def add_request(self, request: EngineCoreRequest) -> None:
        self.scheduler.add_request(
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

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def finish_stopped(self, request_ids: list[str]) -> None:
        """Requests that the front end found a stop string in."""
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_STOPPED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        scheduler_output = self.scheduler.schedule()
        model_output = self.runner.execute_model(scheduler_output)
        return self.scheduler.update_from_output(scheduler_output, model_output)
