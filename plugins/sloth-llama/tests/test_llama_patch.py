"""sloth-llama's own tests: the patched model against transformers + PEFT from the same weights.

Run with the ``plugin_manager`` fixture's registry (torch references, no kernels), so
differences can only come from the patches; tolerance fp32 1e-5, max abs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from sloth_llama import plugin

from sloth_core.patches import attention as attention_patch
from sloth_core.patches import register_sloth_attention
from sloth_core.patching import is_patched
from sloth_core.testing import init_tiny_model, tiny_config

ATOL = 1e-5
LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
}  # fmt: skip
# The tiny default has GQA (4 heads, 2 kv heads) and an odd vocab (tokenizer + 1).
CONFIGS = {
    "gqa-untied": {"tie_word_embeddings": False},
    "mha-tied": {"tie_word_embeddings": True, "num_key_value_heads": 4},
    "llama3-rope-odd-vocab": {"rope_parameters": LLAMA3_ROPE, "vocab_size": 1013},
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PACKED = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]])


@pytest.fixture
def manager(plugin_manager, register_plugin):
    register_plugin(plugin, name=plugin.PLUGIN)
    return plugin_manager


def _lora(model, seed=0, **options):
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **options))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # B = 0 at init would hide every adapter bug
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def _pair(manager, config_name="gqa-untied", *, lora=False, **lora_options):
    """``(reference, patched, report)`` from the same weights."""
    base = init_tiny_model(tiny_config("llama", **CONFIGS[config_name]))
    if lora:
        base = _lora(base, **lora_options)
    reference, patched = copy.deepcopy(base), copy.deepcopy(base)
    (report,) = manager.patch_layers(model=patched)
    return reference, patched, report


def _inputs(model, batch=2, length=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
    labels = ids.clone()
    labels[:, :3] = -100  # a masked prompt
    return ids, labels


def _max_diff(a, b):
    return (a - b).abs().max().item()


def _train_step(model, **inputs):
    model.train()
    model.zero_grad()
    loss = model(**inputs).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    return loss.detach(), grads


def _assert_same_training(reference, patched, **inputs):
    ref_loss, ref_grads = _train_step(reference, **inputs)
    loss, grads = _train_step(patched, **inputs)
    assert _max_diff(loss, ref_loss) <= ATOL
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert _max_diff(grad, ref_grads[name]) <= ATOL, name


def test_registers_llama(register_plugin):
    record = register_plugin(plugin, name=plugin.PLUGIN)
    assert record.architectures == ["llama"]
    assert record.kind == "architecture"


def test_plugins_list_shows_sloth_llama(plugin_manager, capsys):
    import json

    from sloth_core.cli import main
    from sloth_core.plugins import SlothPluginManager, reset_plugin_manager

    reset_plugin_manager(SlothPluginManager(entry_points=True))  # the fixture restores it
    assert main(["plugins", "list", "--json"]) == 0
    (record,) = [r for r in json.loads(capsys.readouterr().out) if r["name"] == "sloth-llama"]
    assert (record["status"], record["architectures"], record["kind"]) == (
        "active", ["llama"], "architecture",
    )  # fmt: skip


@pytest.mark.parametrize("config_name", CONFIGS)
def test_eval_logits_and_loss_match(manager, config_name):
    reference, patched, report = _pair(manager, config_name)
    assert report.patched == {"rms_norm": 5, "mlp": 2, "attention": 2, "causal_lm": 1}
    ids, labels = _inputs(reference)
    called = set()
    resolve = manager.ops.resolve
    manager.ops.resolve = lambda name, *a: called.add(name) or resolve(name, *a)
    with torch.no_grad():
        expected, got = reference(ids, labels=labels), patched(ids, labels=labels)
    del manager.ops.resolve
    assert called == {"rms_norm", "lora_mlp", "lora_qkv", "rope", "lora_o"} | {
        "fused_linear_cross_entropy"
    }
    assert _max_diff(got.logits, expected.logits) <= ATOL
    assert _max_diff(got.loss, expected.loss) <= ATOL


@pytest.mark.parametrize("config_name", CONFIGS)
def test_lora_training_loss_and_grads_match(manager, config_name):
    reference, patched, _ = _pair(manager, config_name, lora=True)
    ids, labels = _inputs(reference)
    _assert_same_training(reference, patched, input_ids=ids, labels=labels)
    assert patched(input_ids=ids, labels=labels).logits is None  # never the full logits
    # Trainer's gradient-accumulation normaliser reaches the loss.
    inputs = {"input_ids": ids, "labels": labels, "num_items_in_batch": torch.tensor(7)}
    _assert_same_training(reference, patched, **inputs)


def test_padding_matches(manager):
    reference, patched, _ = _pair(manager, lora=True)
    ids, labels = _inputs(reference)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[1, -3:] = 0  # right padding
    labels[mask == 0] = -100
    for attn in ("sdpa", "sloth_attention"):
        register_sloth_attention()
        patched.set_attn_implementation(attn)
        with torch.no_grad():
            expected = reference.eval()(ids, attention_mask=mask).logits
            got = patched.eval()(ids, attention_mask=mask).logits
        real = mask.bool()
        assert _max_diff(got[real], expected[real]) <= ATOL, attn
        _assert_same_training(reference, patched, input_ids=ids, attention_mask=mask, labels=labels)


def test_packed_rows_match_sdpa_and_separate_sequences(manager):
    reference, patched, _ = _pair(manager, lora=True)
    patched.set_attn_implementation(register_sloth_attention())
    ids, labels = _inputs(reference)
    with torch.no_grad():
        # transformers separates packed sequences only when it builds no KV cache.
        expected = reference.eval()(ids, position_ids=PACKED, use_cache=False).logits
        got = patched.eval()(ids, position_ids=PACKED).logits
        assert _max_diff(got, expected) <= ATOL
        for row in range(PACKED.shape[0]):
            starts = [i for i, p in enumerate(PACKED[row].tolist()) if p == 0] + [PACKED.shape[1]]
            for begin, end in zip(starts, starts[1:], strict=False):
                alone = reference(ids[row : row + 1, begin:end]).logits[0]
                assert _max_diff(got[row, begin:end], alone) <= ATOL
    with torch.inference_mode():  # no version counter to cache the packing on
        assert _max_diff(patched(ids, position_ids=PACKED).logits, expected) <= ATOL
    reference.config.use_cache = False  # the reference must separate the rows too
    _assert_same_training(reference, patched, input_ids=ids, position_ids=PACKED, labels=labels)


def test_undo_restores_the_original_forwards(manager):
    reference, patched, report = _pair(manager, lora=True)
    report.undo()
    assert not any(is_patched(m) or "forward" in vars(m) for m in patched.modules())
    ids, labels = _inputs(reference)
    ref_loss, ref_grads = _train_step(reference, input_ids=ids, labels=labels)
    loss, grads = _train_step(patched, input_ids=ids, labels=labels)
    assert torch.equal(loss, ref_loss) and all(torch.equal(grads[n], ref_grads[n]) for n in grads)


def test_patch_then_peft_then_patch_again(manager):
    base = init_tiny_model(tiny_config("llama"))
    reference = _lora(copy.deepcopy(base))
    patched = copy.deepcopy(base)
    (first,) = manager.patch_layers(model=patched)
    patched = _lora(patched)
    (second,) = manager.patch_layers(model=patched)
    assert first.total == 10
    assert second.patched == {"rms_norm": 0, "mlp": 0, "attention": 0, "causal_lm": 0}
    ids, labels = _inputs(reference)
    _assert_same_training(reference, patched, input_ids=ids, labels=labels)


@pytest.mark.parametrize("case", ["dora", "disabled", "merged"])
def test_what_the_ops_cannot_do_runs_peft_itself(manager, case):
    reference, patched, _ = _pair(manager, lora=True, use_dora=case == "dora")
    ids, _ = _inputs(reference)
    for model in (reference, patched):
        model.eval()
        if case == "merged":
            model.merge_adapter()
    with torch.no_grad():
        if case == "disabled":
            with reference.disable_adapter(), patched.disable_adapter():
                expected, got = reference(ids).logits, patched(ids).logits
            assert _max_diff(got, patched(ids).logits) > 1e-3  # the adapters are back on
        else:
            expected, got = reference(ids).logits, patched(ids).logits
    assert _max_diff(got, expected) <= ATOL


def test_eager_attention_generation_and_tuples(manager):
    reference, patched, _ = _pair(manager)
    for model in (reference, patched):
        model.set_attn_implementation("eager")
    ids, _ = _inputs(reference, batch=1, length=6)
    with torch.no_grad():
        expected = reference(ids, output_attentions=True)
        got = patched(ids, output_attentions=True)
        assert _max_diff(got.attentions[0], expected.attentions[0]) <= ATOL
        assert isinstance(patched(ids, return_dict=False), tuple)
        greedy = {"max_new_tokens": 4, "do_sample": False}
        assert torch.equal(patched.generate(ids, **greedy), reference.generate(ids, **greedy))


def test_deepcopy_of_a_patched_model_runs_its_own_weights(manager):
    _, patched, _ = _pair(manager)
    clone = copy.deepcopy(patched)
    with torch.no_grad():
        clone.model.norm.weight.mul_(2)
        ids, _ = _inputs(patched)
        assert _max_diff(clone(ids).logits, patched(ids).logits) > 1e-3


def test_other_model_types_are_left_alone(manager):
    model = init_tiny_model(tiny_config("mistral"))
    assert manager.patch_layers(model=model) == []
    assert not any(is_patched(m) for m in model.modules())


def test_from_pretrained_selects_sloth_attention(manager, make_tiny_model):
    from sloth_core import FastLanguageModel

    path = make_tiny_model("llama")
    model, _ = FastLanguageModel.from_pretrained(str(path))
    assert model.config._attn_implementation == "sloth_attention"
    assert model.sloth_patches[0].patched["attention"] == 2
    model, _ = FastLanguageModel.from_pretrained(str(path), attn_implementation="eager")
    assert model.config._attn_implementation == "eager"


def _fake_varlen(with_options):
    """``varlen_attn`` on the CPU, per sequence through SDPA, with either signature."""

    def run(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=False, window_size=(-1, -1),
            scale=None, enable_gqa=False):  # fmt: skip
        assert (is_causal or window_size == (-1, 0)) and cu_q is cu_k and max_q == max_k
        assert with_options or (scale is None and not enable_gqa)
        bounds = cu_q.tolist()
        pieces = [
            torch.nn.functional.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                is_causal=True, scale=scale, enable_gqa=enable_gqa,
            ).transpose(0, 1)
            for a, b in zip(bounds, bounds[1:], strict=False)
        ]  # fmt: skip
        assert max(b - a for a, b in zip(bounds, bounds[1:], strict=False)) == max_q
        return torch.cat(pieces)

    return run, ({"window_size", "scale", "enable_gqa"} if with_options else {"is_causal"})


@pytest.mark.parametrize("with_options", [True, False], ids=["torch>=2.11", "torch-2.10-api"])
def test_packed_varlen_path(manager, monkeypatch, with_options, request):
    # No GPU here: a CPU stand-in for varlen_attn checks what the path hands it and that
    # its output goes back in transformers' layout. The varlen probes answer for the
    # stand-in: forgotten before and after, so that no other test inherits them.
    for probe in (attention_patch._native_gqa, attention_patch._aligned_to_last_key):
        probe.cache_clear()
        request.addfinalizer(probe.cache_clear)
    fake, params = _fake_varlen(with_options)
    monkeypatch.setattr(attention_patch, "_varlen_attn", fake)
    monkeypatch.setattr(attention_patch, "_VARLEN_PARAMS", params)
    monkeypatch.setattr(attention_patch, "_varlen_usable", lambda query, dropout: True)
    calls = []
    varlen = attention_patch._varlen
    monkeypatch.setattr(attention_patch, "_varlen", lambda *a: calls.append(1) or varlen(*a))
    reference, patched, _ = _pair(manager, lora=True)
    patched.set_attn_implementation(register_sloth_attention())
    ids, labels = _inputs(reference)
    with torch.no_grad():
        expected = reference.eval()(ids, position_ids=PACKED, use_cache=False).logits
        assert _max_diff(patched.eval()(ids, position_ids=PACKED).logits, expected) <= ATOL
    assert len(calls) == 2  # each layer; no mask (eval keeps a cache, so none is built)
    reference.config.use_cache = False
    _assert_same_training(reference, patched, input_ids=ids, position_ids=PACKED, labels=labels)
    assert len(calls) == 4  # training: transformers' block-diagonal mask, recognised
