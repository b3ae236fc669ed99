"""apply_token_bitmask: keep only the tokens a grammar allows in some rows of a batch of logits.

The bitmask comes from the engine core (SchedulerOutput.grammar_bitmask): one row of little-endian int32
words per constrained row, bit t % 32 of word t // 32 set when token t is allowed. A row whose allowed
tokens lie in few words (a grammar at a keyword, a brace, an enum) keeps their values and is refilled with
-inf, a fast fill: its cost follows those words, not the vocabulary. Any other row (inside a free string,
where most tokens are allowed but forbidden ones are scattered everywhere) gets one masked_fill over its
unpacked bits. Logits past the bitmask's last word (padding rows of the vocabulary) are always forbidden.
The bitmask is read on the host; the logits may be on any device (indices and masks are copied there).
"""

from __future__ import annotations

import numpy as np
import torch

_BITS = torch.arange(32, dtype=torch.int32)
_SPARSE_FRACTION = 8  # a row is sparse when fewer than 1/8 of its words allow any token


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """In place: logits[rows[i], t] = -inf for every token t that bitmask[i] ([R, W] int32) forbids."""
    if not rows:
        return
    words = bitmask.shape[1]
    if logits.shape[1] > words * 32:
        logits[rows, words * 32 :] = float("-inf")
    row_index = torch.tensor(rows, dtype=torch.long)
    sparse = (bitmask != 0).sum(dim=1) * _SPARSE_FRACTION < words
    if sparse.any():
        _keep_allowed(logits, bitmask[sparse], row_index[sparse])
    for i in (~sparse).nonzero().flatten().tolist():
        bits = np.unpackbits(bitmask[i].numpy().view(np.uint8), bitorder="little")[: logits.shape[1]]
        forbidden = torch.from_numpy(bits.view(np.bool_)).logical_not_().to(logits.device)
        logits[rows[i], : bits.shape[0]].masked_fill_(forbidden, float("-inf"))


def _keep_allowed(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """Rows that allow few tokens: save the allowed logits, fill the rows with -inf, put them back."""
    r, w = (bitmask != 0).nonzero(as_tuple=True)
    r, t = _token_ids(r, w, bitmask[r, w])
    keep = t < logits.shape[1]
    r, t = rows[r[keep]].to(logits.device), t[keep].to(logits.device)
    kept = logits[r, t]
    logits.index_fill_(0, rows.to(logits.device), float("-inf"))
    logits[r, t] = kept


def _token_ids(r: torch.Tensor, w: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token id) of every set bit of the given words."""
    bits = (values.unsqueeze(1) >> _BITS) & 1
    hit_r, hit_b = bits.nonzero(as_tuple=True)
    return r[hit_r], w[hit_r] * 32 + hit_b
