"""``sloth train``: the SFT loop, its options, checkpoints and metrics."""

from .config import ConfigError, TrainConfig, read_config_file
from .loop import TrainResult, train
from .step import accumulate, evaluate, train_step

__all__ = [
    "ConfigError",
    "TrainConfig",
    "TrainResult",
    "accumulate",
    "evaluate",
    "read_config_file",
    "train",
    "train_step",
]
