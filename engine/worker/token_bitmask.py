"""StepBitmask: one step's grammar masks (structured outputs) and the two ways the runner applies them.

The bitmask comes from the engine core: in this process as PendingMasks, asked for only when the step samples
(filled meanwhile, or then); from another process in SchedulerOutput.grammar_bitmask.
One row of little-endian int32 words per constrained sampling row, bit t % 32 of word t // 32 set when token
t is allowed. Tokens past the last word (padding rows of the vocabulary) are never allowed.

- `apply` sets the forbidden logits of the constrained rows to -inf before the sampler's pass. The words are
  unpacked to one bool per token in one vectorized call (numpy's table-driven unpackbits on the host; a gather
  of word t >> 5, bit t & 31 on any other device, so only the packed words travel there).
- `row_words` lays the masks out for the compiled greedy head (greedy_head.greedy_tokens with `allowed`), which
  takes each row's first maximum over its allowed tokens directly: the runner's way where that kernel serves and
  every mask is ready when the head runs (filled beside the forward, or received in the SchedulerOutput).
- greedy_head.checked_greedy_tokens asks the pending masks which rows' masks are filled already (`prepared`), to
  check the other rows' best ids (`first_allowed`), and fills only the rows left (`fill_rows`); `allowed_among`
  checks kept ids against filled masks.
- `correct_greedy` serves a batch whose rows all take the first maximum from the chunked greedy head, which
  never materialises the logits. A constrained row keeps its token when its grammar allows it: that token is the
  first maximum of the whole row, so also of the allowed tokens. Only the other rows are recomputed, once per
  distinct mask (rows at the same grammar state share it): a forced token is taken as it is; a mask allowing at
  most PROJECTED_FRACTION of the vocabulary (a brace, a keyword, an enum, a short string) projects just those
  rows of the lm_head weight; the rest get full logits, masked like `apply`. The recomputed logits are the same
  products as the full projection's (a GEMM of another shape may round the last bit differently).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from omnistream.engine.model_executor.layers.embedding import ParallelLMHead
from omnistream.scheduler.outputs import SchedulerOutput

PROJECTED_FRACTION = 0.25  # a rejected row projects only the weight rows of the tokens it allows when these
# are at most this share of the vocabulary; a row allowing more gets full logits


class PendingMasks(Protocol):
    """The engine core's masks of a step, still being filled (engine/core/structured_output/masks.py)."""

    beside_forward: bool  # every row's mask is being filled while the forward runs (else on demand, when asked)

    def result(self, chosen: list[int] | None = None) -> np.ndarray:
        """[R, W] int32; given each row's greedy token, a row whose grammar allows it may allow every token."""
        ...

    def prepared(self) -> list[int]:
        """Only where not beside_forward: the rows whose masks were filled meanwhile (waits for them)."""
        ...

    def first_allowed(self, rows: list[int], candidates: list[list[int]]) -> list[int]:
        """Only where not beside_forward: for the rows at these positions, the first of each one's candidate ids
        (best first) that its grammar allows, -1 where none is known to be."""
        ...

    def fill_rows(self, rows: list[int]) -> np.ndarray:
        """Only where not beside_forward: [len(rows), W] int32, the masks of the rows at these positions."""
        ...


@dataclass
class StepBitmask:
    rows: list[int]  # the constrained rows among the step's sampling rows
    words: torch.Tensor  # [R, W] int32 on the host: the allowed tokens of rows[i] in words[i]

    @staticmethod
    def rows_of(so: SchedulerOutput, sample_req_ids: list[str]) -> list[int]:
        """The positions of so.grammar_req_ids among the step's sampling rows."""
        position = {req_id: i for i, req_id in enumerate(sample_req_ids)}
        return [position[req_id] for req_id in so.grammar_req_ids]

    @classmethod
    def from_scheduler_output(
        cls,
        so: SchedulerOutput,
        sample_req_ids: list[str],
        pending: PendingMasks | None = None,
        greedy: torch.Tensor | None = None,
    ) -> StepBitmask | None:
        """The masks of so.grammar_req_ids: from `pending` when given (waiting for them; `greedy`, the greedy
        head's ids [B], lets it fill only the rows whose grammar rejects theirs), else from the SchedulerOutput."""
        if not so.grammar_req_ids:
            return None
        rows = cls.rows_of(so, sample_req_ids)
        if pending is not None:
            words = torch.from_numpy(pending.result(None if greedy is None else greedy[rows].tolist()))
        else:
            words = torch.frombuffer(bytearray(so.grammar_bitmask), dtype=torch.int32)
        return cls(rows, words.view(len(rows), -1))

    def apply(self, logits: torch.Tensor) -> None:
        """In place: -inf for every token that a constrained row's grammar forbids."""
        apply_token_bitmask(logits, self.words, self.rows)

    def row_words(self, num_rows: int, vocab: int) -> torch.Tensor:
        """int32 [num_rows, ceil(vocab / 32)]: each constrained row's words, every token allowed in the other rows;
        a constrained row's tokens past its words (padding rows of the vocabulary) are forbidden. When every row
        is constrained and the widths agree, that is `words` itself, not a copy."""
        width = -(-vocab // 32)
        if self.words.shape[1] == width and self.rows == list(range(num_rows)):
            return self.words
        dense = torch.full((num_rows, width), -1, dtype=torch.int32)
        used = min(width, self.words.shape[1])
        dense[self.rows, :used] = self.words[:, :used]
        dense[self.rows, used:] = 0
        return dense

    def correct_greedy(
        self,
        token_ids: torch.Tensor,
        hidden: torch.Tensor,
        lm_head: ParallelLMHead,
        compute_logits: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The greedy head's ids [B] (first maxima of the unmasked logits of hidden [B, H]), with each constrained
        row whose grammar forbids its id recomputed as the first maximum of the tokens it allows."""
        chosen = token_ids[self.rows].cpu()
        rejected = (~is_allowed(self.words, chosen)).nonzero().flatten().tolist()
        if not rejected:
            return token_ids
        vocab = lm_head.rows_per_rank * lm_head.tp_size
        covered = min(vocab, self.words.shape[1] * 32)
        limit = vocab * PROJECTED_FRACTION if lm_head.tp_size == 1 else 0  # a TP rank holds a weight shard
        same_mask: dict[bytes, list[int]] = {}  # rows at the same grammar state share their projection
        for i in rejected:
            same_mask.setdefault(self.words[i].numpy().tobytes(), []).append(i)
        token_ids = token_ids.clone()
        full = []
        for group in same_mask.values():
            rows = [self.rows[i] for i in group]
            ids = torch.from_numpy(np.flatnonzero(unpack_on_host(self.words[group[0] : group[0] + 1], covered)))
            if len(ids) == 1:  # a forced token: the only finite logit
                token_ids[rows] = int(ids[0])
            elif 0 < len(ids) <= limit:
                weight = lm_head.weight.index_select(0, ids.to(hidden.device))
                values = F.linear(hidden[rows], weight).float()
                token_ids[rows] = ids.to(token_ids.device)[values.max(dim=-1).indices]
            else:
                full += group
        if full:
            rows = [self.rows[i] for i in full]
            logits = compute_logits(hidden[rows])
            apply_token_bitmask(logits, self.words[full], list(range(len(rows))))
            token_ids[rows] = logits.max(dim=-1).indices
        return token_ids


def is_allowed(words: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """bool [R]: whether token_ids[i] is allowed by words[i] ([R, W] int32), all on the host."""
    index = token_ids >> 5
    inside = index < words.shape[1]
    word = words.gather(1, index.clamp(max=words.shape[1] - 1).unsqueeze(1)).squeeze(1)
    return inside & (((word >> (token_ids & 31).to(torch.int32)) & 1) == 1)


def allowed_among(words: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
    """bool [R, K]: whether token_ids[i, k] is allowed by words[i] ([R, W] int32); ids outside the words (or -1)
    are not."""
    inside = (token_ids >= 0) & (token_ids < words.shape[1] * 32)
    ids = np.where(inside, token_ids, 0)
    word = np.take_along_axis(words.view(np.uint32), ids >> 5, axis=1)
    return inside & ((word >> (ids & 31).astype(np.uint32)) & 1 == 1)


def unpack_allowed(words: torch.Tensor, vocab: int, device: torch.device | str) -> torch.Tensor:
    """bool [R, vocab] on `device`: token t of row i is allowed by words[i] ([R, W] int32 on the host)."""
    covered = min(vocab, words.shape[1] * 32)
    if torch.device(device).type == "cpu":
        allowed = unpack_on_host(words, covered)
    else:
        allowed = unpack_on_device(words.to(device, non_blocking=True), covered)
    if covered < vocab:
        allowed = F.pad(allowed, (0, vocab - covered), value=False)
    return allowed


def unpack_on_host(words: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` bits of each row of words [R, W] (int32, CPU) as bool [R, count]: numpy's unpackbits."""
    bits = np.unpackbits(words.numpy().view(np.uint8), axis=1, count=count, bitorder="little")
    return torch.from_numpy(bits).view(torch.bool)


def unpack_on_device(words: torch.Tensor, count: int) -> torch.Tensor:
    """unpack_on_host with tensor ops on words' device: column t reads bit t & 31 of word t >> 5."""
    columns = torch.arange(count, device=words.device)
    return (words[:, columns >> 5] >> (columns & 31).to(torch.int32)) & 1 == 1


def apply_token_bitmask(logits: torch.Tensor, words: torch.Tensor, rows: list[int]) -> None:
    """In place: logits[rows[i], t] = -inf for every token t that words[i] ([R, W] int32, host) forbids."""
    if not rows:
        return
    forbidden = unpack_allowed(words, logits.shape[1], logits.device).logical_not_()
    if rows == list(range(logits.shape[0])):
        logits.masked_fill_(forbidden, float("-inf"))
        return
    for i, row in enumerate(rows):
        logits[row].masked_fill_(forbidden[i], float("-inf"))
