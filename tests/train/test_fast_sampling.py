"""GRPO's fast sampling (static KV cache, decode steps from fixed buffers): the plain path's
completions, with the adapters active, and the plain path wherever it cannot serve.

The CUDA-graph capture itself needs a GPU (scripts/grpo_sampling_gpu.py); on the CPU the
same steps run eagerly from the same static buffers.
"""

from __future__ import annotations

import pytest
import torch

from sloth_core.api import FastLanguageModel
from sloth_core.inference import graphed
from sloth_core.inference.generation import SamplingOptions
from sloth_core.patches.attention import ATTENTION_PATHS, DECODE_GQA_KWARG, sloth_attention
from sloth_core.patching import unwrap_model
from sloth_core.sdk.stop import stop_token_ids
from sloth_core.train.rollouts import sample

GREEDY = SamplingOptions(max_new_tokens=10)
SAMPLED = SamplingOptions(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=20)


def _policy(path):
    model, tokenizer = FastLanguageModel.from_pretrained(str(path), dtype=torch.float32,
                                                         max_seq_length=64)  # fmt: skip
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8,
                                             use_gradient_checkpointing=True)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at zero: adapters that change the output
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model.train(), tokenizer


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def policy(request, tmp_path_factory):
    """A tiny model of varied config (biases, tied embeddings; a sliding window, which the
    fast path does not replay, left off)."""
    from sloth_core.testing.models import tiny_model
    from sloth_core.testing.varied import config_variations

    arch = request.param
    varied = config_variations(arch, keep=("use_sliding_window",))
    return _policy(tiny_model(arch, tmp_path_factory.mktemp("models") / arch, **varied))


def _sample(policy, options, **kwargs):
    model, tokenizer = policy
    texts = ["What is 2 plus 3?", "Name a colour:"]
    rows = [tokenizer(t)["input_ids"] for t in texts]
    width, pad = max(map(len, rows)), tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # left padding
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return sample(model, tokenizer, ids, mask, num_generations=2, options=options,
                  stop_ids=stop_token_ids(tokenizer, model), seed=3, **kwargs)  # fmt: skip


@pytest.fixture
def decode_calls(monkeypatch):
    """The one-token forwards the fast path ran, and the cache each got."""
    calls = []
    call = graphed._DecodeStep.__call__

    def spy(self, *args, **kwargs):
        if kwargs["input_ids"].shape[1] == 1:
            calls.append(type(kwargs.get("cache", kwargs.get("past_key_values"))).__name__)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(graphed._DecodeStep, "__call__", spy)
    return calls


@pytest.mark.parametrize("options", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_the_static_cache_samples_what_the_plain_path_does(policy, options, decode_calls):
    model, _ = policy
    plain = _sample(policy, options, fast=False)
    assert not decode_calls
    before = ATTENTION_PATHS["decode_gqa"]
    fast = _sample(policy, options, fast=True)
    assert decode_calls == ["StaticCache"] * (options.max_new_tokens - 1)
    assert ATTENTION_PATHS["decode_gqa"] > before  # the tiny models group their KV heads
    assert torch.equal(fast.completion_ids, plain.completion_ids)
    assert torch.equal(fast.completion_mask, plain.completion_mask)
    # Back as it was: the model's own forward, training mode, checkpointing on.
    assert not isinstance(unwrap_model(model).forward, graphed._DecodeStep)
    assert model.training and any(getattr(m, "gradient_checkpointing", False)
                                  for m in model.modules())  # fmt: skip


def test_the_adapters_are_active_while_sampling(policy):
    model, _ = policy
    fast = _sample(policy, GREEDY, fast=True)
    with model.disable_adapter():
        base = _sample(policy, GREEDY, fast=True)
    assert not torch.equal(fast.completion_ids, base.completion_ids)


def test_a_step_that_cannot_be_graphed_samples_on_the_plain_path(policy, monkeypatch):
    model, _ = policy
    plain = _sample(policy, SAMPLED, fast=False)

    def refuse(self, *args, **kwargs):
        if kwargs["input_ids"].shape[1] == 1:
            raise graphed.GraphUnavailable("a host sync")
        return self.forward(*args, **kwargs)

    monkeypatch.setattr(graphed._DecodeStep, "__call__", refuse)
    cuda = torch.device("cuda")  # the switch's logic only; nothing runs there
    monkeypatch.setenv(graphed.ENV, "1")
    assert graphed.fast_sampling_enabled(model, cuda)
    try:
        with pytest.warns(UserWarning, match="a host sync"):
            again = _sample(policy, SAMPLED, fast=True)
        assert not graphed.fast_sampling_enabled(model, cuda)  # not tried again
    finally:
        unwrap_model(model).__dict__.pop(graphed._FAILED, None)
    assert torch.equal(again.completion_ids, plain.completion_ids)  # same seed, same draws


def test_fast_sampling_serves_cuda_unless_turned_off(policy, monkeypatch):
    model, _ = policy
    cuda = torch.device("cuda")
    monkeypatch.delenv(graphed.ENV, raising=False)
    assert graphed.fast_sampling_enabled(model, cuda)  # the default since its GPU check
    assert not graphed.fast_sampling_enabled(model, torch.device("cpu"))
    for off in ("0", "off", "False"):
        monkeypatch.setenv(graphed.ENV, off)
        assert not graphed.fast_sampling_enabled(model, cuda)
    monkeypatch.setenv(graphed.ENV, "1")
    assert graphed.fast_sampling_enabled(model, cuda)


def _cache(model_type: str, **config):
    from transformers import AutoConfig
    from transformers.cache_utils import StaticCache

    config = AutoConfig.for_model(model_type, hidden_size=16, intermediate_size=32,
                                  num_attention_heads=2, num_key_value_heads=1,
                                  num_hidden_layers=2, vocab_size=32, **config)  # fmt: skip
    return StaticCache(config=config, max_cache_len=8)


def test_decode_inputs_that_change_shape_are_refused():
    step = graphed._DecodeStep(lambda **kwargs: kwargs["input_ids"] + 1, graphs=False)
    one, cache = torch.zeros(2, 1, dtype=torch.long), _cache("llama")
    first = step(input_ids=one, cache=cache, mask={"full": torch.ones(2, 4)})
    second = step(input_ids=one + 4, cache=cache, mask={"full": torch.zeros(2, 4)})
    assert first.tolist() == [[1], [1]] and second.tolist() == [[5], [5]]
    with pytest.raises(graphed.GraphUnavailable, match="changed shape"):
        step(input_ids=torch.zeros(3, 1, dtype=torch.long), cache=cache,
             mask={"full": torch.ones(3, 4)})  # fmt: skip
    assert step(input_ids=torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5)  # a prompt


def test_only_a_full_attention_static_cache_is_replayed():
    """A sliding window's static layers keep their length on the host: no replay."""
    one = torch.zeros(1, 1, dtype=torch.long)
    step = graphed._DecodeStep(lambda **kwargs: kwargs["input_ids"], graphs=False)
    with pytest.raises(graphed.GraphUnavailable, match="StaticSlidingWindowLayer"):
        step(input_ids=one, cache=_cache("mistral", sliding_window=4))
    with pytest.raises(graphed.GraphUnavailable, match="no static KV cache"):
        step(input_ids=one)


def test_one_token_grouped_query_attention_copies_nothing_and_computes_the_same():
    torch.manual_seed(0)
    module = torch.nn.Module()
    query = torch.randn(3, 8, 1, 16)
    key, value = torch.randn(3, 2, 10, 16), torch.randn(3, 2, 10, 16)
    mask = torch.rand(3, 1, 1, 10) > 0.3
    mask[..., 0] = True
    before = ATTENTION_PATHS["decode_gqa"]
    expected, _ = sloth_attention(module, query, key, value, mask, scaling=0.3)
    got, _ = sloth_attention(module, query, key, value, mask, scaling=0.3,
                             **{DECODE_GQA_KWARG: True})  # fmt: skip
    assert ATTENTION_PATHS["decode_gqa"] == before + 1
    assert got.shape == expected.shape == (3, 1, 8, 16)
    torch.testing.assert_close(got, expected)


class _FakeGraph:
    """CUDA-graph stand-in: what the forward records while "capturing" runs on replay."""

    capturing: _FakeGraph | None = None

    def __init__(self):
        self.recorded = []

    def replay(self):
        for kernel in self.recorded:
            kernel()


@pytest.fixture
def fake_cuda(monkeypatch):
    import contextlib

    @contextlib.contextmanager
    def graph(g, **_):
        _FakeGraph.capturing = g
        try:
            yield
        finally:
            _FakeGraph.capturing = None

    class Stream:
        def wait_stream(self, other):
            pass

    for name, value in {"CUDAGraph": _FakeGraph, "graph": graph, "Stream": Stream,
                        "current_stream": Stream, "stream": lambda s: contextlib.nullcontext(),
                        "device": lambda d: contextlib.nullcontext()}.items():  # fmt: skip
        monkeypatch.setattr(torch.cuda, name, value)


def test_steps_after_the_first_replay_the_capture_from_the_static_buffers(fake_cuda):
    calls = []

    def forward(**kwargs):  # a "kernel" reading its inputs' memory, writing its output's
        calls.append("capture" if _FakeGraph.capturing else "eager")
        ids, out = kwargs["input_ids"], torch.empty(kwargs["input_ids"].shape)
        if _FakeGraph.capturing:
            _FakeGraph.capturing.recorded.append(lambda: out.copy_(ids * 2))
        return out.copy_(ids * 2)

    cache = _cache("llama")
    step = graphed._DecodeStep(forward, graphs=True)
    outs = [step(input_ids=torch.full((2, 1), float(i)), cache=cache).clone() for i in range(4)]
    assert calls == ["eager", "capture"]  # then replays only: no Python forward
    assert [o[0, 0].item() for o in outs] == [0.0, 2.0, 4.0, 6.0]
    step.release()
    assert step.graph is None and step.output is None


def test_a_capture_that_fails_is_reported_as_unavailable(fake_cuda):
    def forward(**kwargs):
        if _FakeGraph.capturing:
            raise RuntimeError("operation not permitted when stream is capturing")
        return kwargs["input_ids"]

    step = graphed._DecodeStep(forward, graphs=True)
    with pytest.raises(graphed.GraphUnavailable, match="not permitted"):
        step(input_ids=torch.zeros(2, 1), cache=_cache("llama"))
