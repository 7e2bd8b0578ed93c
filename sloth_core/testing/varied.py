"""Tiny configs with every float field off its default and every flag flipped.

A parity test on a tiny config that keeps a field at its default cannot see a patch that
ignores it: Granite's ``logits_scaling`` and ``residual_multiplier`` are ``1.0`` by
default, so a plugin that drops them passes on the defaults and gives wrong logits on
real checkpoints. :func:`varied_config` reads the fields of the model type's config class
at test time (so it follows transformers' defaults as they change), moves every float
away from its default and flips every boolean, then keeps only what still builds a model
that runs: a variation that breaks the tiny model (a rotary fraction that leaves an odd
number of dimensions...) is dropped, one field at a time.

Not varied: dropout probabilities and noise (random, so two models cannot agree on them;
``sloth plugins new`` checks dropout on its own), ``initializer_range`` and fields that
the tiny base config or the caller set, integers and strings (sizes stay tiny), and the
fields every config shares (``return_dict``, ``use_cache``...).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from transformers import PreTrainedConfig

from .models import TINY_CONFIGS, init_tiny_model, tiny_config

__all__ = ["config_variations", "field_defaults", "varied_config", "varied_value"]

#: Fields no forward reads, or that must keep the tiny base's value.
_KEEP = frozenset({"use_cache", "initializer_range", "return_dict", "pad_token_id"})
#: Substrings of the names of dropout probabilities.
DROPOUT = ("dropout", "pdrop")
#: Substrings of names of random fields (dropout, router noise): never varied.
_RANDOM = (*DROPOUT, "noise", "jitter")
#: A softcap that bites at a tiny model's score and logit scale (of order one).
_SOFTCAP = 2.5
#: An epsilon far enough above the usual 1e-5/1e-6 that a kernel ignoring it fails.
_EPS = 3e-3


def field_defaults(config_class: type[PreTrainedConfig]) -> dict[str, tuple[Any, Any]]:
    """The fields of ``config_class`` beyond those every config shares:
    ``name -> (default, annotation)`` (annotation ``None`` where the class gives none)."""
    shared = set(inspect.signature(PreTrainedConfig.__init__).parameters)
    annotations: dict[str, Any] = {}
    for klass in reversed(config_class.__mro__):
        annotations.update(getattr(klass, "__annotations__", {}))
    fields = {}
    for name, parameter in inspect.signature(config_class.__init__).parameters.items():
        if name in shared or parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
            continue
        default = None if parameter.default is parameter.empty else parameter.default
        fields[name] = (default, annotations.get(name))
    return fields


def _is_float(default: Any, annotation: Any) -> bool:
    if isinstance(default, bool):
        return False
    if isinstance(default, float):
        return True
    text = str(annotation).lower()  # "float | None", not "list[float] | None"
    containers = ("list", "dict", "tuple", "sequence")
    return default is None and "float" in text and not any(c in text for c in containers)


def varied_value(name: str, default: Any, annotation: Any = None) -> Any:
    """The varied value of one config field, or ``None`` to leave it alone.

    Booleans are flipped. Floats: a softcap becomes 2.5 (where it bites at a tiny model's
    scale), an epsilon 3e-3, ``0 < d < 1`` moves halfway to 1, ``0`` and ``None`` (a
    float feature off by default, as OLMo's ``clip_qkv``) become 0.5, any other ``d``
    becomes ``1.5 d``. :func:`config_variations` drops what the tiny model cannot run with.
    """
    if name in _KEEP or any(part in name for part in _RANDOM):
        return None
    if isinstance(default, bool):
        return not default
    if not _is_float(default, annotation):
        return None
    if "softcap" in name:
        return _SOFTCAP
    if "eps" in name:
        return _EPS if default != _EPS else 2 * _EPS
    if default is None:  # a feature off by default: OLMo's clip_qkv, MPT's logit_scale...
        return 0.5
    if 0 < default < 1:
        return (default + 1) / 2
    return 0.5 if default == 0 else 1.5 * default


def _runs(arch: str, model_type: str | None, fields: dict[str, Any]) -> bool:
    """Whether the tiny model of these fields builds and gives finite logits."""
    try:
        config = tiny_config(arch, model_type=model_type, **fields)
        model = init_tiny_model(config)
        ids = torch.arange(1, 9)[None]
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
        return bool(torch.isfinite(logits).all())
    except Exception:  # noqa: BLE001 - any failure means: not a valid tiny model
        return False


@functools.lru_cache(maxsize=64)
def _variations(
    arch: str, model_type: str | None, keep: frozenset[str]
) -> tuple[tuple[str, Any], ...]:
    base = tiny_config(arch, model_type=model_type)
    wanted = {}
    skip = set(TINY_CONFIGS[arch]) | keep
    for name, (default, annotation) in field_defaults(type(base)).items():
        value = varied_value(name, default, annotation)
        if value is not None and name not in skip:
            wanted[name] = value
    if not _runs(arch, model_type, wanted):
        kept: dict[str, Any] = {}
        for name, value in wanted.items():  # keep each variation the model still runs with
            if _runs(arch, model_type, {**kept, name: value}):
                kept[name] = value
        wanted = kept
    return tuple(sorted(wanted.items()))  # immutable: the cache hands it out again


def config_variations(
    arch: str, *, model_type: str | None = None, keep: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The overrides :func:`varied_config` applies to ``tiny_config(arch, model_type=...)``:
    field -> varied value (see :func:`varied_value`), each checked to build a model that
    runs; ``keep`` names fields to leave alone. Cached per process."""
    return dict(_variations(arch, model_type, frozenset(keep)))


def varied_config(arch: str, *, model_type: str | None = None, **overrides: Any):
    """:func:`~sloth_core.testing.models.tiny_config` with :func:`config_variations`:
    every float field of the config class off its default, every flag flipped, where the
    tiny model stays valid. ``overrides`` win over the variations (and are not varied).

    ``varied_config("llama", model_type="granite")`` gives a tiny Granite whose four
    multipliers are 1.5, with attention and MLP biases and tied embeddings.
    """
    variations = config_variations(arch, model_type=model_type, keep=tuple(overrides))
    return tiny_config(arch, model_type=model_type, **{**variations, **overrides})
