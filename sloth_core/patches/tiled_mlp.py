"""A gated MLP over a long sequence, a tile of rows at a time, where the rows allow it.

An MLP treats each token alone, yet its fused op holds ``[tokens, intermediate]`` tensors
for all of them at once: ``gate``, ``up`` and ``act(gate) * up`` in the first pass, the
first two saved by the recompute for backward and as many gradients again in it. For an
8B model that is 84 KiB a token (intermediate 14336, bf16), past every other activation
of a layer, and at long contexts what bounds the sequence that fits (a 128k-token
recompute would hold about 10 GiB of them). Cut into tiles of rows they never exist whole:

* without gradients (a checkpoint's first pass, evaluation, generation's prefill) each
  tile runs the op and writes its rows of the output;
* in a checkpoint's recompute, :class:`_TiledMLP` saves only the MLP input; its backward
  runs each tile again with gradients and back-propagates it at once (the parameters'
  gradients accumulate, the input's tile is written), so one tile's intermediates are
  alive at a time. Where the layer's graph shows the MLP's output value is unread (it
  only feeds the residual add: :func:`~sloth_core.checkpointing.output_unread`), its
  forward computes nothing, and the tiles run with ``output=False``: no more work than
  the untiled recompute.

Outside a recompute with gradients (a layer kept whole) the op runs untiled: tiling there
would add a forward. So does an MLP whose adapters apply dropout (its masks would differ
from the untiled pass's) or one no longer than a tile (:data:`MLP_TILE_BYTES`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from sloth_core.checkpointing import in_recompute, output_unread
from sloth_core.ops import LoRALinear

#: The bytes of one tile's intermediates (``gate``, ``up`` and ``act(gate) * up`` rows in
#: the input's dtype): 1 GiB is 12,483 rows of an 8B model, so the usual steps of 8192
#: tokens a row are never cut, and 128k tokens take 11 tiles.
MLP_TILE_BYTES = 2**30
_MIN_ROWS = 1024  # tiles smaller than this would starve the matmuls


def tile_rows(x: torch.Tensor, intermediate: int) -> int:
    """Rows per tile for an MLP of ``intermediate`` features on ``x``'s dtype."""
    return max(MLP_TILE_BYTES // (3 * intermediate * x.element_size()), _MIN_ROWS)


def _stochastic(projections: Sequence[LoRALinear], training: bool) -> bool:
    """Whether an adapter applies dropout (a tile's mask would not be the whole's)."""
    for lin in projections:
        p = getattr(lin.dropout, "p", 0.0)
        if lin.dropout is not None and training and p > 0:
            return True
    return False


class _TiledMLP(torch.autograd.Function):
    """The recompute's MLP: saves its input; backward runs and back-propagates a tile at
    a time. ``weights`` are the adapters' trainable tensors: inputs, so that the output
    needs a gradient when only they do; their gradients accumulate in the tiles' own
    backward (as the checkpoint's recompute accumulates them), so none is returned."""

    @staticmethod
    def forward(ctx, x, run, rows, compute, out_features, *weights):
        ctx.run, ctx.rows = run, rows
        ctx.save_for_backward(x)
        if not compute:  # nobody reads the value: only its gradient passes
            return x.new_empty(*x.shape[:-1], out_features)
        return _tiled(run, x, rows, out_features)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        flat, grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        dx = torch.empty_like(flat) if ctx.needs_input_grad[0] else None
        for start in range(0, flat.shape[0], ctx.rows):
            rows = slice(start, start + ctx.rows)
            tile = flat[rows].detach().requires_grad_(dx is not None)
            with torch.enable_grad():
                out = ctx.run(tile, False)
            if out.requires_grad:
                torch.autograd.backward(out, grad[rows])
            if dx is not None:
                dx[rows] = tile.grad if tile.grad is not None else 0
        none = [None] * (len(ctx.needs_input_grad) - 1)
        return (dx.view_as(x) if dx is not None else None, *none)


def _tiled(run: Callable[..., torch.Tensor], x: torch.Tensor, rows: int, out_features: int):
    """``run`` on each tile of ``x``'s rows without gradients, into one output."""
    flat = x.reshape(-1, x.shape[-1])
    out = x.new_empty(flat.shape[0], out_features)
    with torch.no_grad():
        for start in range(0, flat.shape[0], rows):
            out[start : start + rows] = run(flat[start : start + rows], True)
    return out.view(*x.shape[:-1], out_features)


def tiled_mlp(
    module: torch.nn.Module,
    run: Callable[[torch.Tensor, bool], torch.Tensor],
    x: torch.Tensor,
    projections: Sequence[LoRALinear],
    intermediate: int,
    out_features: int,
) -> torch.Tensor | None:
    """The MLP ``module`` on ``x`` a tile of rows at a time, or None where it runs whole.

    ``run(rows, output)`` is the fused op on some rows (``output=False``: its value may go
    uncomputed, its gradient not); ``projections`` are gate, up and down;
    ``intermediate`` is the MLP's width and ``out_features`` its output's."""
    rows = tile_rows(x, intermediate)
    if x.numel() // x.shape[-1] <= rows or _stochastic(projections, module.training):
        return None
    if not torch.is_grad_enabled():
        return _tiled(run, x, rows, out_features)
    if not in_recompute():
        return None
    weights = [
        t for lin in projections for t in (lin.lora_A, lin.lora_B)
        if t is not None and t.requires_grad
    ]  # fmt: skip
    unread = output_unread(module)
    out = _TiledMLP.apply(x, run, rows, not unread, out_features, *weights)
    if not unread:
        output_unread(module, out)  # probed on the first recompute
    return out
