"""Helpers of sloth-gguf's tests (a module of its own: every plugin has a conftest)."""

from __future__ import annotations

import copy
import json
import os
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from sloth_core.sdk import llama_cpp

# Tiny models: one thread is the fastest, and the machine may be shared.
os.environ.setdefault("SLOTH_LLAMA_CPP_THREADS", "1")

#: Mixtures of experts, by model type: the dense tiny config each starts from and its expert
#: fields (4 experts of width 32, top 2, renormalised: llama.cpp's qwen3moe graph always
#: renormalises, and has experts in every layer). Built from the dense config with
#: ``model_type``, so that the export's refusals (sloth's own tiny Qwen3-MoE has a dense
#: layer and norm_topk_prob off) do not decide what these tests cover.
MOE = {
    "qwen3_moe": ("qwen3", {"num_experts": 4, "num_experts_per_tok": 2,
                            "moe_intermediate_size": 32, "norm_topk_prob": True}),
    "mixtral": ("llama", {"num_local_experts": 4, "num_experts_per_tok": 2,
                          "intermediate_size": 32}),
}  # fmt: skip
#: The small LMs' expert width (SMALL_LM's MLP width split over the 4 experts).
SMALL_MOE = {"qwen3_moe": {"moe_intermediate_size": 128}, "mixtral": {"intermediate_size": 128}}
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", *MOE]
#: Mistral's tiny sliding window: llama.cpp's llama graph has none (see test_gguf_logits).
MISTRAL_WINDOW = 16
#: The test prompts start with this many corpus lines; small LMs train on the others.
PROMPT_LINES = 3

#: A small language model's proportions (see test_gguf_logits): 64-wide heads with GQA, an
#: MLP twice as wide, two layers, and transformers' own initialiser scale, which every one
#: of these architectures' configs ships (the tiny models use 1/sqrt(64) instead).
SMALL_LM = {
    "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
    "initializer_range": 0.02,
}  # fmt: skip
#: Its training: AdamW steps of 8 windows of 64 tokens, enough to learn the corpus' token
#: statistics (loss 6.24 -> about 5.3 nats, the corpus' unigram entropy).
SMALL_LM_STEPS, SMALL_LM_LR, SMALL_LM_BATCH, SMALL_LM_WINDOW = 10, 1e-3, 8, 64

#: Rope scalings of tiny Llama models: linear and yarn travel as metadata, Llama 3.1's as
#: the rope_freqs tensor.
ROPE_SCALING = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "llama3": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}  # fmt: skip

#: llama.cpp made unavailable, as on a machine without llama-cpp-python: the pure-Python
#: level of --verify alone.
ABSENT = types.SimpleNamespace(available=lambda: False)


def verify_reload(path, model, tokenizer, manager, **options):
    """``--verify`` of the GGUF at ``path`` without llama.cpp (its pure-Python level)."""
    from sloth_core.verify import verify_export

    return verify_export(
        path, model, tokenizer, format="gguf", manager=manager, runner=ABSENT, **options
    )


requires_llama_cpp = pytest.mark.skipif(
    not llama_cpp.available(), reason=f"{llama_cpp.PACKAGE} is not installed"
)


#: Texts whose tokenization is easy to get wrong: spaces, digits, contractions, unicode.
SAMPLES = [
    "Hello world", "  leading spaces", "trailing  ", "tabs\tand\nnewlines\n\n\nx",
    "numbers 12345 and 3.14159", "I'm we'll they'd SHE'S don't", "x  \n  y", " ", "\n",
    "émigré café naïve Ωmega 日本語 🙂", "ꙮ rare 𝔘 chars ✓",
]  # fmt: skip


def tokenizer_texts(tokenizer=None, specials: bool = True) -> list[str]:
    from sloth_core.testing.tokenizer import corpus_lines

    texts = [*corpus_lines()[::10], *SAMPLES]
    if specials and tokenizer is not None:
        chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
        texts += [tokenizer.apply_chat_template(chat, tokenize=False), "a<|pad|>b<|im_end|>"]
    return texts


def relative_error(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """max |got - want| / max |want|, the worst prompt of the batch."""
    return max(float(np.abs(g - w).max() / np.abs(w).max()) for g, w in zip(got, want, strict=True))


def torch_logits(model: torch.nn.Module, prompts: list[list[int]]) -> list[np.ndarray]:
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].float().numpy() for ids in prompts]


def tiny(arch: str, **overrides):
    """The tiny random model of ``arch`` in float32, transformers' eager attention."""
    from sloth_core.testing import init_tiny_model, tiny_config

    model_type = overrides.pop("model_type", arch)
    dense, fields = MOE.get(arch, (arch, {}))
    config = tiny_config(
        dense, model_type=model_type, attn_implementation="eager", **{**fields, **overrides}
    )
    return init_tiny_model(config)


def small_lm(arch: str, tokenizer) -> torch.nn.Module:
    """A small language model of ``arch``: :data:`SMALL_LM` proportions, then a few steps
    of training on sloth's corpus (not on the lines the test prompts use), in float32.

    Each architecture keeps its features; Gemma 2 gets its real softcaps (50, 30) and the
    Gemmas their real ``query_pre_attn_scalar`` (the head width): the tiny models' much
    lower caps, there to bite at a random model's logit scale, would squash a trained one.
    """
    from sloth_core.testing.models import pretrain
    from sloth_core.testing.tokenizer import corpus_lines

    fields = {**SMALL_LM, **SMALL_MOE.get(arch, {})}
    if arch == "phi3":  # no head_dim field: hidden_size / num_attention_heads (64)
        del fields["head_dim"]
    if arch in ("gemma2", "gemma3_text"):
        fields["query_pre_attn_scalar"] = SMALL_LM["head_dim"]
    if arch == "gemma2":
        fields.update(attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    model = tiny(arch, **fields)
    pretrain(
        model, tokenizer, corpus_lines()[PROMPT_LINES:], steps=SMALL_LM_STEPS,
        batch_size=SMALL_LM_BATCH, window=SMALL_LM_WINDOW, learning_rate=SMALL_LM_LR,
    )  # fmt: skip
    return model.eval()


def export(model, tokenizer, path: Path, quantization: str, **options) -> Path:
    from sloth_gguf.writer import export_gguf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mistral's sliding-window warning, tested on its own
        return export_gguf(model, tokenizer, path, {"quantization": quantization, **options}).path


def prompts_for(arch: str, prompts: list[list[int]]) -> list[list[int]]:
    # llama.cpp has no sliding window for Mistral: compare within the window.
    return [p[:MISTRAL_WINDOW] for p in prompts] if arch == "mistral" else prompts


def rounded_like(model: torch.nn.Module, quantization: str) -> torch.nn.Module:
    """A copy of ``model`` whose matrices hold what a ``quantization`` GGUF stores.

    Matrices (and the experts' stacks of them) are quantized along their rows (the input
    dimension), as GGUF blocks are; llama.cpp's q/k row permutation moves whole rows, so it
    does not change the values. The experts' router stays float32, as the writer keeps it.
    """
    import gguf

    qtype = gguf.GGMLQuantizationType[quantization.upper()]
    rounded = copy.deepcopy(model)
    params = {id(p): (n, p) for n, p in rounded.named_parameters()}.values()
    with torch.no_grad():
        for name, param in params:
            if param.ndim >= 2 and not name.endswith("mlp.gate.weight"):
                data = param.detach().float().numpy()
                back = gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype)
                param.copy_(torch.from_numpy(np.ascontiguousarray(back.reshape(data.shape))))
    return rounded


def spm_tokenizer(vocab_size: int = 400):
    """A Llama 2 style SentencePiece BPE tokenizer (``▁`` spaces, ``<0xNN>`` byte fallback).

    Trained on sloth's corpus with words kept whole; its merges are then listed as
    transformers' SentencePiece converter lists them: every split of every piece into two
    pieces, in the order of the resulting piece, so that BPE by merge rank tokenizes like
    SentencePiece's highest-score-first merging (which llama.cpp implements).
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    from sloth_core.testing.tokenizer import corpus_lines

    specials = ["<unk>", "<s>", "</s>"]
    byte_pieces = [f"<0x{i:02X}>" for i in range(256)]
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + len(byte_pieces), min_frequency=2,
        special_tokens=specials + byte_pieces, show_progress=False,
    )  # fmt: skip
    backend.train_from_iterator(list(corpus_lines()), trainer=trainer)
    data = json.loads(backend.to_str())
    vocab = data["model"]["vocab"]
    merges = sorted(
        (vocab[piece], vocab[piece[:i]], vocab[piece[i:]], [piece[:i], piece[i:]])
        for piece in vocab
        if piece not in specials and piece not in byte_pieces
        for i in range(1, len(piece))
        if piece[:i] in vocab and piece[i:] in vocab
    )
    data["model"]["merges"] = [m[3] for m in merges]
    data["added_tokens"] = [a for a in data["added_tokens"] if a["content"] in specials]
    data["pre_tokenizer"] = None  # as in Llama 2's tokenizer.json: the normalizer does it
    backend = Tokenizer.from_str(json.dumps(data))
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )  # fmt: skip


def stored_model(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """A copy of a llama-type ``model`` holding the weights stored in the GGUF at ``path``,
    dequantized and with the q/k rows put back in Hugging Face's order (whatever the
    types llama.cpp's quantizer chose), to measure what the format itself costs."""
    import gguf
    from sloth_gguf.architectures import TensorConverter, architecture_for

    config = model.config
    converter = TensorConverter(config, architecture_for(config))
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in copied.named_parameters():
            tensor = stored[converter.gguf_name(name)]
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(param.shape)
            values = torch.from_numpy(np.array(values, dtype=np.float32))  # a writable copy
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = (
                    config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
                )
                rows = values.shape[
                    0
                ]  # undo the interleaving: (x0, y0, x1, y1, ...) -> (x..., y...)
                values = (
                    values.reshape(heads, rows // heads // 2, 2, -1)
                    .swapaxes(1, 2)
                    .reshape(values.shape)
                )
            param.copy_(values)
    return copied
