"""A long sequence's MLP runs a tile of rows at a time: in a checkpoint's first pass and
its recompute, and without gradients; the gradients and outputs are those of the whole
MLP, no op call ever sees more rows than a tile, and an unread output is never computed."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from sloth_core.checkpointing import device_checkpoint, enable_checkpointing, offloaded_checkpoint
from sloth_core.ops import default_registry, reference
from sloth_core.patches import patch_architecture, tiled_mlp
from sloth_core.testing import init_tiny_model
from sloth_core.testing.varied import varied_config

TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
TILE = 5  # rows; a batch of 2 x 11 tokens takes 5 tiles, the last of 2 rows


def _registry(calls: list[tuple[int, bool, bool]]):
    """The references, recording each ``lora_mlp`` call's rows, ``output`` hint and grad
    mode, and returning NaN values where ``output`` is False (gradients unchanged): any
    read of such a value would show in the gradients."""
    ops = default_registry()

    def lora_mlp(x, gate, up, down, *, activation="swiglu", output=True):
        calls.append((x.numel() // x.shape[-1], output, torch.is_grad_enabled()))
        out = reference.lora_mlp(x, gate, up, down, activation=activation)
        if output:
            return out
        return out + (torch.full_like(out, float("nan")) - out).detach()

    ops.register("lora_mlp", lora_mlp, provider="spy", devices=("cpu",))
    return ops


def _model(calls, dropout=0.0):
    from transformers.models.llama import modeling_llama as m

    config = varied_config("llama", tie_word_embeddings=False)
    model = init_tiny_model(config, seed=4)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=TARGETS,
                      lora_dropout=dropout)  # fmt: skip
    model = get_peft_model(model, lora)
    patch_architecture(model, _registry(calls), plugin="test", model_types="llama",
                       mlp=m.LlamaMLP, rms_norm=m.LlamaRMSNorm)  # fmt: skip
    return model


@pytest.fixture
def tiles(monkeypatch):
    """Tiles of TILE rows on the tiny model (its intermediate is a few hundred bytes)."""

    def use(rows: int, element_size: int = 4) -> None:
        monkeypatch.setattr(tiled_mlp, "_MIN_ROWS", 1)
        intermediate = varied_config("llama").intermediate_size
        monkeypatch.setattr(tiled_mlp, "MLP_TILE_BYTES", 3 * intermediate * element_size * rows)

    return use


def _grads(checkpoint, calls, steps=2, dropout=0.0):
    model = _model(calls, dropout)
    if checkpoint is not None:
        enable_checkpointing(model, offload=True)
        for layer in model.get_base_model().model.layers:
            layer._gradient_checkpointing_func = checkpoint
    model.train()
    calls.clear()
    generator = torch.Generator().manual_seed(1)
    grads = []
    for _ in range(steps):  # the same batch, no optimizer: the same gradients each step
        ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=generator)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # the same dropout masks, where there is dropout
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    return grads


def _assert_same(got, want):
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys() and g
        for name in w:
            error = ((g[name] - w[name]).abs().max() / w[name].abs().max()).item()
            assert error <= 1e-5, (name, error)


@pytest.mark.parametrize("checkpoint", [offloaded_checkpoint, device_checkpoint])
def test_a_checkpointed_mlp_runs_in_tiles_with_the_whole_gradients(checkpoint, tiles):
    calls: list[tuple[int, bool, bool]] = []
    want = _grads(None, calls)
    assert {rows for rows, _, _ in calls} == {22}  # no checkpoint: the whole MLP
    tiles(TILE)
    got = _grads(checkpoint, calls)
    _assert_same(got, want)
    assert calls and max(rows for rows, _, _ in calls) <= TILE
    # per layer and step: the first pass's 5 tiles (values), then the recompute's 5 tiles
    # in backward, with no value asked; once per layer, the first recompute's forward
    # computes the value too (5 tiles without gradients), for the probe of its readers
    values = [c for c in calls if not c[2]]
    again = [c for c in calls if c[2]]
    steps, layers = 2, 2
    assert len(values) == steps * layers * 5 + layers * 5
    assert len(again) == steps * layers * 5
    assert all(output for _, output, _ in values) and not any(output for _, output, _ in again)


def test_without_gradients_the_tiles_give_the_whole_output(tiles):
    calls: list[tuple[int, bool, bool]] = []
    model = _model(calls).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator())
    with torch.no_grad():
        calls.clear()
        whole = model(input_ids=ids).logits
        assert {rows for rows, _, _ in calls} == {22}
        tiles(TILE)
        calls.clear()
        tiled = model(input_ids=ids).logits
    assert max(rows for rows, _, _ in calls) <= TILE
    # fp32 matmuls of 5 rows and of 22 sum in other orders: a few ulps of the logits
    torch.testing.assert_close(tiled, whole, rtol=1e-4, atol=1e-5)


def test_kept_layers_and_dropout_run_whole(tiles):
    tiles(TILE)
    calls: list[tuple[int, bool, bool]] = []
    _grads(None, calls, steps=1)  # a kept layer: tiling would add a forward
    assert {rows for rows, _, _ in calls} == {22}
    calls.clear()
    want = _grads(None, calls, steps=1, dropout=0.1)
    got = _grads(offloaded_checkpoint, calls, steps=1, dropout=0.1)  # masks per tile differ
    assert {rows for rows, _, _ in calls} == {22}
    _assert_same(got, want)


def test_tile_rows_of_an_8b_model():
    x = torch.empty(1, 1, dtype=torch.bfloat16)
    assert tiled_mlp.tile_rows(x, 14336) == 2**30 // (3 * 14336 * 2) == 12483
    assert tiled_mlp.tile_rows(x, 10**9) == tiled_mlp._MIN_ROWS


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernels_in_tiles_give_the_whole_gradients(tiles):
    """The registered kernels (sloth-kernels' ``lora_mlp``, its ``output=False`` path) on
    CUDA in bf16, tiled in an offloaded recompute, against the same model kept whole."""
    from transformers.models.llama import modeling_llama as m

    from sloth_core.plugins import get_plugin_manager

    def grads(checkpoint):
        config = varied_config("llama", tie_word_embeddings=False)
        model = init_tiny_model(config, seed=4).to("cuda", torch.bfloat16)
        torch.manual_seed(0)
        lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=TARGETS)
        model = get_peft_model(model, lora)
        patch_architecture(model, get_plugin_manager().ops, plugin="test", model_types="llama",
                           mlp=m.LlamaMLP, rms_norm=m.LlamaRMSNorm)  # fmt: skip
        if checkpoint is not None:
            enable_checkpointing(model, offload=True)
            for layer in model.get_base_model().model.layers:
                layer._gradient_checkpointing_func = checkpoint
        model.train()
        ids = torch.randint(0, config.vocab_size, (2, 300), generator=torch.Generator())
        model(input_ids=ids.cuda(), labels=ids.cuda()).loss.backward()
        return {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}

    want = grads(None)
    tiles(128, element_size=2)  # 5 tiles of the 600 rows, the last of 88
    got = grads(offloaded_checkpoint)
    for name in want:
        error = ((got[name] - want[name]).abs().max() / want[name].abs().max()).item()
        assert error <= 2e-2, (name, error)  # bf16: the tiles' and the whole's sums differ
