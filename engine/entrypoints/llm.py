"""LLM: the offline, vLLM-shaped Python API (generate and chat) over an in-process engine core."""

from __future__ import annotations

import itertools
import time
import weakref
from collections.abc import Sequence
from typing import Any, Union

import msgspec
from tqdm.auto import tqdm

from omnistream.engine.checkpoint.tokenizer import Tokenizer
from omnistream.engine.core.engine_core import EngineCore
from omnistream.engine.core.request import EngineCoreRequest
from omnistream.engine.engine_config import EngineConfig
from omnistream.engine.frontend.output_processor import OutputProcessor
from omnistream.engine.frontend.outputs import RequestOutput
from omnistream.multimodal.chat_media import collect_media
from omnistream.multimodal.processor import InputProcessor, MediaLimits
from omnistream.scheduler.sampling_params import SamplingParams, check_token_ids, choice_seed

PromptType = Union[str, dict[str, Any]]
Message = dict[str, Any]


class LLM:
    """Offline inference. `LLM()` runs the embedded default model; pass a checkpoint directory for others."""

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        device: str | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        num_kv_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        seed: int = 0,
        limit_mm_per_prompt: dict[str, int] | None = None,
        tensor_parallel_size: int = 1,
        distributed_timeout_s: float = EngineConfig.distributed_timeout_s,
        cpu_threads: int | None = None,
        attention_backend: str = "auto",
        enforce_eager: bool = False,
        async_scheduling: bool | None = None,
        enable_speech: bool = True,
        max_num_voices: int = EngineConfig.max_num_voices,
        num_talker_kv_blocks: int | None = None,
        max_audio_frames: int = EngineConfig.max_audio_frames,
        speech_first_packet_frames: int = EngineConfig.speech_first_packet_frames,
    ) -> None:
        config = EngineConfig(
            model=model,
            dtype=dtype,
            device=device,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            block_size=block_size,
            enable_prefix_caching=enable_prefix_caching,
            num_kv_blocks=num_kv_blocks,
            kv_cache_memory=kv_cache_memory,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            distributed_timeout_s=distributed_timeout_s,
            cpu_threads=cpu_threads,
            attention_backend=attention_backend,
            enforce_eager=enforce_eager,
            async_scheduling=async_scheduling,
            enable_speech=enable_speech,
            max_num_voices=max_num_voices,
            num_talker_kv_blocks=num_talker_kv_blocks,
            max_audio_frames=max_audio_frames,
            speech_first_packet_frames=speech_first_packet_frames,
        )
        self.engine = EngineCore(config)
        self._finalizer = weakref.finalize(self, self.engine.shutdown)  # TP workers never outlive this object
        self.tokenizer: Tokenizer = self.engine.tokenizer
        self.output_processor = OutputProcessor(self.tokenizer)
        limits = MediaLimits() if limit_mm_per_prompt is None else MediaLimits(max_items=dict(limit_mm_per_prompt))
        self.input_processor = InputProcessor(self.tokenizer, self.engine.model_config, limits)
        self._ids = itertools.count()

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def shutdown(self) -> None:
        """Stop the engine and its tensor-parallel worker processes (also done at exit); safe to call twice."""
        self._finalizer()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Prompts are strings or dicts with "prompt" (text) or "prompt_token_ids", optionally with
        "multi_modal_data" ({"audio"|"image"|"video": item or list}) and "mm_processor_kwargs"
        (use_audio_in_video, fps, audio_window_s, ...). Outputs come in input order."""
        prompt_list = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params_list = self._params_per_prompt(sampling_params, len(prompt_list))
        request_ids: list[str] = []
        try:
            for prompt, params in zip(prompt_list, params_list):
                request_ids.append(self._add(prompt, params))
        except BaseException:  # any failure (not only MediaError) must not leave earlier prompts queued
            for request_id in request_ids:
                self.engine.abort_requests(self.output_processor.forget(request_id))
            raise
        return self._run(request_ids, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or several, rendered with the model's chat template.
        Content may be a string or OpenAI-style parts (text, image_url, input_audio, audio_url, video_url,
        image, audio, video); the media are taken from the parts in order."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            {
                "prompt": self.tokenizer.apply_chat_template(
                    conv, add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {})
                ),
                "multi_modal_data": collect_media(conv),
                "mm_processor_kwargs": mm_processor_kwargs,
            }
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    @staticmethod
    def _params_per_prompt(
        params: SamplingParams | Sequence[SamplingParams] | None, count: int
    ) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * count
        if isinstance(params, SamplingParams):
            return [params] * count
        if len(params) != count:
            raise ValueError(f"got {len(params)} sampling params for {count} prompts")
        return list(params)

    def _add(self, prompt: PromptType, params: SamplingParams) -> str:
        vocab_size = self.engine.model_config.text.vocab_size
        params.check_vocab(vocab_size)
        if params.structured_outputs is not None:  # a spec that does not compile is refused here (GrammarError)
            self.engine.structured_output.compiler.compile(params.structured_outputs)
        processed = self.input_processor.process_prompt(prompt)
        check_token_ids(processed.token_ids, vocab_size, "prompt_token_ids")
        request_id = str(next(self._ids))
        child_ids = self.output_processor.add_request(request_id, processed.prompt, processed.token_ids, params)
        now = time.monotonic()
        try:
            for index, child_id in enumerate(child_ids):
                child_params = params
                if params.n > 1:
                    child_params = msgspec.structs.replace(params, n=1, seed=choice_seed(params.seed, index))
                self.engine.add_request(EngineCoreRequest.from_processed(child_id, processed, child_params, now))
        except BaseException:
            self.engine.abort_requests(self.output_processor.forget(request_id))
            raise
        return request_id

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        prompt_tokens = output_tokens = 0
        start = time.perf_counter()
        try:
            while self.engine.has_unfinished_requests():
                outputs, stopped = self.output_processor.process_outputs(self.engine.step())
                if stopped:
                    self.engine.finish_stopped(stopped)
                for out in outputs:
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
                        prompt_tokens += len(out.prompt_token_ids)
                        output_tokens += sum(len(o.token_ids) for o in out.outputs)
                        elapsed = time.perf_counter() - start
                        bar.set_postfix_str(
                            f"est. speed input: {prompt_tokens / elapsed:.1f} toks/s, "
                            f"output: {output_tokens / elapsed:.1f} toks/s"
                        )
        except BaseException:
            for request_id in request_ids:
                if request_id not in finished:
                    self.engine.abort_requests(self.output_processor.forget(request_id))
            raise
        finally:
            bar.close()
        return [finished[r] for r in request_ids]
