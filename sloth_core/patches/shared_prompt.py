"""Completions of one prompt in one row, the prompt computed once.

DPO, ORPO and SimPO score a chosen and a rejected completion of the same prompt; GRPO
scores ``num_generations`` completions of each. Rows apart (``prompt + completion`` each)
run the prompt's tokens through the model once a completion: at TRL's usual DPO shapes (a
prompt as long as its completions) a quarter of the step's work, for GRPO's groups of 8
up to seven eighths of the prompt's. Here a group becomes one row::

    [shared prefix][tail 1][tail 2]...[padding]

The shared prefix is the prompt without its last token (the longest common prefix of the
rows that carries no label, less one token). Each tail is the rest of its own row,
starting with the prompt's last token, so every label token is predicted inside its own
tail and the row's shifted labels are the rows' labels side by side. Each token keeps its
position in its own row (a tail's positions continue the prefix, not the tail before it),
and a tail's tokens never see another tail's: every token's attention is the one it had
in its own row, so the log-probabilities are those of the rows, computed with fewer tokens.

:func:`pack_pairs` (preference pairs) and :func:`pack_groups` (GRPO's completions) make
the rows; :class:`SharedPromptRows` describes them to ``sloth_attention`` (passed as the
model keyword :data:`SHARED_PROMPT_KWARG`, which reaches every layer and every
checkpoint's recompute): a dense mask for the SDPA, softcap, sink and sliding-window
paths, and on CUDA the flash varlen kernels over segments whose keys are gathered.
"""

from __future__ import annotations

from functools import cached_property

import torch

from .tensor_memo import memo

#: The model keyword that carries a :class:`SharedPromptRows` down to the attention.
SHARED_PROMPT_KWARG = "sloth_shared_prompt"
IGNORE_INDEX = -100
#: :attr:`SharedPromptRows.branch` of the shared prefix and of padding; tails are 1, 2, ...
SHARED, PADDING = 0, -1
#: A preference pair's tails: the chosen completion, then the rejected one.
FIRST, SECOND = 1, 2


class SharedPromptRows:
    """Where each packed row's prefix and tails lie, and each token's position.

    Args:
        shared: per row, the shared prefix's length ``S``.
        tails: per row, its tails' lengths in order (a row ends with padding after them).
        positions: ``[B, L]``, each token's position in its own row.
    """

    def __init__(self, shared: list[int], tails: list[list[int]],
                 positions: torch.Tensor) -> None:  # fmt: skip
        self.shared, self.tails = shared, tails
        self.length = positions.shape[-1]
        self.device = positions.device
        branch = torch.full((len(shared), self.length), PADDING, dtype=torch.int16)
        for row, (s, lengths) in enumerate(zip(shared, tails, strict=True)):
            branch[row, :s] = SHARED
            start = s
            for number, n in enumerate(lengths, 1):
                branch[row, start : start + n] = number
                start += n
        #: ``[B, L]``: each token's position in its own row.
        self.positions = positions
        #: ``[B, L]``: :data:`SHARED`, the tail's number (1, 2, ...) or :data:`PADDING`.
        self.branch = branch.to(self.device)

    @cached_property
    def mask(self) -> torch.Tensor:
        """``[B, 1, L, L]`` bool: causal by index, a tail's queries see the prefix and their
        own tail only (padding queries see what precedes them: no row without a key)."""
        index = torch.arange(self.length, device=self.device)
        causal = index[:, None] >= index[None, :]
        query, key = self.branch[:, :, None], self.branch[:, None, :]
        sees = (key == SHARED) | (key == query) | (query == PADDING)
        return (causal & sees)[:, None]

    def windowed_mask(self, window: int) -> torch.Tensor:
        """:attr:`mask` within a sliding window counted in positions (as each row counts
        it alone: transformers' ``q - kv < window``)."""
        distance = self.positions[:, :, None] - self.positions[:, None, :]
        return self.mask & (distance < window)[:, None]

    @cached_property
    def split(self) -> tuple[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
        """``(first, later)``: the rows as whole causal sequences, for kernels whose causal
        mask is aligned to the first key (cuDNN's, through SDPA).

        Each row's first ``first`` tokens (the longest prefix with its first tail) are one
        causal sequence as they lie: a prefix or first-tail query sees only what precedes
        it in its own row. Each later tail becomes a sequence of its own, the prefix and
        then the tail, gathered from the flattened ``[B * L]`` tokens: ``later`` is
        ``(gather [M, width], out_index, src_index)``, the tail tokens' places in the
        flattened rows and in the flattened ``[M * width]`` sequences (None without later
        tails). A sequence shorter than ``width`` repeats its last token: those keys come
        after every real query and causal masking leaves them out. The prefix's queries
        run again in each later sequence (the work of the rows apart, where the varlen
        segments spare it); the projections stay shared."""
        firsts, sequences, out_index, src_index = [1], [], [], []
        for row, (s, tails) in enumerate(zip(self.shared, self.tails, strict=True)):
            base, head = row * self.length, s + (tails[0] if tails else 0)
            firsts.append(head)
            start = base + head
            for n in tails[1:]:
                if n:
                    sequences.append(torch.cat([torch.arange(base, base + s),
                                                torch.arange(start, start + n)]))  # fmt: skip
                    out_index.append(torch.arange(start, start + n))
                    src_index.append((len(sequences) - 1, s, n))
                start += n
        if not sequences:
            return max(firsts), None
        width = max(len(seq) for seq in sequences)
        gather = torch.stack([torch.cat([seq, seq[-1:].expand(width - len(seq))])
                              for seq in sequences])  # fmt: skip
        src = torch.cat([torch.arange(m * width + s, m * width + s + n) for m, s, n in src_index])
        later = tuple(t.to(self.device) for t in (gather, torch.cat(out_index), src))
        return max(firsts), later  # type: ignore[return-value]

    @cached_property
    def varlen(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
        """``(kv_gather, cu_q, cu_k, max_q, max_k)`` for the flash varlen kernels.

        The queries are the flattened ``[B * L]`` tokens as they lie, cut into segments:
        per row, the prefix with its first tail, each later tail alone, the padding. Each
        segment's keys are gathered (``kv_gather``, cut at ``cu_k``): the prefix and the
        segment's tail, so a later tail's keys are the prefix again, then itself. The
        kernels' causal mask is aligned to the segment's last key (flash attention's
        convention where a segment has fewer queries than keys), so a tail's query ``j``
        sees the whole prefix and its own tail up to ``j``: the prefix's queries run once
        however many tails follow, and the output needs no scatter."""
        gather, q_lengths, k_lengths = [], [], []
        for row, (s, tails) in enumerate(zip(self.shared, self.tails, strict=True)):
            base = row * self.length
            prefix = torch.arange(base, base + s)
            start = base + s
            for number, n in enumerate(tails):
                queries = s + n if number == 0 else n  # the prefix's queries go first
                if queries:  # an empty later tail (a padding example's) has no segment
                    gather.append(torch.cat([prefix, torch.arange(start, start + n)]))
                    q_lengths.append(queries)
                    k_lengths.append(s + n)
                start += n
            if not tails and s:  # a prefix alone (no tail) is its own segment
                gather.append(prefix)
                q_lengths.append(s)
                k_lengths.append(s)
            end = base + self.length
            if end > start:  # padding: its own causal segment, whose outputs are never read
                gather.append(torch.arange(start, end))
                q_lengths.append(end - start)
                k_lengths.append(end - start)

        def cumulative(lengths: list[int]) -> torch.Tensor:
            return torch.tensor([0, *lengths]).cumsum(0).to(torch.int32).to(self.device)

        return (torch.cat(gather).to(self.device), cumulative(q_lengths),
                cumulative(k_lengths), max(q_lengths), max(k_lengths))  # fmt: skip

    def target_branch(self) -> torch.Tensor:
        """``[B, L]``: the branch of the token each position predicts (position ``t``'s
        shifted label is the label at ``t + 1``); the last position predicts nothing."""
        following = torch.full_like(self.branch, PADDING)
        following[:, :-1] = self.branch[:, 1:]
        return following


def common_prompt(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> int:
    """The length of the longest label-free common prefix of rows ``[N, L]`` (right-padded,
    real tokens where ``mask``)."""
    same = (ids == ids[:1]).all(0) & mask.bool().all(0) & (labels == IGNORE_INDEX).all(0)
    differs = (~same).nonzero()
    return int(differs[0, 0]) if len(differs) else int(same.numel())


def _pack(groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
          device: torch.device) -> tuple[
              torch.Tensor, torch.Tensor, torch.Tensor, SharedPromptRows]:  # fmt: skip
    """Each group's rows (``ids``, ``labels``, ``positions`` ``[N, L]`` and the real
    tokens' count per row ``[N]``; a row's real tokens first) as one packed row. Padding
    takes id 0: no real token sees it (it comes after them all), no label is on it."""
    shared, tails, pieces = [], [], []
    for ids, labels, positions, counts in groups:
        mask = torch.arange(ids.shape[-1])[None] < counts[:, None]
        s = max(common_prompt(ids, mask, labels) - 1, 0)
        ends = [int(c) for c in counts]
        parts = [(ids[0, :s], labels[0, :s], positions[0, :s])]
        parts += [(ids[i, s:end], labels[i, s:end], positions[i, s:end])
                  for i, end in enumerate(ends)]  # fmt: skip
        shared.append(s)
        tails.append([end - s for end in ends])
        pieces.append([torch.cat(column) for column in zip(*parts, strict=True)])
    length = max(max(len(p[0]) for p in pieces), 1)
    out_ids = torch.zeros((len(pieces), length), dtype=torch.long)
    out_labels = torch.full((len(pieces), length), IGNORE_INDEX, dtype=torch.long)
    out_mask = torch.zeros((len(pieces), length), dtype=torch.long)
    out_positions = torch.zeros((len(pieces), length), dtype=torch.long)
    for b, (row_ids, row_labels, row_positions) in enumerate(pieces):
        n = len(row_ids)
        out_ids[b, :n], out_labels[b, :n], out_mask[b, :n] = row_ids, row_labels, 1
        # Padding continues the last tail's positions (its outputs are never read).
        last = int(row_positions[-1]) + 1 if n else 0
        out_positions[b, :n] = row_positions
        out_positions[b, n:] = torch.arange(last, last + length - n)
    rows = SharedPromptRows(shared, tails, out_positions.to(device))
    if rows.device.type == "cuda":
        # The flash varlen segments' indices, copied to the card now, while the queue is
        # drained anyway (the pack read its rows back): built in the first layer's
        # attention, each copy would wait there for the work queued before it.
        rows.varlen  # noqa: B018  # a cached property, built for its side effect
    return out_ids.to(device), out_mask.to(device), out_labels.to(device), rows


Packed = tuple[torch.Tensor, torch.Tensor, torch.Tensor, SharedPromptRows]


def pack_pairs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> Packed:
    """``[B, 2, L]`` right-padded pairs (chosen, rejected) as ``[B, L']`` rows: ids,
    attention mask (1 on every real token), labels (unshifted, -100 off the completions),
    and their :class:`SharedPromptRows` (tail 1 chosen, tail 2 rejected). A pair with no
    common prompt keeps both rows whole, one after the other. Packed once for the same
    tensors (the policy's and the reference's forward): the results are read-only."""

    def pack() -> Packed:
        ids, mask, lab = input_ids.cpu(), attention_mask.cpu(), labels.cpu()  # one sync
        positions = torch.arange(ids.shape[-1]).expand(2, -1)
        groups = [(ids[b], lab[b], positions, mask[b].sum(-1)) for b in range(ids.shape[0])]
        return _pack(groups, input_ids.device)

    # The policy's forward and the reference's pack the same batch; each pack reads the rows
    # back to the host, which waits for the work queued before it (the policy's forward).
    return memo(input_ids, "_sloth_shared_prompt", (attention_mask, labels, "pairs"), pack,
                watch=(attention_mask, labels))  # fmt: skip


def pack_groups(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, size: int,
    *, prompt_width: int,
) -> Packed:  # fmt: skip
    """GRPO's ``[N, P + C]`` rows (a left-padded prompt of width ``P``, then a right-padded
    completion), every ``size`` consecutive rows completions of one prompt, as ``[N /
    size, L']`` rows (tail ``i`` the group's ``i``-th completion). Each token keeps the
    position it has in its own row as the model numbers it there: its index, the prompt's
    left padding included (transformers' ``arange`` when no ``position_ids`` are given).
    Packed once for the same tensors and grouping, as :func:`pack_pairs`."""

    def pack() -> Packed:
        ids, mask, lab = input_ids.cpu(), attention_mask.cpu(), labels.cpu()  # one sync
        rows, width = ids.shape
        if rows % size:
            raise ValueError(f"{rows} rows are not groups of {size}")
        groups = []
        for first in range(0, rows, size):
            # The real tokens of each row, the prompt's left padding dropped.
            lead = int((mask[first, :prompt_width] == 0).sum())
            keep = mask[first : first + size].bool()
            keep[:, :lead] = False
            counts = keep.sum(-1)
            order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)  # real first
            group_ids, group_labels = (
                t[first : first + size].gather(-1, order) for t in (ids, lab)
            )
            positions = torch.arange(width).expand(size, -1).gather(-1, order)
            groups.append((group_ids, group_labels, positions, counts))
        return _pack(groups, input_ids.device)

    return memo(input_ids, "_sloth_shared_prompt",
                (attention_mask, labels, "groups", size, prompt_width), pack,
                watch=(attention_mask, labels))  # fmt: skip
