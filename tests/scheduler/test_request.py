"""Request: statuses and finish reasons, max_tokens resolution, incremental block hashes."""

from omnistream.scheduler.block_hash import hash_block_tokens
from omnistream.scheduler.request import Request, RequestStatus
from omnistream.scheduler.sampling_params import SamplingParams


def test_status_helpers():
    assert not RequestStatus.WAITING.is_finished and RequestStatus.PREEMPTED.finish_reason is None
    assert RequestStatus.FINISHED_STOPPED.finish_reason == "stop"
    assert RequestStatus.FINISHED_LENGTH_CAPPED.finish_reason == "length"
    assert RequestStatus.FINISHED_ABORTED.finish_reason == "abort"
    assert all(s.is_finished for s in RequestStatus if s.name.startswith("FINISHED"))


def test_tokens_and_max_tokens():
    req = Request("r", [1, 2, 3], SamplingParams(max_tokens=None), [0], arrival_time=1.0)
    assert req.resolve_max_tokens(10) == 7
    req.append_output_token(5)
    assert req.output_token_ids == [5] and (req.num_tokens, req.num_prompt_tokens, req.num_output_tokens) == (4, 3, 1)
    req.append_input([6, 7], [], [], 0.0)  # appended input folds the earlier answer into the prompt
    assert req.all_token_ids == [1, 2, 3, 5, 6, 7] and req.output_token_ids == []
    assert (req.num_tokens, req.num_prompt_tokens, req.num_output_tokens) == (6, 6, 0)
    capped = Request("c", [1, 2, 3], SamplingParams(max_tokens=100), [0], arrival_time=1.0)
    assert capped.resolve_max_tokens(10) == 7
    assert Request("s", [1], SamplingParams(max_tokens=4), [0], 0.0).resolve_max_tokens(10) == 4


def test_block_hashes_grow_with_full_blocks_only():
    req = Request("r", [1, 2, 3, 4, 5], SamplingParams(), [0], 0.0, extra_keys=("audio:x",))
    assert len(req.update_block_hashes(2)) == 2
    req.append_output_token(6)
    hashes = req.update_block_hashes(2)
    h0 = hash_block_tokens(None, [1, 2], ("audio:x",))
    h1 = hash_block_tokens(h0, [3, 4], ("audio:x",))
    assert hashes == [h0, h1, hash_block_tokens(h1, [5, 6], ("audio:x",))]
