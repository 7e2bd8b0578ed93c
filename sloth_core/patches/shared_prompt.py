"""A preference pair in one row, its prompt computed once.

DPO, ORPO and SimPO score a chosen and a rejected completion of the same prompt. Two rows
(``prompt + chosen``, ``prompt + rejected``) run the prompt's tokens through the model
twice; at TRL's usual shapes (a prompt as long as its completions) that is a quarter of
the step's work. Here a pair becomes one row::

    [shared prefix][first tail][second tail][padding]

The shared prefix is the prompt without its last token (the longest common prefix of the
two rows that carries no label, less one token). Each tail is the rest of its own row,
starting with the prompt's last token, so every label token is predicted inside its own
tail and the shifted labels of the row are the two rows' labels side by side. Positions
restart for the second tail (it continues the prefix, not the first tail), and its tokens
never see the first tail's: the attention of every token is the one it had in its own
row, so the log-probabilities are those of the two rows, computed with fewer tokens.

:func:`pack_pairs` makes the row; :class:`SharedPromptRows` describes it to
``sloth_attention`` (passed as the model keyword :data:`SHARED_PROMPT_KWARG`, which reaches
every layer and every checkpoint's recompute): a dense mask for the SDPA, softcap, sink and
sliding-window paths, and on CUDA the flash varlen kernels over gathered segments.
"""

from __future__ import annotations

from functools import cached_property

import torch

#: The model keyword that carries a :class:`SharedPromptRows` down to the attention.
SHARED_PROMPT_KWARG = "sloth_shared_prompt"
IGNORE_INDEX = -100
#: :attr:`SharedPromptRows.branch` values.
SHARED, FIRST, SECOND, PADDING = 0, 1, 2, 3


class SharedPromptRows:
    """Where each packed row's prefix and two tails lie.

    Args:
        shared: per row, the shared prefix's length ``S``.
        ends: per row, where the first tail ends and where the second tail ends.
        length: the rows' common (padded) length.
        device: where the tensors go.
    """

    def __init__(self, shared: list[int], ends: list[tuple[int, int]], length: int,
                 device: torch.device | str) -> None:  # fmt: skip
        self.shared, self.ends, self.length = shared, ends, length
        self.device = torch.device(device)
        positions, branch = [], []
        for s, (first, second) in zip(shared, ends, strict=True):
            positions.append(torch.cat([
                torch.arange(first), torch.arange(s, s + second - first),
                torch.arange(s + second - first, s + second - first + length - second),
            ]))  # fmt: skip
            branch.append(torch.tensor(
                [SHARED] * s + [FIRST] * (first - s) + [SECOND] * (second - first)
                + [PADDING] * (length - second), dtype=torch.int8,
            ))  # fmt: skip
        #: ``[B, L]``: each token's position in its own row (the second tail's restart).
        self.positions = torch.stack(positions).to(self.device)
        #: ``[B, L]``: :data:`SHARED`, :data:`FIRST`, :data:`SECOND` or :data:`PADDING`.
        self.branch = torch.stack(branch).to(self.device)

    @cached_property
    def mask(self) -> torch.Tensor:
        """``[B, 1, L, L]`` bool: causal by index, and no second-tail query sees the first
        tail (padding queries see what precedes them: no row without a key)."""
        index = torch.arange(self.length, device=self.device)
        causal = index[:, None] >= index[None, :]
        crossing = (self.branch[:, :, None] == SECOND) & (self.branch[:, None, :] == FIRST)
        return (causal & ~crossing)[:, None]

    def windowed_mask(self, window: int) -> torch.Tensor:
        """:attr:`mask` within a sliding window counted in positions (as each row counts
        it alone: transformers' ``q - kv < window``)."""
        distance = self.positions[:, :, None] - self.positions[:, None, :]
        return self.mask & (distance < window)[:, None]

    @cached_property
    def varlen(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``(gather, cu_seqlens, scatter, max_len)`` for the flash varlen kernels.

        Over the flattened ``[B * L]`` tokens, each row gives causal segments: its prefix and
        first tail; its prefix again and its second tail; its padding. ``gather`` picks the
        segments' tokens in order (the prefix twice), ``cu_seqlens`` cuts them, and
        ``scatter`` takes each token's output back from its own segment."""
        gather, scatter, lengths = [], [], []
        offset = 0
        for row, (s, (first, second)) in enumerate(zip(self.shared, self.ends, strict=True)):
            base = row * self.length
            pieces = [torch.arange(base, base + first),
                      torch.cat([torch.arange(base, base + s),
                                 torch.arange(base + first, base + second)])]  # fmt: skip
            if second < self.length:
                pieces.append(torch.arange(base + second, base + self.length))
            starts = []
            for piece in pieces:
                starts.append(offset)
                if len(piece):  # an empty segment (a padding example's) is left out
                    gather.append(piece)
                    lengths.append(len(piece))
                    offset += len(piece)
            scatter.append(torch.arange(starts[0], starts[0] + first))
            scatter.append(torch.arange(starts[1] + s, starts[1] + s + second - first))
            if second < self.length:
                scatter.append(torch.arange(starts[2], starts[2] + self.length - second))
        cu_seqlens = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
        return (torch.cat(gather).to(self.device), cu_seqlens.to(self.device),
                torch.cat(scatter).to(self.device), max(lengths))  # fmt: skip

    def target_branch(self) -> torch.Tensor:
        """``[B, L]``: the branch of the token each position predicts (position ``t``'s
        shifted label is the label at ``t + 1``); the last position predicts nothing."""
        following = torch.full_like(self.branch, PADDING)
        following[:, :-1] = self.branch[:, 1:]
        return following


def common_prompt(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> int:
    """The length of the longest label-free common prefix of a pair's two rows
    (``[2, L]`` each, right-padded)."""
    same = (ids[0] == ids[1]) & mask.bool().all(0) & (labels == IGNORE_INDEX).all(0)
    differs = (~same).nonzero()
    return int(differs[0, 0]) if len(differs) else int(same.numel())


def pack_pairs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, SharedPromptRows]:
    """``[B, 2, L]`` right-padded pairs (chosen, rejected) as ``[B, L']`` rows: ids,
    attention mask (1 on every real token), labels (unshifted, -100 off the completions),
    and their :class:`SharedPromptRows`. A pair with no common prompt keeps both rows
    whole, one after the other."""
    device = input_ids.device
    ids, mask, lab = input_ids.cpu(), attention_mask.cpu(), labels.cpu()  # one sync
    shared, ends, pieces = [], [], []
    for b in range(ids.shape[0]):
        lengths = [int(mask[b, side].sum()) for side in (0, 1)]
        s = max(common_prompt(ids[b], mask[b], lab[b]) - 1, 0)
        chosen, rejected = (slice(0, lengths[0]), slice(s, lengths[1]))
        row_ids = torch.cat([ids[b, 0, chosen], ids[b, 1, rejected]])
        row_labels = torch.cat([lab[b, 0, chosen], lab[b, 1, rejected]])
        shared.append(s)
        ends.append((lengths[0], lengths[0] + lengths[1] - s))
        pieces.append((row_ids, row_labels))
    length = max(max(end for _, end in ends), 1)
    pad_id = int(ids[0, 0, -1]) if mask[0, 0, -1] == 0 else 0
    out_ids = torch.full((len(pieces), length), pad_id, dtype=ids.dtype)
    out_labels = torch.full((len(pieces), length), IGNORE_INDEX, dtype=lab.dtype)
    out_mask = torch.zeros((len(pieces), length), dtype=mask.dtype)
    for b, (row_ids, row_labels) in enumerate(pieces):
        out_ids[b, : len(row_ids)] = row_ids
        out_labels[b, : len(row_labels)] = row_labels
        out_mask[b, : len(row_ids)] = 1
    rows = SharedPromptRows(shared, ends, length, device)
    return out_ids.to(device), out_mask.to(device), out_labels.to(device), rows
