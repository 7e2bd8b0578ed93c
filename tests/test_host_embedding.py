"""The frozen input embedding in pinned host memory (sloth_core.host_embedding).

Which embeddings may move is checked here on the CPU; the move itself (the GPU reading the
host buffer in place) only exists on CUDA: the ``gpu`` test trains, saves, copies and
graph-captures a moved model against one that kept its embedding on the device.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from sloth_core import FastLanguageModel
from sloth_core.host_embedding import (
    input_embedding_on_host,
    keep_input_embedding_on_host,
    movable_embedding,
)
from sloth_core.testing.models import init_tiny_model, tiny_config, tiny_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora(tie: bool, **options):
    base = init_tiny_model(tiny_config("llama", tie_word_embeddings=tie))
    options.setdefault("target_modules", TARGETS)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, **options))


def test_only_a_frozen_untied_embedding_may_move():
    model = _lora(tie=False)
    assert movable_embedding(model, on_cuda=False) is model.get_input_embeddings()
    # Tied: the lm_head reads every row every step.
    assert movable_embedding(_lora(tie=True), on_cuda=False) is None
    # Trained beside LoRA (modules_to_save wraps it), or LoRA on it: it stays.
    assert movable_embedding(_lora(False, modules_to_save=["embed_tokens"]), on_cuda=False) is None
    on_embedding = _lora(False, target_modules=["embed_tokens", "q_proj"])
    assert movable_embedding(on_embedding, on_cuda=False) is None
    # Full fine-tuning trains it.
    full = init_tiny_model(tiny_config("llama", tie_word_embeddings=False))
    assert full.get_input_embeddings().weight.requires_grad
    assert movable_embedding(full, on_cuda=False) is None


def test_on_the_cpu_nothing_moves(tmp_path):
    path = tiny_model("llama", tmp_path / "m", tie_word_embeddings=False)
    model, _ = FastLanguageModel.from_pretrained(str(path), dtype=torch.float32)
    before = model.get_input_embeddings().weight
    model = FastLanguageModel.get_peft_model(model, r=4, embedding_on_host=True)
    assert not input_embedding_on_host(model)
    assert model.get_input_embeddings().weight is before
    assert not keep_input_embedding_on_host(model)


def _train(model, batches):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_moved_embedding_trains_saves_and_graphs_as_on_the_device(tmp_path):
    from safetensors.torch import load_file

    path = tiny_model("llama", tmp_path / "m", dtype=torch.bfloat16, tie_word_embeddings=False)
    models = {}
    for on_host in (False, True):
        model, _ = FastLanguageModel.from_pretrained(
            str(path), dtype=torch.bfloat16, device_map="cuda"
        )
        models[on_host] = FastLanguageModel.get_peft_model(
            model, r=4, lora_alpha=8, embedding_on_host=False, random_state=7
        )
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    assert keep_input_embedding_on_host(models[True])
    moved = torch.cuda.memory_allocated() - before
    for on_host, model in models.items():
        weight = model.get_input_embeddings().weight
        assert input_embedding_on_host(model) is on_host
        assert weight.is_cuda  # what code that asks the model's device sees
    # Its bytes left the device (the allocator rounds blocks up).
    assert weight.nbytes <= -moved < weight.nbytes + 2**20, (moved, weight.nbytes)
    assert not keep_input_embedding_on_host(models[True])  # moved once
    device_weight = models[False].get_input_embeddings().weight
    host_weight = models[True].get_input_embeddings().weight
    assert torch.equal(host_weight.cpu(), device_weight.cpu())
    assert torch.equal(host_weight.clone(), device_weight)

    vocab = device_weight.shape[0]
    gen = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(0, vocab, (2, 37), device="cuda", generator=gen) for _ in range(3)]
    losses = {k: _train(m, batches) for k, m in models.items()}
    assert losses[True] == losses[False], losses

    # A CUDA graph reads the host rows as any kernel does: replayed on new ids.
    embedding = models[True].get_input_embeddings()
    static = torch.zeros(4, 9, dtype=torch.long, device="cuda")
    with torch.no_grad():
        embedding(static)  # warm-up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = embedding(static)
        static.copy_(torch.randint(0, vocab, static.shape, device="cuda", generator=gen))
        graph.replay()
        assert torch.equal(out, models[False].get_input_embeddings()(static))

    # Saving merged weights copies the embedding out as from device memory.
    merged = tmp_path / "merged"
    models[True].merge_and_unload().save_pretrained(merged)
    saved = load_file(str(merged / "model.safetensors"))
    assert torch.equal(saved["model.embed_tokens.weight"], device_weight.cpu())
