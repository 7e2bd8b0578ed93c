"""``sloth train --demo``: a fine-tune that runs anywhere in under a minute, nothing downloaded.

The model is a small Llama built from the bundled ``demo_model.json`` with a byte-level BPE
tokenizer trained on the spot (:func:`sloth_core.testing.tokenizer.build_tokenizer`), then
pretrained briefly on sloth's bundled corpus (about 15 s on one CPU core), and written once
to the cache; the data is the bundled instruction set (arithmetic, capitals, antonyms,
plurals...). The options are ordinary ``sloth train`` options, so every flag still applies
on top of them.

Why pretrained, and why these proportions: every real fine-tune starts from a pretrained
model, and the exports must behave on the demo as they do on one. A random base with a
1/sqrt(width) initialiser passes every rounding error on at full gain and leaves the
fine-tune unsure of most tokens (q4_k_m: mean KL divergence 0.13, top-1 agreement 67%; q8_0
and even f16 past their tolerances), and a 128-wide model has rows too short for llama.cpp's
k-quants (256-element blocks: q4_k_m fell back to q5_0). Pretrained and 256 wide, it
measures like a real model (see docs/export.md).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Any

DEMO_OPTIONS: dict[str, Any] = {
    "max_seq_length": 128,
    "data_format": "alpaca",
    "eval_fraction": 0.1,
    "r": 32,
    "lora_alpha": 64,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "num_train_epochs": 6,
    "learning_rate": 3e-3,
    "warmup_steps": 10,
    "lr_scheduler_type": "cosine",
    "gradient_checkpointing": "off",
    "output_dir": "sloth-demo",
    "save_method": "merged_16bit",
    "logging_steps": 10,
    "seed": 0,
    # Matrices this small gain nothing from more threads, and on a busy machine several
    # threads contend badly (100x slower measured on 2 shared cores).
    "cpu_threads": 1,
}


def demo_dataset() -> Path:
    """The bundled instruction data set (JSONL, alpaca format)."""
    return Path(str(resources.files("sloth_core.testing") / "data" / "tiny_instructions.jsonl"))


#: The recipe of the cached model, kept next to it: a changed ``demo_model.json`` rebuilds it.
_STAMP = "sloth-demo-model.json"


def demo_model(cache: Path | None = None) -> Path:
    """The demo base model, built once into ``$SLOTH_CACHE/demo-model`` (or ``~/.cache/sloth``)."""
    from sloth_core.testing.models import tiny_model

    cache = cache or Path(os.environ.get("SLOTH_CACHE", Path.home() / ".cache" / "sloth"))
    path = cache / "demo-model"
    recipe = (resources.files("sloth_core.train") / "demo_model.json").read_text()
    if _built_from(path) == recipe:
        return path
    config = json.loads(recipe)
    arch = config.pop("model_type")
    pretraining = config.pop("pretraining")
    print(
        f"sloth demo: building the base model in {path} (once): a {arch} of "
        f"{config['num_hidden_layers']} layers, {config['hidden_size']} wide, pretrained "
        f"{pretraining['steps']} steps on sloth's corpus",
        file=sys.stderr,
    )
    staging = path.with_name(path.name + f".{os.getpid()}.tmp")
    tiny_model(arch, staging, overwrite=True, **config)
    _pretrain(staging, **pretraining)
    (staging / _STAMP).write_text(recipe)
    if path.exists() and _built_from(path) != recipe:  # an older recipe's model
        shutil.rmtree(path, ignore_errors=True)
    try:
        os.replace(staging, path)
    except OSError:  # another process put it there first
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _built_from(path: Path) -> str | None:
    stamp = path / _STAMP
    return stamp.read_text() if (path / "config.json").is_file() and stamp.is_file() else None


def _pretrain(
    path: Path,
    *,
    steps: int,
    batch_size: int,
    window: int,
    learning_rate: float,
    warmup_steps: int,
    weight_decay: float,
) -> None:
    """Train every weight of the fresh model at ``path`` on the bundled corpus, in place:
    next-token loss on random windows, AdamW, linear warmup then decay to a tenth."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sloth_core.testing.models import pretrain
    from sloth_core.testing.tokenizer import corpus_lines

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo's training: small matrices, a shared machine
    try:
        pretrain(model, tokenizer, list(corpus_lines()), steps=steps, batch_size=batch_size,
                 window=window, learning_rate=learning_rate, warmup_steps=warmup_steps,
                 weight_decay=weight_decay)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(path)


#: ``--demo --method dpo|orpo|simpo|kto``: the bundled preference set instead, learnt in
#: about a minute (the rejected answers are wrong and end with a full stop).
PREFERENCE_DEMO_OPTIONS: dict[str, Any] = {
    "data_format": "",
    "num_train_epochs": 2,
    "learning_rate": 1e-3,
    "beta": 0.5,
    "warmup_steps": 4,
}


#: ``--demo --method grpo``: the bundled prompts and a reward for short answers, which
#: the demo model learns in about 20 steps (completions from ~11 tokens to ~1).
GRPO_DEMO_OPTIONS: dict[str, Any] = {
    "data_format": "",
    "reward": ["sloth_core.train.rewards:length_penalty"],
    "per_device_train_batch_size": 16,
    "num_generations": 8,
    "max_completion_length": 16,
    "max_steps": 30,
    "learning_rate": 1e-2,
    "warmup_steps": 2,
    "eval_fraction": 0.05,
    "logging_steps": 5,
}


def demo_options(*, with_model: bool = True, method: str = "sft") -> dict[str, Any]:
    """The demo's options: :data:`DEMO_OPTIONS` plus the data path and, unless another
    model was named (``with_model=False``: nothing is built), the demo model's; for a
    preference ``method``, the bundled preference set and its options."""
    options = {**DEMO_OPTIONS, "dataset": str(demo_dataset())}
    if method == "grpo":
        from sloth_core.testing.datasets import prompt_dataset

        options.update(GRPO_DEMO_OPTIONS, dataset=str(prompt_dataset()), method=method)
    elif method != "sft":
        from sloth_core.testing.datasets import preference_dataset

        kind = "kto" if method == "kto" else "pairs"
        options.update(PREFERENCE_DEMO_OPTIONS, dataset=str(preference_dataset(kind)))
        options["method"] = method
        options["beta"] = 2.0 if method == "simpo" else options["beta"]  # SimPO's scale
    if with_model:
        options["model_name"] = str(demo_model())
    return options
