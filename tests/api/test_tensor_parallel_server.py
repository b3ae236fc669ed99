"""Through the HTTP server, TP=2 (two gloo processes) answers exactly as TP=1: greedy tokens identical and
logprobs within 1e-4 (fp32), for text and for audio + image chat prompts."""

from __future__ import annotations

from omnistream.engine.entrypoints.openai.app import DEFAULT_MODEL_NAME
from tests.api.server_fixture import (
    openai_client,
    png_data_url,
    running_server,
    wav_base64,
)

FP32_TOL = 1e-4
PROMPTS = [
    [{"role": "user", "content": "Tell me about tensor parallelism."}],
    [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": wav_base64(1.5), "format": "wav"}},
        {"type": "image_url", "image_url": {"url": png_data_url(64)}},
        {"type": "text", "text": "What do you hear and see?"},
    ]}],
]


def _answers(*flags: str) -> tuple[str, list[tuple[list[str], list[float]]]]:
    with running_server("--dtype", "float32", "--num-kv-blocks", "256", *flags) as server:
        executor = server.llm.core.ready.executor
        client = openai_client(server)
        results = []
        for messages in PROMPTS:
            reply = client.chat.completions.create(
                model=DEFAULT_MODEL_NAME,
                messages=messages, max_tokens=12, temperature=0.0, logprobs=True, top_logprobs=2,
                extra_body={"ignore_eos": True},
            )
            content = reply.choices[0].logprobs.content
            results.append(([c.token for c in content], [c.logprob for c in content]))
        return executor, results


def test_tp2_server_answers_like_tp1():
    executor, single = _answers()
    assert executor == "UniProcExecutor"
    executor, sharded = _answers("--tensor-parallel-size", "2")
    assert executor == "MultiprocTPExecutor"
    for (tokens1, logprobs1), (tokens2, logprobs2) in zip(single, sharded):
        assert tokens2 == tokens1
        assert max(abs(a - b) for a, b in zip(logprobs1, logprobs2)) < FP32_TOL
