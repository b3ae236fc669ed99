"""When a request stops: a completed structured output, stop token ids, EOS, max_tokens and max_model_len,
checked after each token.

Stop strings need detokenized text; they are found outside the scheduler and reported back
through Scheduler.finish_requests.
"""

from __future__ import annotations

from omnistream.scheduler.request import Request, RequestStatus


def check_stop(request: Request, max_model_len: int, grammar_complete: bool = False) -> bool:
    """Set the request's finished status (and stop_reason) if its last token ends it; True if so.
    `grammar_complete`: its structured output is complete and nothing may follow, which stops it."""
    params = request.sampling_params
    token = request.last_token_id
    if grammar_complete:
        request.status = RequestStatus.FINISHED_STOPPED
        return True
    num_tokens = len(request.all_token_ids)
    num_output_tokens = num_tokens - request.num_prompt_tokens
    if num_output_tokens >= params.min_tokens:
        if token in params.stop_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = token
            return True
        if not params.ignore_eos and token in request.eos_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            return True
    if num_output_tokens >= request.max_tokens or num_tokens >= max_model_len:
        request.status = RequestStatus.FINISHED_LENGTH_CAPPED
        return True
    return False
