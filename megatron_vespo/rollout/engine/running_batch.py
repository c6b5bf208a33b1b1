"""The tensors of the batch the scheduler decodes: its requests (rows), their shared DynamicCache,
the attention mask and position ids, and the logits of each row's last token.

Rows are left-padded: a row's padding sits in leading columns under a zero attention mask, so
requests of any length (and requests that join later) share one cache. No locking here: only the
scheduler thread touches a running batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_vespo.rollout.engine.requests import Request


def left_padded(seqs: list[list[int]]):
    """(ids, mask, position ids, pads) of token sequences, left-padded to the longest; position ids
    count the real tokens only."""
    width = max(map(len, seqs))
    pads = [width - len(s) for s in seqs]
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, pads[i]:] = torch.tensor(s)
        mask[i, pads[i]:] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos, pads


def joinable(cache) -> bool:
    """Whether rows can be merged into (or columns cut from) the cache: only plain dynamic layers."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers)


def _left_pad(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def merge(cache, mask, other, other_mask):
    """Append another batch's rows to a running cache: the shorter side is left-padded with
    zero keys/values under a zero attention mask, so no row sees the padding."""
    width = max(mask.shape[1], other_mask.shape[1])
    pad_a, pad_b = width - mask.shape[1], width - other_mask.shape[1]
    for la, lb in zip(cache.layers, other.layers):
        la.keys = torch.cat([_left_pad(la.keys, pad_a, 2), _left_pad(lb.keys, pad_b, 2)])
        la.values = torch.cat([_left_pad(la.values, pad_a, 2), _left_pad(lb.values, pad_b, 2)])
    return cache, torch.cat([_left_pad(mask, pad_a, 1), _left_pad(other_mask, pad_b, 1)])


@dataclass
class RunningBatch:
    """``rows`` and, row for row: the cache, the mask [rows, columns], the last position ids
    [rows, 1] and the logits of the last token [rows, vocab] (what the next sample draws from)."""

    rows: list[Request] = field(default_factory=list)
    cache: object = None
    mask: torch.Tensor | None = None
    pos: torch.Tensor | None = None
    last: torch.Tensor | None = None

    def add(self, rows: list[Request], cache, mask, pos, last) -> None:
        """Take freshly prefilled rows: they start the batch, or are merged into its cache."""
        if self.rows:
            self.cache, self.mask = merge(self.cache, self.mask, cache, mask)
            self.pos, self.last = torch.cat([self.pos, pos]), torch.cat([self.last, last])
        else:
            self.cache, self.mask, self.pos, self.last = cache, mask, pos, last
        self.rows = self.rows + rows

    def keep(self, live: list[int]) -> None:
        """Drop finished rows from the cache (later steps skip them), then the leading columns
        that are padding in every row left."""
        keep = torch.tensor(live)
        self.cache.batch_select_indices(keep)
        self.mask, self.pos = self.mask[keep], self.pos[keep]
        self.rows = [self.rows[i] for i in live]
        unused = int(self.mask.any(0).int().argmax())  # leading columns now padding in every row
        if unused and joinable(self.cache):
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
            self.mask = self.mask[:, unused:]

    def next_step(self) -> torch.Tensor:
        """The decode step's input ids [rows, 1]: each row's last sampled token, with one more mask
        column and position for it."""
        step = torch.tensor([[r.output_ids[-1]] for r in self.rows])
        self.mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=self.mask.dtype)], dim=1)
        self.pos = self.pos + 1
        return step
