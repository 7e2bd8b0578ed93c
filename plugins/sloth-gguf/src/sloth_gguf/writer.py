"""Write a (LoRA-merged) model and its tokenizer as one GGUF file for llama.cpp.

Tensors are planned first (name, shape, storage type), so that the header is written
before any data and each tensor is converted, quantized and written one at a time: the
only full copy of the weights in memory is the merged state dict. The file appears under
its final name only when complete (a temporary sibling, then a rename).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import torch

from sloth_core.sdk import (
    ExportResult,
    as_published,
    atomic_directory,
    check_free_space,
    merged_state_dict,
    refuse_existing,
)

from .architectures import (
    Architecture,
    TensorConverter,
    architecture_for,
    check_supported,
    extra_tensors,
    write_metadata,
)
from .quantization import (
    Quantization,
    quantize_array,
    resolve_quantization,
    stored_nbytes,
    stored_shape_and_dtype,
    tensor_type,
)
from .vocab import Vocab, vocab_from_tokenizer

__all__ = ["export_gguf", "gguf_file_name"]

#: Headroom of the free-space check above the estimated size.
SPACE_MARGIN = 1.05


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return stored_nbytes(self.shape, self.qtype)


def _base_model(model: Any) -> Any:
    return (
        model.get_base_model()
        if hasattr(model, "get_base_model") and hasattr(model, "peft_config")
        else model
    )


def plan_tensors(
    state: dict[str, torch.Tensor],
    config: Any,
    arch: Architecture,
    weights: gguf.GGMLQuantizationType,
    writer: gguf.GGUFWriter,
) -> list[PlannedTensor]:
    """Every tensor of the GGUF file, in order, with how to produce its values."""
    converter = TensorConverter(config, arch)
    plan: list[PlannedTensor] = []

    def add(name: str, shape: tuple[int, ...], load: Callable[[], torch.Tensor]) -> None:
        plan.append(PlannedTensor(name, shape, tensor_type(name, shape, weights), load))

    for name, tensor in extra_tensors(config, writer):

        def extra(t: torch.Tensor = tensor) -> torch.Tensor:
            return t

        add(name, tuple(tensor.shape), extra)
    embed = state.get("model.embed_tokens.weight")
    for hf_name, tensor in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if hf_name == "lm_head.weight" and embed is not None:
            tied = tensor.data_ptr() == embed.data_ptr() or torch.equal(tensor, embed)
            if tied and getattr(config, "tie_word_embeddings", False):
                continue  # llama.cpp reuses token_embd
            if not converter.has_output():
                raise ValueError(
                    f"{config.model_type}: lm_head differs from the embeddings, but llama.cpp's "
                    f"{arch.name} always ties them"
                )

        for index, (name, shape) in enumerate(converter.gguf_parts(hf_name, tuple(tensor.shape))):

            def load(
                name: str = hf_name, values: torch.Tensor = tensor, index: int = index
            ) -> torch.Tensor:
                values = values.detach().to("cpu", torch.float32)
                return converter.convert_part(name, values, index)

            add(name, shape, load)
    return plan


def gguf_file_name(quantization: str) -> str:
    """The file name inside a directory output: ``model.Q8_0.gguf``."""
    return f"model.{quantization.upper()}.gguf"


def _metadata_bytes(vocab: Vocab) -> int:
    tokens = sum(len(t.encode("utf-8")) + 16 for t in vocab.tokens)
    merges = sum(len(m.encode("utf-8")) + 8 for m in vocab.merges)
    template = len(str(vocab.chat_template or "").encode("utf-8"))
    return tokens + merges + template + (1 << 20)


def write_gguf(
    path: Path, *, config: Any, arch: Architecture, vocab: Vocab, plan: list[PlannedTensor],
    file_type: gguf.LlamaFileType, name: str, writer: gguf.GGUFWriter,
) -> None:  # fmt: skip
    """Write the planned GGUF to ``path`` (a new file; the caller picks a temporary name)."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    write_metadata(writer, config, arch)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.write(writer)
    for tensor in plan:
        shape, dtype = stored_shape_and_dtype(tensor.shape, tensor.qtype)
        writer.add_tensor_info(tensor.name, shape, dtype, tensor.nbytes, raw_dtype=tensor.qtype)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in plan:
        values = tensor.load()
        if tuple(values.shape) != tensor.shape:
            raise AssertionError(
                f"{tensor.name}: planned {tensor.shape}, got {tuple(values.shape)}"
            )
        writer.write_tensor_data(quantize_array(values.float().numpy(), tensor.qtype))
    writer.close()


@contextlib.contextmanager
def _temporary_sibling(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    temp = Path(name)
    try:
        yield temp
    finally:
        temp.unlink(missing_ok=True)


def _intermediate(model_state: dict[str, torch.Tensor]) -> Quantization:
    # llama.cpp quantizes from 16 bits: bf16 when the weights are bf16 (lossless), else f16.
    is_bf16 = any(t.dtype == torch.bfloat16 for t in model_state.values())
    return resolve_quantization("bf16" if is_bf16 else "f16")


def export_gguf(
    model: Any, tokenizer: Any, path: str | os.PathLike[str], options: dict[str, Any]
) -> ExportResult:
    """The ``gguf`` format of the ``export`` hook (see the package README for options)."""
    from sloth_core.sdk import llama_cpp

    quant = resolve_quantization(options.get("quantization"))
    if quant.needs_llama_cpp and not llama_cpp.available():
        from .verify import NEEDS

        raise llama_cpp.LlamaCppMissingError(
            f"GGUF quantization {quant.name!r} runs llama.cpp's quantizer: {NEEDS}, or "
            f"`pip install {llama_cpp.PACKAGE}` (types without it: "
            "f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1)"
        )
    if tokenizer is None:
        raise ValueError("GGUF export needs the tokenizer: a GGUF file carries its vocabulary")
    force = bool(options.get("force", False))
    path = Path(path).expanduser().resolve()
    refuse_existing(path, force)
    base = _base_model(model)
    config = base.config
    arch = architecture_for(config)
    check_supported(config, arch)
    vocab = vocab_from_tokenizer(
        tokenizer, config.vocab_size, tokenizer_pre=options.get("tokenizer_pre")
    )

    # LoRA merged in float32 (merged_state_dict); kept in float32 for an f32 file.
    state = merged_state_dict(model, torch.float32 if quant.name == "f32" else None)
    written = _intermediate(state) if quant.needs_llama_cpp else quant
    writer = gguf.GGUFWriter(path=None, arch=arch.name)
    assert written.tensor_type is not None  # a type written here, not by llama.cpp
    plan = plan_tensors(state, config, arch, written.tensor_type, writer)
    size = sum(t.nbytes for t in plan) + _metadata_bytes(vocab)
    if quant.needs_llama_cpp:
        size += int(size * quant.bits / 16)  # the 16-bit source and the quantized result
    name = options.get("name") or Path(str(getattr(config, "_name_or_path", "") or "model")).name

    directory = path.suffix.lower() != ".gguf" or path.is_dir()
    check_free_space(
        path if directory else path.parent, size, "the GGUF export", margin=SPACE_MARGIN
    )

    def produce(target: Path) -> None:
        common = dict(config=config, arch=arch, vocab=vocab, plan=plan, name=name, writer=writer)
        if not quant.needs_llama_cpp:
            write_gguf(target, file_type=quant.file_type, **common)
            return
        with _temporary_sibling(target, suffix=f".{written.name}.gguf") as source:
            write_gguf(source, file_type=written.file_type, **common)
            llama_cpp.quantize(source, target, quant.name)

    if directory:
        file_name = gguf_file_name(quant.name)
        with atomic_directory(path, force=force) as staging:
            produce(staging / file_name)
        return ExportResult("gguf", path, [path / file_name])
    path.parent.mkdir(parents=True, exist_ok=True)
    with _temporary_sibling(path) as temp:
        produce(temp)
        as_published(temp)  # mkstemp's 0600 would keep llama.cpp's or Ollama's user out
        os.replace(temp, path)
    return ExportResult("gguf", path, [path])
