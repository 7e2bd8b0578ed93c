"""Llama-style self-attention through the LoRA ops, and the ``sloth_attention`` attention function.

The patched forward is transformers' own (projections, per-head q/k norms where the model
has them, rotary, cache update, the attention function the config names, output
projection) with the projections and the rotary through the op registry. ``sloth_attention``
is PyTorch SDPA registered through transformers' ``AttentionInterface``, with GQA without
copies and a padding-free path for packed rows (``position_ids`` restarting inside a row).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import math
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F

from sloth_core.patching import bind_forward, call_original

from .kept_attention import attend_kept, attend_kept_varlen
from .mlp import lift_linear
from .shared_prompt import SHARED_PROMPT_KWARG, SharedPromptRows
from .softcap import softcap_attention
from .tensor_memo import memo

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

    from sloth_core.ops import OpRegistry

#: The name ``sloth_attention`` is registered under in transformers' attention interfaces.
SLOTH_ATTENTION = "sloth_attention"
#: The keyword (passed down the model's forward) asking :func:`sloth_attention` to attend
#: one-token queries with grouped KV heads through :func:`decode_gqa`: the fast sampling
#: path's (:mod:`sloth_core.inference.graphed`), whose static cache is long.
DECODE_GQA_KWARG = "sloth_decode_gqa"
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _model_functions(module: torch.nn.Module) -> tuple[Any, Callable[..., Any] | None]:
    # The modeling file's own ALL_ATTENTION_FUNCTIONS (a model may override an entry
    # locally) and its eager_attention_forward, the fallback transformers itself uses.
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    namespace = sys.modules.get(type(module).__module__)
    interface = getattr(namespace, "ALL_ATTENTION_FUNCTIONS", ALL_ATTENTION_FUNCTIONS)
    return interface, getattr(namespace, "eager_attention_forward", None)


def patch_attention(
    module: torch.nn.Module,
    ops: OpRegistry,
    *,
    attention_kwargs: Callable[[torch.nn.Module], dict[str, Any]] | None = None,
    half_rotary: bool = False,
) -> bool:
    """Route a Llama-style self-attention through ``lora_qkv``, ``rope`` and ``lora_o``.

    The module needs ``q_proj``/``k_proj``/``v_proj``/``o_proj``, ``head_dim``,
    ``scaling``, ``layer_idx``, ``config`` and ``attention_dropout``; ``q_norm``/``k_norm``
    (Qwen3, Gemma 3) run per head before the rotary when present. The attention itself is
    the function ``config._attn_implementation`` names (eager, sdpa, ``sloth_attention``,
    anything registered), looked up per call as transformers does. When a projection
    cannot be lifted (see :func:`~sloth_core.patches.mlp.lift_linear`) the original
    forward runs. ``False`` if patched already, if the module's modeling file has no
    ``eager_attention_forward``, if a projection is missing, or if its ``q_norm``/``k_norm``
    span the whole projection (OLMo 2: one norm over ``heads * head_dim``) rather than one
    head: this forward normalises per head, and would compute something else.

    Args:
        module: the attention module.
        ops: the op registry.
        attention_kwargs: extra keyword arguments for the attention function, from the
            module, as its modeling file passes them (Mistral's ``sliding_window``, Gemma
            2's ``softcap``, gpt-oss's ``s_aux`` sinks...). Llama passes none.
        half_rotary: the rotary embedding returns ``cos``/``sin`` of ``head_dim / 2``
            frequencies, each rotating a dimension of the first half with its partner in
            the second (gpt-oss's ``_apply_rotary_emb``): that is ``rope`` with ``cos``/``sin``
            repeated once, which is how they are passed to it.
    """
    if not all(hasattr(module, name) for name in _PROJECTIONS) or not _per_head_norms(module):
        return False
    interface, eager = _model_functions(module)
    if eager is None:
        return False

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kw):
        projections = [lift_linear(getattr(self, name)) for name in _PROJECTIONS]
        if args:  # positional past attention_mask: the caller follows the original's order
            original = (hidden_states, position_embeddings, attention_mask, *args)
            return call_original(self, *original, **kw)
        if position_embeddings is None or any(p is None for p in projections):
            kw.update(position_embeddings=position_embeddings, attention_mask=attention_mask)
            return call_original(self, hidden_states, **kw)
        q_proj, k_proj, v_proj, o_proj = projections
        input_shape = hidden_states.shape[:-1]
        shape = (*input_shape, -1, self.head_dim)
        query, key, value = ops.lora_qkv(hidden_states, q_proj, k_proj, v_proj)
        query, key, value = query.view(shape), key.view(shape), value.view(shape)
        if getattr(self, "q_norm", None) is not None and getattr(self, "k_norm", None) is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        cos, sin = position_embeddings
        if half_rotary:
            cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
        query, key = ops.rope(query, key, cos, sin)
        output, weights = attend(
            self, query, key, value, attention_mask, kw, interface, eager, attention_kwargs
        )
        output = output.reshape(*input_shape, -1).contiguous()
        return ops.lora_o(output, o_proj), weights

    return bind_forward(module, forward)


def _per_head_norms(module: torch.nn.Module) -> bool:
    """Whether the module's ``q_norm``/``k_norm`` (if any) normalise one head at a time:
    a weight of ``head_dim`` elements, or none (a norm without parameters)."""
    head_dim = getattr(module, "head_dim", None)
    for name in ("q_norm", "k_norm"):
        weight = getattr(getattr(module, name, None), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.shape[-1] != head_dim:
            return False
    return True


def attend(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kw: dict[str, Any],
    interface: Any,
    eager: Callable[..., Any],
    attention_kwargs: Callable[[torch.nn.Module], dict[str, Any]] | None = None,
) -> tuple[torch.Tensor, Any]:
    """What a patched attention runs after the rotary, as transformers' forwards do.

    The cache update, then the attention function ``config._attn_implementation`` names,
    looked up per call in ``interface`` with ``eager`` as the fallback (see
    :func:`_model_functions`), given the module's ``attention_kwargs``, its dropout in
    training and its ``scaling``. ``kw`` is the forward's ``**kwargs`` (changed in place);
    returns the function's ``([B, S, Hq, D], weights)``.
    """
    # transformers >= 5.2x passes the cache as `cache`, 5.17 as `past_key_values`; the
    # deprecation shim on the original forward is bypassed here, so accept both.
    cache, legacy_cache = kw.pop("cache", None), kw.pop("past_key_values", None)
    if cache is not None:
        key, value = cache.update(key, value, module.layer_idx, kwargs=kw)
    elif legacy_cache is not None:
        key, value = legacy_cache.update(key, value, module.layer_idx)
    implementation = cast("PreTrainedConfig", module.config)._attn_implementation
    get_interface = getattr(interface, "get_interface", None)
    if get_interface is not None:
        function = get_interface(implementation, eager)
    else:
        function = interface[implementation] if implementation in interface else eager
    if attention_kwargs is not None:
        kw.update(attention_kwargs(module))
    dropout = module.attention_dropout if module.training else 0.0
    return function(
        module, query, key, value, attention_mask, dropout=dropout, scaling=module.scaling, **kw
    )


# -- sloth_attention ------------------------------------------------------------------------
_varlen_attn: Callable[..., Any] | None
_AuxRequest: Any
try:
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # torch without the varlen API: SDPA with a block-diagonal mask
    _varlen_attn = None
try:  # asks varlen_attn for the log-sum-exp too (the kept path's first pass)
    from torch.nn.attention.varlen import AuxRequest as _AuxRequest
except ImportError:
    _AuxRequest = None
_VARLEN_PARAMS = set(inspect.signature(_varlen_attn).parameters) if _varlen_attn else set()
_varlen_failed = False
#: Calls of :func:`sloth_attention` by the path they took ("varlen", "shared_prompt",
#: "softcap", "sinks", "decode_gqa", "kept"
#: (:func:`~sloth_core.patches.kept_attention.attend_kept`), "sdpa"):
#: how tests see that packed rows really went through ``varlen_attn`` (a fallback to SDPA
#: computes the same numbers). One counter increment per layer call.
ATTENTION_PATHS: collections.Counter[str] = collections.Counter()
#: The attention kwarg a training forward sets to its :class:`PackedRows` where no 2D
#: mask came (no padding, no cache): transformers' 4D mask is then exactly the rows' own
#: (it splits sequences as they do), which :meth:`PackedRows.matches` need not read back.
PACKED_ROWS_KWARG = "sloth_packed_rows"


class PackedRows:
    """Where the sequences packed into each row start, from ``position_ids`` ``[B, S]``.

    A new sequence starts wherever a position is not its predecessor plus one, exactly as
    transformers' ``masking_utils.find_packed_sequence_indices`` splits them, so the
    block-diagonal causal mask here equals the one transformers builds for ``sdpa``.
    """

    def __init__(self, position_ids: torch.Tensor) -> None:
        step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
        self.starts = step != 1
        self.sequence_ids = self.starts.cumsum(-1)
        self._mask: torch.Tensor | None = None
        self._varlen: tuple[torch.Tensor, int] | None = None
        self._checked: tuple[torch.Tensor, bool] | None = None

    @property
    def mask(self) -> torch.Tensor:
        """``[B, 1, S, S]`` bool: same sequence and not in the future."""
        if self._mask is None:
            ids = self.sequence_ids
            same = ids[:, :, None] == ids[:, None, :]
            length = ids.shape[-1]
            causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
            self._mask = (same & causal)[:, None]
        return self._mask

    def varlen(self) -> tuple[torch.Tensor, int]:
        """``(cu_seqlens, max_len)`` over the flattened rows: every row start is a boundary."""
        if self._varlen is None:
            starts = self.starts.clone()
            starts[:, 0] = True
            begin = starts.flatten().nonzero().flatten()
            end = torch.tensor([starts.numel()], device=begin.device)
            cu_seqlens = torch.cat([begin, end]).to(torch.int32)
            self._varlen = cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return self._varlen

    def matches(self, mask: torch.Tensor) -> bool:
        """Whether ``mask`` is exactly this block-diagonal causal mask (so no padding in it)."""
        if self._checked is None or self._checked[0] is not mask:
            same = mask.dtype == torch.bool and mask.shape == self.mask.shape
            self._checked = mask, bool(same and torch.equal(mask, self.mask))
        return self._checked[1]


def packed_rows(position_ids: torch.Tensor, batch: int) -> PackedRows | None:
    """The :class:`PackedRows` of ``position_ids``, or ``None`` if no row restarts.

    Cached on the tensor: every layer of one forward receives the same ``position_ids``,
    and the check needs a device sync.
    """
    if position_ids.dim() == 1:
        position_ids = position_ids[None]

    def find() -> PackedRows | None:
        rows = PackedRows(position_ids.expand(batch, -1))
        return rows if bool(rows.starts[:, 1:].any()) else None

    return memo(position_ids, "_sloth_packed", (batch,), find)


def plain_positions(batch: int, length: int, device: torch.device) -> torch.Tensor:
    """``[1, length]`` positions ``0..length-1``, as a model without a cache makes them,
    that :func:`packed_rows` knows restart nowhere: a training forward passes them down
    in place of none, so its first attention layer need not ask the device (after the
    layer's projections, a sync that drains them)."""
    positions = torch.arange(length, device=device)[None]
    memo(positions, "_sloth_packed", (batch,), lambda: None)
    return positions


def _varlen_usable(query: torch.Tensor, dropout: float) -> bool:
    # The flash varlen kernels: CUDA, half precision, no dropout, head_dim <= 256.
    return (
        _varlen_attn is not None
        and not _varlen_failed
        and query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and dropout == 0.0
        and query.shape[-1] <= 256
    )


def _varlen(query, key, value, rows: PackedRows, scaling: float | None,
            module: Any = None) -> torch.Tensor | None:  # fmt: skip
    """Packed causal attention through ``varlen_attn``: ``[B, S, Hq, D]``; ``None`` if it
    fails. ``module``: the attention layer, whose offloaded checkpoint may keep the output
    (:func:`_varlen_flat`)."""
    batch, heads, length, dim = query.shape
    cu_seqlens, max_len = rows.varlen()
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k = key.transpose(1, 2).reshape(batch * length, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * length, value.shape[1], value.shape[-1])
    out = _varlen_flat(q, k, v, (cu_seqlens, cu_seqlens), (max_len, max_len), scaling, module)
    return None if out is None else out.reshape(batch, length, heads, -1)


def _shared_varlen(query, key, value, rows: SharedPromptRows, scaling: float | None,
                   module: Any = None) -> torch.Tensor | None:  # fmt: skip
    """A shared-prompt row's attention through ``varlen_attn``: the queries as they lie,
    in segments (prefix + first tail, each later tail, padding), each segment's keys and
    values gathered (the prefix, then its tail; see :attr:`SharedPromptRows.varlen`).
    ``[B, S, Hq, D]``; ``None`` if it fails."""
    if not _aligned_to_last_key(query.device, query.dtype):
        return None
    batch, heads, length, dim = query.shape
    gather, cu_q, cu_k, max_q, max_k = rows.varlen
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k = key.transpose(1, 2).reshape(batch * length, key.shape[1], dim).index_select(0, gather)
    v = value.transpose(1, 2).reshape(batch * length, value.shape[1], value.shape[-1])
    out = _varlen_flat(q, k, v.index_select(0, gather), (cu_q, cu_k), (max_q, max_k), scaling,
                       module)  # fmt: skip
    return None if out is None else out.reshape(batch, length, heads, -1)


def _shared_split(query, key, value, rows: SharedPromptRows, scaling: float | None,
                  module: Any = None) -> torch.Tensor:  # fmt: skip
    """A shared-prompt row's attention as whole causal sequences (:attr:`SharedPromptRows.split`):
    the rows' first ``first`` tokens as they lie, then each later tail behind its prefix
    again, both through SDPA's own fused kernels (cuDNN on Hopper) without a mask, kept
    for the recompute as any maskless attention is. ``[B, S, Hq, D]``."""
    batch, heads, length, _ = query.shape
    first, later = rows.split
    out = _causal_attention(module, query[:, :, :first], key[:, :, :first],
                            value[:, :, :first], scaling).transpose(1, 2)  # fmt: skip
    if first < length:
        out = torch.cat([out, out.new_zeros(batch, length - first, *out.shape[2:])], 1)
    if later is None:
        return out.contiguous()
    gather, out_index, src_index = later

    def sequences(t: torch.Tensor) -> torch.Tensor:  # [B, H, L, D] -> [M, H, width, D]
        flat = t.transpose(1, 2).reshape(batch * length, t.shape[1], t.shape[-1])
        return flat[gather].transpose(1, 2)

    tails = _causal_attention(module, sequences(query), sequences(key), sequences(value),
                              scaling).transpose(1, 2)  # fmt: skip
    tails = tails.reshape(-1, heads, tails.shape[-1]).index_select(0, src_index)
    flat = out.reshape(batch * length, heads, out.shape[-1]).index_copy(0, out_index, tails)
    return flat.reshape(out.shape)


def _causal_attention(module, q, k, v, scaling: float | None) -> torch.Tensor:
    """Causal attention ``[B, Hq, S, D]`` without a mask: kept for an offloaded layer's
    recompute where it applies (the calls of one layer are kept in call order)."""
    out = attend_kept(module, q, k, v, causal=True, scaling=scaling)
    if out is not None:
        ATTENTION_PATHS["kept"] += 1
        return out
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                          enable_gqa=q.shape[1] != k.shape[1])  # fmt: skip


def shared_attention_mode() -> str:
    """How a shared-prompt row's attention runs on a GPU in half precision:
    ``SLOTH_SHARED_ATTENTION=varlen`` (the default: flash attention 2's varlen segments,
    the prefix's queries once) or ``split`` (whole causal sequences on SDPA's fused
    kernels, cuDNN on Hopper: the prefix's queries again per later tail, on faster
    kernels; see :func:`_shared_split`)."""
    mode = os.environ.get("SLOTH_SHARED_ATTENTION", "varlen")
    if mode not in ("varlen", "split"):
        raise ValueError(f"SLOTH_SHARED_ATTENTION={mode!r}: varlen or split")
    return mode


@functools.cache
def _aligned_to_last_key(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``varlen_attn``'s causal mask, in a cut with more keys than queries, is
    aligned to the cut's last key (flash attention's convention since 2.1, which the
    shared-prompt segments need). Checked once per device and dtype on one query and two
    keys of equal score: aligned, it averages both values; aligned to the first key, it
    returns the first value."""
    q = torch.zeros(1, 1, 64, device=device, dtype=dtype)
    k = torch.zeros(2, 1, 64, device=device, dtype=dtype)
    v = torch.stack([torch.zeros(1, 64), torch.ones(1, 64)]).to(device, dtype)
    cu_q = torch.tensor([0, 1], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 2], dtype=torch.int32, device=device)
    with torch.no_grad():
        out = _varlen_flat(q, k, v, (cu_q, cu_k), (1, 2), None)
    aligned = out is not None and abs(float(out.float().mean()) - 0.5) < 1e-2
    if out is not None and not aligned:
        message = ("sloth_attention: varlen_attn's causal mask is not aligned to the last key; "
                   "shared-prompt rows go through SDPA with their mask")  # fmt: skip
        warnings.warn(message, stacklevel=2)
    return aligned


def _varlen_options(heads: int, dim: int, scaling: float | None) -> tuple[dict[str, Any], float]:
    """``varlen_attn``'s keywords for causal attention at ``scaling``, and the factor the
    queries need where this torch's signature takes no scale."""
    # The signature grew between torch releases (2.10: is_causal, no scale, no GQA).
    options: dict[str, Any] = {}
    if "window_size" in _VARLEN_PARAMS:
        options["window_size"] = (-1, 0)  # causal
    else:
        options["is_causal"] = True
    factor = 1.0
    if "scale" in _VARLEN_PARAMS:
        options["scale"] = scaling
    elif scaling is not None and not math.isclose(scaling, dim**-0.5):
        factor = scaling * math.sqrt(dim)  # the kernel applies 1/sqrt(dim)
    return options, factor


def _varlen_flat(q, k, v, cu_seqlens: tuple[torch.Tensor, torch.Tensor], max_len: tuple[int, int],
                 scaling: float | None, module: Any = None) -> torch.Tensor | None:  # fmt: skip
    """``varlen_attn`` over ``[T, H, D]`` queries and ``[T', H, D]`` keys, cut at
    ``cu_seqlens`` (queries', keys'), causal in each cut (aligned to its last key where it
    has more keys than queries); ``None`` (and SDPA from then on) if it fails. Given the
    attention ``module``, an offloaded checkpoint's first pass keeps the output and its
    recompute runs no attention forward (:func:`~.kept_attention.attend_kept_varlen`)."""
    global _varlen_failed
    heads, dim = q.shape[1], q.shape[2]
    options, factor = _varlen_options(heads, dim, scaling)
    if factor != 1.0:
        q = q * factor
    if k.shape[1] != heads:
        if "enable_gqa" in _VARLEN_PARAMS:
            options["enable_gqa"] = True
        elif not _native_gqa(q.device, q.dtype):  # flash attention's own GQA: no copies
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
    assert _varlen_attn is not None  # _varlen_usable
    if module is not None and _keeps_varlen():
        out = attend_kept_varlen(
            module, q, k, v,
            forward=functools.partial(_varlen_with_lse, cu_seqlens=cu_seqlens, max_len=max_len,
                                      options=options),
            backward=functools.partial(_varlen_backward, cu_seqlens=cu_seqlens, max_len=max_len,
                                       options=options),
            signature=(tuple(max_len), cu_seqlens[0].numel(), cu_seqlens[1].numel(),
                       tuple(sorted(options.items()))),
        )  # fmt: skip
        if out is not None:
            return out
    try:
        out = _varlen_attn(q, k, v, *cu_seqlens, *max_len, **options)
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as exc:
        _varlen_failed = True
        message = f"sloth_attention: varlen_attn failed ({exc}); SDPA with a mask"
        warnings.warn(message, stacklevel=2)
        return None
    return out


def _keeps_varlen() -> bool:
    """Whether this torch's ``varlen_attn`` returns the log-sum-exp and has a backward
    operator of its own: what the kept path (:func:`_varlen_backward`) needs."""
    return (_AuxRequest is not None and "return_aux" in _VARLEN_PARAMS
            and "window_size" in _VARLEN_PARAMS)  # fmt: skip


def _varlen_with_lse(q, k, v, *, cu_seqlens, max_len, options) -> tuple[torch.Tensor, torch.Tensor]:
    assert _varlen_attn is not None and _AuxRequest is not None
    return _varlen_attn(q, k, v, *cu_seqlens, *max_len, return_aux=_AuxRequest(lse=True),
                        **options)  # fmt: skip


def _varlen_backward(dout, q, k, v, out, lse, *, cu_seqlens, max_len, options):
    """``varlen_attn``'s own backward (torch's ``torch_attn::_varlen_attn_backward``):
    ``(dq, dk, dv)`` from the output and log-sum-exp a forward returned."""
    window = list(options.get("window_size", (-1, 0)))
    rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)  # no dropout
    return torch.ops.torch_attn._varlen_attn_backward(
        dout, q, k, v, out, lse, *cu_seqlens, *max_len, window == [-1, 0], rng_state,
        options.get("scale"), window,
    )  # fmt: skip


@functools.cache
def _native_gqa(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``varlen_attn`` (a torch whose signature has no ``enable_gqa``) takes fewer
    key/value heads than query heads as they are, as flash attention's kernels do, forward
    and backward. Tried once per device and dtype on two query heads and one key head
    against the heads repeated; where not, the keys and values are repeated (copies)."""
    assert _varlen_attn is not None
    gen = torch.Generator().manual_seed(0)
    options, _ = _varlen_options(2, 64, None)
    results = []
    with torch.inference_mode(False), torch.enable_grad():  # asked from any context
        shapes = ((5, 2, 64), (5, 1, 64), (5, 1, 64))
        leaves = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
        cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
        for native in (True, False):
            q, k, v = (t.clone().requires_grad_() for t in leaves)
            kk, vv = (k, v) if native else (k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
            try:
                out = _varlen_attn(q, kk, vv, cu, cu, 3, 3, **options)
                grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
            except Exception:  # noqa: BLE001  # refused however it says so: repeat the heads
                return False
            results.append((out, *grads))
    return all(torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2)
               for a, b in zip(*results, strict=True))  # fmt: skip


def _windowed(rows: PackedRows, mask: torch.Tensor | None, window: int) -> torch.Tensor | None:
    """The packed rows' mask within the sliding window, and within ``mask`` if given.

    transformers' sliding-window mask separates packed sequences only when it keeps no
    KV cache (training); in eval, or with no mask (rows no longer than the window), it
    would let them attend to each other. A non-boolean mask is returned as it is.
    """
    if mask is not None and mask.dtype != torch.bool:
        return mask
    length = rows.mask.shape[-1]
    index = torch.arange(length, device=rows.mask.device)
    band = (index[:, None] - index[None, :]) < window  # transformers' sliding_window_overlay
    windowed = rows.mask & band
    return windowed if mask is None else windowed & mask


def sink_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    sinks: torch.Tensor,
    *,
    causal: bool,
    scaling: float | None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention with a learned sink logit per head (gpt-oss), exactly, through SDPA.

    gpt-oss's eager attention appends ``sinks[h]`` to every query's logits before the
    softmax and drops its probability after: a key that every query sees, whose value is
    zero. Neither SDPA nor the varlen kernels take such a logit, so it is made one: each
    query gets one more dimension holding ``sinks[h] / scale``, each key a zero there, and
    one extra key (a one in that dimension, zeros elsewhere, value zero) joins every row,
    unmasked. The logit of that key is ``sinks[h]``, the softmax denominator is gpt-oss's,
    its output adds nothing, and the sinks' gradient flows through SDPA's backward. The
    extra dimension is padded to a multiple of 8 with zeros (fused CUDA kernels want it).
    The mask becomes explicit (``causal`` aligns queries to the end of the keys, as
    transformers' masks do), so CUDA runs SDPA's memory-efficient kernel, not flash.

    Args:
        query: ``[B, Hq, S, D]``; ``key``/``value``: ``[B, Hk, S_kv, D]``.
        attention_mask: ``[B or 1, 1, S, S_kv]`` bool (``True`` attends) or additive
            float, or ``None``.
        sinks: ``[Hq]``, the sink logits (gpt-oss's ``GptOssAttention.sinks``).
        causal: with no mask, whether queries see only earlier keys.
        scaling: the logits' scale (``1/sqrt(D)`` when ``None``).
        dropout: dropout on the probabilities (the sink's is dropped anyway).

    Returns:
        ``[B, S, Hq, D]``.
    """
    batch, heads, length, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    scale = dim**-0.5 if scaling is None else scaling
    extra = 8 - dim % 8
    column = sinks.to(query.dtype).div(scale).view(1, heads, 1, 1).expand(batch, -1, length, 1)
    query = torch.cat((query, column, query.new_zeros(batch, heads, length, extra - 1)), -1)
    key = F.pad(key, (0, extra))
    sink_key = key.new_zeros(batch, kv_heads, 1, dim + extra)
    sink_key[..., dim] = 1.0
    key = torch.cat((key, sink_key), 2)
    value = torch.cat((value, value.new_zeros(batch, kv_heads, 1, value.shape[-1])), 2)
    if attention_mask is None:
        attention_mask = torch.ones(length, kv_len, dtype=torch.bool, device=query.device)
        if causal:
            attention_mask = attention_mask.tril(kv_len - length)
        attention_mask = attention_mask[None, None]
    sees_sink = torch.zeros_like(attention_mask[..., :1])  # 0 added, or False...
    if attention_mask.dtype == torch.bool:
        sees_sink = ~sees_sink  # ...True: every query sees the sink
    attention_mask = torch.cat((attention_mask, sees_sink), -1)
    options = {"enable_gqa": True} if heads != kv_heads else {}
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scale, **options
    )
    return out.transpose(1, 2).contiguous()


def sloth_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """PyTorch SDPA as transformers' ``sdpa`` computes it, plus a padding-free packed path.

    Packed rows (``position_ids`` restarting inside a row, ``query`` as long as ``key``)
    never attend across sequences: on CUDA in half precision, when the mask is absent or
    exactly the block-diagonal causal one transformers builds for packing (so there is no
    padding), and there is no ``sliding_window``, through
    ``torch.nn.attention.varlen.varlen_attn``; otherwise through SDPA with that
    block-diagonal causal mask, intersected with the sliding window (Mistral's, passed as
    ``sliding_window``) where there is one. A ``softcap`` (Gemma 2's attention logit
    softcapping, which transformers' ``sdpa`` refuses) goes through
    :func:`~sloth_core.patches.softcap.softcap_attention` with the same mask. Attention
    sinks (gpt-oss's per-head logit, passed as ``s_aux``, which neither SDPA nor the varlen
    kernels take) go through :func:`sink_attention`, exact, with the same mask. GQA uses
    SDPA's ``enable_gqa`` (no copies) unless a mask would push CUDA SDPA off its fused
    kernels: then ``repeat_kv``; one-token queries asked with ``sloth_decode_gqa=True``
    (:data:`DECODE_GQA_KWARG`) go through :func:`decode_gqa`, which copies nothing.
    A preference pair in one row (``sloth_shared_prompt=``, :mod:`.shared_prompt`) takes
    that row's mask instead of the model's: on CUDA in half precision through
    ``varlen_attn`` over gathered segments (or, with ``SLOTH_SHARED_ATTENTION=split``, as
    whole causal sequences through SDPA's fused kernels: :func:`_shared_split`), otherwise
    through the paths above with it.
    Without a mask or dropout, an offloaded checkpoint's first pass keeps the output and
    log-sum-exp and its recompute runs no attention forward
    (:func:`~sloth_core.patches.kept_attention.attend_kept`).
    Takes and returns what transformers' attention functions do: ``query``
    ``[B, Hq, S, D]``, ``key``/``value`` ``[B, Hk, S_kv, D]``, a ``[B, 1, S, S_kv]`` mask or
    ``None``, the model's ``**kwargs`` (``position_ids``...); returns ``([B, S, Hq, D],
    None)``, never the attention weights.
    """
    softcap = kwargs.get("softcap")
    q_len, kv_len = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    position_ids, window = kwargs.get("position_ids"), kwargs.get("sliding_window")
    rows = None
    shared = kwargs.get(SHARED_PROMPT_KWARG)
    if shared is not None and not q_len == kv_len == shared.length:
        raise ValueError(f"sloth_attention: a shared-prompt row of {shared.length} tokens, "
                         f"given {q_len} queries and {kv_len} keys")  # fmt: skip
    if shared is None and position_ids is not None and 1 < q_len == kv_len:
        if position_ids.shape[-1] == q_len:
            rows = packed_rows(position_ids, query.shape[0])
    sinks = kwargs.get("s_aux")  # gpt-oss's attention sinks: sink_attention only
    if (kwargs.get(DECODE_GQA_KWARG) and q_len == 1 and groups > 1 and sinks is None
            and softcap is None
            and (attention_mask is None or attention_mask.shape[1] == 1)):  # fmt: skip
        ATTENTION_PATHS["decode_gqa"] += 1
        return decode_gqa(query, key, value, attention_mask, scaling, dropout), None
    fast = window is None and softcap is None and sinks is None
    if shared is not None:
        # Chosen and rejected in one row (shared_prompt): its own mask replaces the model's
        # causal + padding one (its padding is at the ends, after every real token).
        if fast and _varlen_usable(query, dropout):
            if shared_attention_mode() == "split":
                ATTENTION_PATHS["shared_split"] += 1
                return _shared_split(query, key, value, shared, scaling, module), None
            out = _shared_varlen(query, key, value, shared, scaling, module)
            if out is not None:
                ATTENTION_PATHS["shared_prompt"] += 1
                return out, None
        attention_mask = shared.mask if window is None else shared.windowed_mask(window)
    if rows is not None and fast and _varlen_usable(query, dropout):
        exact = kwargs.get(PACKED_ROWS_KWARG) is rows  # the mask known to be the rows'
        if attention_mask is None or exact or rows.matches(attention_mask):
            out = _varlen(query, key, value, rows, scaling, module)
            if out is not None:
                ATTENTION_PATHS["varlen"] += 1
                return out, None
    if rows is not None and window is not None:
        attention_mask = _windowed(rows, attention_mask, window)
    elif rows is not None and attention_mask is None:
        attention_mask = rows.mask
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    causal = bool(q_len > 1 and attention_mask is None and causal)
    if causal and kv_len > q_len:  # static-cache prefill, as transformers crops it
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    if sinks is not None:
        if softcap is not None:
            raise NotImplementedError("sloth_attention: attention sinks with a softcap")
        ATTENTION_PATHS["sinks"] += 1
        if groups > 1 and query.device.type != "cpu":  # its mask rules out CUDA's GQA kernels
            from transformers.integrations.sdpa_attention import repeat_kv

            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        out = sink_attention(
            query, key, value, attention_mask, sinks, causal=causal, scaling=scaling,
            dropout=dropout,
        )  # fmt: skip
        return out, None
    if softcap is not None:
        ATTENTION_PATHS["softcap"] += 1
        out = softcap_attention(
            query, key, value, attention_mask, causal=causal, scaling=scaling, softcap=softcap,
            dropout=dropout,
        )  # fmt: skip
        return out, None
    if attention_mask is None and dropout == 0.0:
        # In an offloaded layer's first pass: keep the output and log-sum-exp; in its
        # recompute: use them, no attention forward (kept_attention).
        out = attend_kept(module, query, key, value, causal=causal, scaling=scaling)
        if out is not None:
            ATTENTION_PATHS["kept"] += 1
            return out.transpose(1, 2).contiguous(), None
    ATTENTION_PATHS["sdpa"] += 1
    options: dict[str, Any] = {}
    if groups > 1:
        if attention_mask is None or query.device.type == "cpu":
            options["enable_gqa"] = True
        else:
            from transformers.integrations.sdpa_attention import repeat_kv

            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=causal, **options,
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def decode_gqa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Grouped-query attention of one query token per row, without copying the KV heads.

    The query heads that share a KV head (head ``h`` reads KV head ``h // groups``, as
    ``repeat_kv`` pairs them) become the rows of one SDPA call against it: the same
    attention, where a masked CUDA SDPA would otherwise need ``repeat_kv``'s copy of the
    whole cache (``groups`` times its size, every layer, every token).

    Args:
        query: ``[B, Hq, 1, D]``; ``key``/``value``: ``[B, Hk, S_kv, D]``.
        attention_mask: ``[B or 1, 1, 1, S_kv]`` (bool or additive), or ``None``.

    Returns:
        ``[B, 1, Hq, D_v]``.
    """
    batch, heads, _, dim = query.shape
    grouped = query.reshape(batch, key.shape[1], heads // key.shape[1], dim)
    out = F.scaled_dot_product_attention(
        grouped, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
    )  # fmt: skip
    return out.reshape(batch, heads, 1, -1).transpose(1, 2).contiguous()


_capture = threading.local()


@contextlib.contextmanager
def plain_rows_captured() -> Iterator[None]:
    """Inside: a captured step (:mod:`sloth_core.train.step_graph`) of rows with neither a
    mask nor packed positions. Capturing counts as tracing to transformers, which then
    neither checks whether the rows are packed nor skips the causal mask: it would build
    a ``[B, 1, S, S]`` mask and push the attention off its fused causal kernels."""
    outer = getattr(_capture, "plain", False)
    _capture.plain = True
    try:
        yield
    finally:
        _capture.plain = outer


def sloth_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' ``sdpa_mask``, so that padding, sliding windows and packed rows get
    exactly the masks ``sdpa`` gets; inside :func:`plain_rows_captured`, ``None`` (the
    causal kernels) wherever an eager forward of such rows would have had no mask."""
    from transformers.masking_utils import sdpa_mask

    if getattr(_capture, "plain", False) and kwargs.get("attention_mask") is None:
        q_length, kv_length = kwargs.get("q_length"), kwargs.get("kv_length")
        local = kwargs.get("local_size")
        if q_length is not None and q_length == kv_length and (local is None or kv_length < local):
            return None
    return sdpa_mask(*args, **kwargs)


def register_sloth_attention() -> str:
    """Register ``sloth_attention`` with transformers (idempotent); returns its name.

    Its mask function is :func:`sloth_mask` (transformers' ``sdpa_mask``, but in a
    captured step of plain rows): transformers builds no mask at all for an attention
    name without a mask function.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SLOTH_ATTENTION, sloth_attention)
    AttentionMaskInterface.register(SLOTH_ATTENTION, sloth_mask)
    return SLOTH_ATTENTION
