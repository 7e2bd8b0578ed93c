"""Value types that cross the hook boundary between the core and plugins."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


@dataclass
class ModelSpec:
    """What the user asked to load: passed to ``quantize`` and ``load_model``.

    The core fills ``model_type`` and ``config`` from the model's ``config.json`` before any
    hook sees the spec, so a plugin decides whether it handles the spec by looking at
    ``spec.model_type`` alone.
    """

    model_name: str
    model_type: str | None = None
    config: Any = None  # transformers.PretrainedConfig, read once by the core
    dtype: torch.dtype | None = None
    max_seq_length: int | None = None
    quantization: str | None = None  # "nf4", "fp4", "int8", ... or None for 16-bit
    full_finetuning: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False  # load pickled ``.bin`` weights (they can run code)
    device_map: Any = None
    revision: str | None = None
    token: str | bool | None = None
    #: A tokenizer the caller loaded already (:func:`sloth_core.sdk.load_tokenizer` returns
    #: it rather than loading another).
    tokenizer: Any = None
    #: Filled by the core from the ``quantize`` hook; loaders pass ``load_kwargs`` on.
    quantization_plan: QuantizationPlan | None = None
    #: Further keyword arguments for ``from_pretrained``, passed on untouched.
    extra: dict[str, Any] = field(default_factory=dict)
    #: Build the modules with every parameter on the meta device and read no weights (the
    #: buffers are real): the sharded loader (``sloth_core.train.sharded_loading``) shards
    #: the empty model, then each process reads only its own slices of the weight files.
    empty: bool = False

    @property
    def is_local(self) -> bool:
        return Path(self.model_name).expanduser().is_dir()


@dataclass
class QuantizationPlan:
    """How a quantizer plugin quantizes a model while it loads, and after.

    ``load_kwargs`` go to ``from_pretrained`` (e.g. a ``quantization_config``) so that the
    weights are quantized as they stream in; ``finalize`` runs once on the loaded model.
    """

    method: str
    provider: str = ""
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    finalize: Callable[[Any], Any] | None = None


@dataclass
class PatchReport:
    """What one ``patch_layers`` implementation changed on a model."""

    plugin: str
    model_type: str
    patched: dict[str, int] = field(default_factory=dict)  # what -> how many modules
    undo: Callable[[], None] | None = None  # restores the original forwards
    skipped: dict[str, str] = field(default_factory=dict)  # module name -> why left alone

    @property
    def total(self) -> int:
        return sum(self.patched.values())


@dataclass
class ExportResult:
    """What an ``export`` implementation wrote."""

    format: str
    path: Path
    files: list[Path] = field(default_factory=list)


class ArchitectureRegistrar(Protocol):
    """The ``register`` argument of ``register_architectures``."""

    def __call__(self, model_type: str, *, description: str = "") -> None: ...


class KernelRegistrar(Protocol):
    """The ``register`` argument of ``register_kernels``."""

    def __call__(
        self,
        op: str,
        fn: Callable[..., Any],
        *,
        devices: tuple[str, ...] | None = ("cuda",),
        dtypes: tuple[torch.dtype, ...] | None = None,
        priority: int = 0,
        available: Callable[[], bool] | None = None,
    ) -> None: ...


class NamedRegistrar(Protocol):
    """The ``register`` argument of ``register_quantizers`` and ``register_exporters``:
    takes a descriptor (:class:`~sloth_core.formats.ExportFormat`,
    :class:`~sloth_core.formats.QuantizationMethod`), or its name and fields as keywords."""

    def __call__(self, descriptor: Any, /, **fields: Any) -> None: ...


class Host(Protocol):
    """The plugin manager as hooks see it (the ``host`` argument of ``patch_layers`` and
    ``export``): what a hook may call back, instead of a process-wide global."""

    ops: Any
    exporters: dict[str, str]

    def export_format(self, name: str) -> Any: ...

    def compute_loss(self, **kwargs: Any) -> Any: ...

    def export(
        self, *, model: Any, tokenizer: Any, format: str, path: Path, options: dict
    ) -> ExportResult | None: ...
