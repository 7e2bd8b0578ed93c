"""sloth-bnb: bitsandbytes quantization for sloth; the hooks are in :mod:`sloth_bnb.plugin`."""

from sloth_bnb.config import METHODS, bnb_config
from sloth_bnb.cpu_layout import guard_cpu_layout, restore_cpu_layout

__all__ = ["METHODS", "bnb_config", "guard_cpu_layout", "restore_cpu_layout"]
