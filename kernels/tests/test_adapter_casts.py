"""The fused LoRA ops' copies of fp32 adapters in the compute dtype: made once per weight
epoch, made again after any write to an adapter (version counter), any optimizer step
(bitsandbytes' and torch's fused optimizers write without a version) and any model
forward, and never kept in inference mode or before the first epoch."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEVICE
from sloth_kernels import adapter_casts
from sloth_kernels.adapter_casts import adapter_copies

from sloth_core.weight_epochs import new_weight_epoch, weight_epoch


def _adapters(n: int = 3, r: int = 4, width: int = 24) -> list[torch.Tensor]:
    """``[A_0, B_0, ...]`` of ``n`` adapters, fp32 trainable parameters."""
    params = []
    for i in range(n):
        params.append(torch.nn.Parameter(torch.randn(r, width, device=DEVICE)))
        params.append(torch.nn.Parameter(torch.randn(width + i, r, device=DEVICE)))
    return params


def _check_values(copies, params, dtype) -> None:
    tensors, stacked = copies
    for copy, param in zip(tensors, params, strict=True):
        assert copy.dtype == dtype and not copy.requires_grad
        assert torch.equal(copy, param.detach().to(dtype))
    assert torch.equal(stacked, torch.cat([p.detach().to(dtype) for p in params[0::2]]))


def _same_objects(a, b) -> bool:
    return all(x is y for x, y in zip(a[0], b[0], strict=True)) and a[1] is b[1]


def test_copies_are_made_once_an_epoch_and_again_after_a_write():
    params = _adapters()
    new_weight_epoch()
    first = adapter_copies(params, torch.bfloat16)
    _check_values(first, params, torch.bfloat16)
    assert _same_objects(adapter_copies(params, torch.bfloat16), first)
    assert not _same_objects(adapter_copies(params, torch.float16), first)  # another dtype

    with torch.no_grad():
        params[3].mul_(2)  # in place: its version moves
    written = adapter_copies(params, torch.bfloat16)
    assert not _same_objects(written, first)
    _check_values(written, params, torch.bfloat16)

    new_weight_epoch()  # a model forward begins
    again = adapter_copies(params, torch.bfloat16)
    assert not _same_objects(again, written)
    _check_values(again, params, torch.bfloat16)


def test_an_optimizer_step_begins_an_epoch_even_where_no_version_moves():
    params = _adapters()
    optimizer = torch.optim.AdamW(params, lr=0.1, fused=True)
    new_weight_epoch()
    before = adapter_copies(params, torch.bfloat16)
    versions = [p._version for p in params]
    epoch = weight_epoch()
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert weight_epoch() > epoch
    after = adapter_copies(params, torch.bfloat16)
    _check_values(after, params, torch.bfloat16)
    assert not _same_objects(after, before)
    # What makes the hook needed: where the fused step moves no version counter, a cache
    # keyed on versions alone would have handed back the old values.
    if [p._version for p in params] == versions:
        assert not torch.equal(after[0][0], before[0][0])


def test_nothing_is_kept_before_the_first_epoch_nor_in_inference_mode(monkeypatch):
    params = _adapters()
    new_weight_epoch()
    with torch.inference_mode():
        first = adapter_copies(params, torch.bfloat16)
        assert not _same_objects(adapter_copies(params, torch.bfloat16), first)
    monkeypatch.setattr(adapter_casts, "weight_epoch", lambda: 0)
    first = adapter_copies(params, torch.bfloat16)
    _check_values(first, params, torch.bfloat16)
    assert not _same_objects(adapter_copies(params, torch.bfloat16), first)


def test_a_group_with_nothing_to_cast_or_stack_keeps_nothing():
    a, b = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(8, 4, dtype=torch.bfloat16)
    new_weight_epoch()
    adapter_casts.clear()
    (copy_a, copy_b), stacked = adapter_copies([a, b], torch.bfloat16)
    assert copy_a.data_ptr() == a.data_ptr() and stacked.data_ptr() == a.data_ptr()
    assert copy_b.data_ptr() == b.data_ptr()
    assert not adapter_casts._cache
    assert adapter_copies([], torch.bfloat16) == ((), None)


@pytest.mark.parametrize("n", [1, 2])
def test_a_replaced_adapter_is_not_taken_for_the_old_one(n):
    # The same key (ids) can come back for other tensors once the old ones are gone: the
    # entry holds weak references and the addresses, and is not handed to the new ones.
    new_weight_epoch()
    params = _adapters(n)
    adapter_copies(params, torch.bfloat16)
    (key,) = [k for k in adapter_casts._cache if k[1:] == tuple(map(id, params))]
    _, _, copies = adapter_casts._cache.pop(key)
    fresh = _adapters(n)
    dead = [lambda: None for _ in fresh]  # as the old tensors' references, once gone
    state = [(t.data_ptr(), t._version) for t in fresh]  # even at the same addresses
    adapter_casts._cache[(key[0], *map(id, fresh))] = (dead, state, copies)
    got = adapter_copies(fresh, torch.bfloat16)
    _check_values(got, fresh, torch.bfloat16)


def test_the_last_epochs_groups_are_copied_at_once_into_views_of_one_buffer():
    adapter_casts.clear()
    groups = [_adapters(3), _adapters(2, r=8, width=40), _adapters(1)]
    new_weight_epoch()
    for params in groups:
        adapter_copies(params, torch.bfloat16)
    new_weight_epoch()  # the next step: the first call copies every group the last asked for
    got = [adapter_copies(groups[0], torch.bfloat16)]
    with torch.no_grad():
        groups[2][0].add_(1)  # written since the batch: copied on its own, afresh
    got += [adapter_copies(params, torch.bfloat16) for params in groups[1:]]
    for copies, params in zip(got, groups, strict=True):
        _check_values(copies, params, torch.bfloat16)
    shared = {t.untyped_storage().data_ptr() for copies in got[:2] for t in (*copies[0], copies[1])}
    assert len(shared) == 1  # one buffer: the batch's cat and cast
    assert got[2][0][0].untyped_storage().data_ptr() not in shared
    # The stack of a group's A matrices is their views' own memory, not another cat.
    tensors, stacked = got[0]
    assert tensors[0].data_ptr() == stacked.data_ptr()
    assert tensors[2].data_ptr() == stacked[4:].data_ptr()
    # A group the last epoch did not ask for is made on its own, and kept for the next.
    extra = _adapters(2)
    _check_values(adapter_copies(extra, torch.float16), extra, torch.float16)
    assert _same_objects(adapter_copies(extra, torch.float16), adapter_copies(extra, torch.float16))
    new_weight_epoch()
    again = adapter_copies(extra, torch.float16)
    _check_values(again, extra, torch.float16)
    assert _same_objects(
        adapter_copies(groups[0], torch.bfloat16), adapter_copies(groups[0], torch.bfloat16)
    )


def test_an_epoch_that_asks_for_nothing_leaves_the_last_ones_groups_to_the_next():
    adapter_casts.clear()
    params = _adapters(3)
    new_weight_epoch()
    adapter_copies(params, torch.bfloat16)
    new_weight_epoch()  # an optimizer step: no op asks
    new_weight_epoch()  # the next forward
    other = _adapters(2)
    adapter_copies(other, torch.bfloat16)  # the first call of the epoch makes the batch
    key = (torch.bfloat16, *map(id, params))
    assert key in adapter_casts._cache
    _check_values(adapter_copies(params, torch.bfloat16), params, torch.bfloat16)
