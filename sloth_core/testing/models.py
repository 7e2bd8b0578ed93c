"""Tiny, randomly initialised causal LMs of the architectures sloth supports, for tests.

Nothing is downloaded: configs come from :data:`TINY_CONFIGS`, weights from the model's own
initialiser under a fixed seed, and the tokenizer from :func:`build_tokenizer`. Each config
switches on the features that make its architecture different (biases, softcapping,
sliding windows, partial rotary, fused projections...), so parity tests exercise them.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .tokenizer import build_tokenizer

__all__ = ["TINY_CONFIGS", "init_tiny_model", "tiny_config", "tiny_model"]

# Off transformers' defaults (10000, 1e-6), so a kernel with its own rope base or norm eps
# fails parity; an eps of 3e-3 moves a unit-variance norm's output by ~1.5e-3.
_DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 20000.0}

_COMMON_FIELDS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA: kernels must repeat k/v heads correctly
    "head_dim": 16,
    "max_position_embeddings": 256,
    # HF's usual 0.02 is about 1/sqrt(hidden) for widths near 2500; at width 64 that scale
    # is 0.125. It keeps activations, attention scores and logits of order one, so
    # softcapping and numerics are exercised rather than everything sitting near zero.
    "initializer_range": 0.125,
    "rms_norm_eps": 3e-3,
    "rope_parameters": _DEFAULT_ROPE,
}


def _common(**fields: Any) -> dict[str, Any]:
    # Deep copies, so that editing one arch's nested dicts never changes another's.
    return copy.deepcopy({**_COMMON_FIELDS, **fields})


# Alternating local/global layers, small enough that ordinary test prompts cross the window.
_SLIDING_WINDOW = 16
_ALTERNATING = ["sliding_attention", "full_attention"]


def _moe(**fields: Any) -> dict[str, Any]:
    # Every tiny MoE: 4 experts of width 32 (the fields' names differ per architecture),
    # top 2, the router-loss coefficient off its default (0.001); output_router_logits
    # stays off unless a test asks, as in real checkpoints.
    return _common(num_experts_per_tok=2, router_aux_loss_coef=0.05, **fields)


#: Mixtral's and gpt-oss's names for 4 experts of width 32.
_LOCAL_EXPERTS = {"num_local_experts": 4, "intermediate_size": 32}

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": _common(),
    # Mistral's sliding window applies to every layer.
    "mistral": _common(sliding_window=_SLIDING_WINDOW),
    # Qwen2 always has q/k/v biases; they are perturbed away from zero at init.
    "qwen2": _common(),
    # Qwen3 has q_norm/k_norm on every head (perturbed at init like all norms).
    "qwen3": _common(),
    # Gemma: (1 + w) RMSNorm, sqrt(hidden)-scaled embeddings, GeGLU (tanh), tied embeddings.
    "gemma": _common(hidden_act="gelu_pytorch_tanh"),
    # Caps far below Gemma 2's real 50/30 so that they bite at this model's logit scale.
    "gemma2": _common(
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=16,
        sliding_window=_SLIDING_WINDOW,
        layer_types=_ALTERNATING,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
        # Some transformers 5 releases (5.17) default Gemma 2 to sdpa, which silently drops
        # the attention softcap; in-memory references must be eager to be correct. Not
        # saved to config.json: load a written model with attn_implementation="eager".
        attn_implementation="eager",
    ),
    # Gemma 3: local layers use a smaller rope base than global ones, plus q/k norms.
    "gemma3_text": _common(
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=16,
        sliding_window=_SLIDING_WINDOW,
        layer_types=_ALTERNATING,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 15000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 400000.0},
        },
    ),
    # Phi-3: fused qkv_proj and gate_up_proj (built in), rotary on half of each head.
    # Its config has no head_dim field: it is hidden_size // num_attention_heads (16).
    "phi3": {
        **{k: v for k, v in _common().items() if k != "head_dim"},
        "original_max_position_embeddings": 256,
        "rope_parameters": {**_DEFAULT_ROPE, "partial_rotary_factor": 0.5},
    },
    # Qwen3-MoE: layer 0 is a dense MLP (mlp_only_layers), layer 1 sparse; the top 2 not
    # renormalised (norm_topk_prob is off by default).
    "qwen3_moe": _moe(num_experts=4, moe_intermediate_size=32, mlp_only_layers=[0]),
    # Mixtral: every layer sparse, top 2 renormalised, Mistral's sliding window.
    # router_jitter_noise stays 0: noise is random.
    "mixtral": _moe(**_LOCAL_EXPERTS, sliding_window=_SLIDING_WINDOW),
    # gpt-oss: attention sinks (one learned logit per head), layer 0 sliding (window 16),
    # layer 1 full; q/k/v/o biases; top 2 over a router with a bias, biased experts; the
    # clamped SwiGLU with its alpha off the default and a limit low enough to clamp at
    # this scale.
    "gpt_oss": _moe(
        **_LOCAL_EXPERTS,
        sliding_window=_SLIDING_WINDOW,
        layer_types=_ALTERNATING,
        swiglu_alpha=1.5,
        swiglu_limit=1.5,
    ),
}

_DEFAULT_TOKENIZER_SIZE = 512


def _default_tokenizer(vocab_size: int | None) -> PreTrainedTokenizerBase:
    # A model vocab below 512 gets a smaller tokenizer rather than an error.
    if vocab_size is None:
        return build_tokenizer(_DEFAULT_TOKENIZER_SIZE)
    return build_tokenizer(min(_DEFAULT_TOKENIZER_SIZE, vocab_size))


def _check_arch(arch: str) -> None:
    if arch not in TINY_CONFIGS:
        raise ValueError(
            f"unknown architecture {arch!r}; supported: {', '.join(sorted(TINY_CONFIGS))}"
        )


def _odd_vocab(tokenizer_len: int) -> int:
    # Strictly larger than the tokenizer (like real checkpoints, whose vocab is padded
    # past the tokenizer) and odd, so kernels that assume a multiple of 8 or 64 fail here.
    return tokenizer_len + 1 if tokenizer_len % 2 == 0 else tokenizer_len + 2


def tiny_config(
    arch: str,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    model_type: str | None = None,
    **overrides: Any,
) -> PreTrainedConfig:
    """Return the tiny config of ``arch`` without building or writing a model.

    For parity tests that build models in memory (see :func:`init_tiny_model`).

    Args:
        arch: a ``model_type`` in :data:`TINY_CONFIGS`.
        tokenizer: the tokenizer whose bos/eos/pad ids and size the config follows; the
            default one from :func:`build_tokenizer` when ``None``.
        model_type: build a config of this ``model_type`` (any transformers knows) from
            ``arch``'s fields, for a model sloth's tests do not cover that is shaped like
            one they do: ``tiny_config("llama", model_type="cwm")``. ``arch`` by default.
        **overrides: config fields that replace the defaults, e.g. ``vocab_size=1007``,
            ``tie_word_embeddings=False`` or ``rope_parameters={...}``. Dropout
            probabilities are 0 unless given here.

    Raises:
        ValueError: for an unknown ``arch``, or a ``vocab_size`` below the tokenizer's size.
    """
    _check_arch(arch)
    vocab_size = overrides.pop("vocab_size", None)
    if tokenizer is None:
        tokenizer = _default_tokenizer(vocab_size)
    if vocab_size is None:
        vocab_size = _odd_vocab(len(tokenizer))
    elif vocab_size < len(tokenizer):
        raise ValueError(
            f"vocab_size={vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)"
        )

    fields = copy.deepcopy(TINY_CONFIGS[arch])
    fields.update(
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    fields.update(copy.deepcopy(overrides))
    config = AutoConfig.for_model(model_type or arch, **fields)
    # Dropout is random, so no patched model can agree with an unpatched one under it; a
    # few model types default to some (Seed-OSS): tiny configs have none unless asked.
    for name, value in config.to_dict().items():
        dropout = "dropout" in name or "pdrop" in name
        if dropout and name not in fields and isinstance(value, float) and value:
            setattr(config, name, 0.0)
    return config


def _perturb(model: torch.nn.Module, seed: int) -> None:
    # Norm weights start at a constant (1, or 0 for Gemma's 1 + w) and linear biases at 0:
    # a kernel that ignored them, or used the wrong convention, would still match. Small
    # seeded noise makes them matter. A private generator leaves the global RNG alone.
    # Offset so the noise is not a replay of the stream that initialised the weights.
    generator = torch.Generator().manual_seed(seed + 0x5107)
    with torch.no_grad():
        for _, module in sorted(model.named_modules(), key=lambda item: item[0]):
            is_norm = "norm" in type(module).__name__.lower()
            # Biases of 3-D expert stacks too (gpt-oss's gate_up_proj_bias, down_proj_bias).
            biases = [name for name in module._parameters if name.endswith("_bias")]
            names = ("weight", "bias") if is_norm else ("bias", *biases)
            for name in names:
                param = module._parameters.get(name)
                if isinstance(param, torch.nn.Parameter):
                    noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                    param.add_((0.1 * noise).to(param.dtype))


def init_tiny_model(
    config: PreTrainedConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """Build a randomly initialised causal LM from ``config``, in memory, deterministically.

    Weights come from the model's own initialiser under ``torch.manual_seed(seed)``
    (in a forked RNG, so the caller's random state is untouched), then norm weights and
    linear biases get small seeded noise. The same config and seed give bit-identical
    weights. The model is returned in eval mode, cast to ``dtype``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Initialise in float32 so that the values do not depend on dtype, then cast.
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _perturb(model, seed)
    model = model.to(dtype)
    model.config.dtype = dtype
    return model.eval()


def tiny_model(
    arch: str,
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    vocab_size: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    overwrite: bool = False,
    **config_overrides: Any,
) -> Path:
    """Write a tiny random causal LM of architecture ``arch`` and its tokenizer to ``path``.

    The directory is an ordinary Hugging Face checkpoint (config, safetensors weights,
    generation config, tokenizer files with the chat template), loadable with
    ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.

    Args:
        arch: a ``model_type`` in :data:`TINY_CONFIGS`.
        path: the directory to write; created if missing.
        seed: the initialisation seed; the same seed gives bit-identical weights.
        dtype: the dtype the weights are saved in.
        vocab_size: the model's vocabulary size; by default the next odd number above the
            tokenizer's size. Must be at least the tokenizer's size.
        tokenizer: the tokenizer to save and take special-token ids from;
            ``build_tokenizer()`` (smaller when ``vocab_size`` is below 512) by default.
        overwrite: allow writing into a non-empty directory (files of the same name are
            replaced, others are left in place).
        **config_overrides: config fields that replace the defaults (see :func:`tiny_config`).

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Raises:
        ValueError: for an unknown ``arch`` or a ``vocab_size`` smaller than the tokenizer.
        FileExistsError: if ``path`` is a non-empty directory and ``overwrite`` is false.
    """
    _check_arch(arch)
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True to write into it anyway")

    if tokenizer is None:
        tokenizer = _default_tokenizer(vocab_size)
    if vocab_size is not None:
        config_overrides["vocab_size"] = vocab_size
    config = tiny_config(arch, tokenizer=tokenizer, **config_overrides)
    model = init_tiny_model(config, seed=seed, dtype=dtype)

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def pretrain(
    model: torch.nn.Module,
    tokenizer: Any,
    lines: list[str],
    *,
    steps: int,
    batch_size: int,
    window: int,
    learning_rate: float,
    warmup_steps: int | None = None,
    weight_decay: float = 0.0,
) -> torch.nn.Module:
    """Train every weight of ``model`` in place on ``lines`` (each followed by EOS, joined):
    next-token loss on random ``window``-token slices, AdamW, a fixed generator (seed 0).

    ``warmup_steps``: a linear warm-up, then a linear decay to a tenth at ``steps``; ``None``
    keeps the learning rate constant. A random model's logits are flat and pass every
    rounding error on at full gain; a few steps make it measure like a trained one.
    """
    eos = tokenizer.eos_token_id
    ids = torch.tensor([i for line in lines for i in [*tokenizer(line)["input_ids"], eos]])
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    schedule = None
    if warmup_steps is not None:
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: min(1.0, (step + 1) / warmup_steps) * max(0.1, 1 - step / steps),
        )
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - window, (batch_size,), generator=generator)
        batch = torch.stack([ids[s : s + window] for s in starts.tolist()])
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        optimizer.zero_grad()
    return model
