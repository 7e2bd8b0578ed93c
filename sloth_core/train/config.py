"""What ``sloth train`` takes: one dataclass, read from TOML/YAML and flags, checked early.

Every option is a field of :class:`TrainConfig` with its help text in the field's
metadata; the command line is generated from the fields, so a config file and the flags
always accept the same names (the Unsloth CLI's names where they exist). Everything is
validated before any model or data loads, and errors name the option (and the file).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sloth_core.checkpointing import Checkpointing
from sloth_core.errors import SlothError

SCHEDULES = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw_torch_fused", "adamw_torch", "adamw_8bit")
CHECKPOINTING = tuple(mode.value for mode in Checkpointing)
QUANTIZATIONS = ("nf4", "fp4", "int8", "fp8")
FORMATS = ("text", "alpaca", "chat", "sharegpt")
METHODS = ("sft", "dpo", "orpo", "simpo", "kto", "grpo")
#: Methods whose loss compares with a reference model (the policy without adapters);
#: GRPO's does when beta > 0.
REFERENCE_METHODS = ("dpo", "kto")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
#: TRL's GRPO loss types and reward scalings (sloth_core.train.grpo_losses computes them).
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
#: GRPO's completion length when max_completion_length is 0 (TRL's default).
GRPO_COMPLETION_LENGTH = 256
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ConfigError(SlothError, ValueError):
    """A ``sloth train`` option is missing, unknown or out of range; nothing was loaded."""


def _opt(default: Any, help: str, **extra: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(
            default_factory=lambda: type(default)(default), metadata={"help": help, **extra}
        )
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Options of a fine-tune; see ``sloth train --help`` for each one's meaning."""

    # model
    model_name: str = _opt("", "model directory (or hub id) to fine-tune")
    max_seq_length: int = _opt(2048, "longest training row in tokens; longer rows are truncated")
    dtype: str = _opt("auto", "weights dtype: auto (bf16 on GPUs that have it), bf16, fp16, fp32")
    load_in_4bit: bool = _opt(False, "QLoRA: load the base weights in 4-bit NF4 (sloth-bnb)")
    quantization: str = _opt(
        "",
        "quantization method instead of load_in_4bit: nf4, fp4, int8 (sloth-bnb), fp8 "
        "(sloth-fp8; a mixture of experts' expert weights too)",
    )
    full_finetuning: bool = _opt(False, "train every weight instead of LoRA adapters")
    trust_remote_code: bool = _opt(
        False, "run the model folder's own Python code (auto_map): only for sources you trust"
    )
    allow_pickle: bool = _opt(
        False, "load pickled .bin weights, which can run code: only from sources you trust"
    )
    # data
    dataset: str = _opt("", "training data: a .jsonl, .json, .csv or .parquet file")
    data_format: str = _opt("", "text, alpaca, chat or sharegpt (default: detected)")
    chat_template: str = _opt("", "chat template: the tokenizer's own (default) or a built-in name")
    train_on_responses_only: bool = _opt(True, "mask prompt tokens: learn only the responses")
    eval_dataset: str = _opt(
        "", "evaluation data file (default: eval_fraction of the training data)"
    )
    eval_fraction: float = _opt(0.0, "fraction of the training data held out for evaluation")
    packing: bool = _opt(False, "pack several sequences per row (no attention across them)")
    # method
    method: str = _opt(
        "sft", "sft; preference tuning: dpo, orpo, simpo, kto (docs/preference.md); "
        "RL from rewards: grpo (docs/rl.md)",
    )  # fmt: skip
    beta: float = _opt(
        -1.0, "DPO's and KTO's beta, ORPO's lambda, SimPO's beta, GRPO's KL coefficient "
        "(-1: the method's default, 0.1; GRPO 0)",
    )  # fmt: skip
    loss_type: str = _opt(
        "", "DPO: sigmoid (default), ipo, hinge; GRPO: grpo, bnpo, dr_grpo, dapo (default)"
    )
    label_smoothing: float = _opt(0.0, "DPO (sigmoid) and SimPO label smoothing, in [0, 0.5)")
    simpo_gamma: float = _opt(0.5, "SimPO's target reward margin gamma")
    desirable_weight: float = _opt(1.0, "KTO: weight of the desirable examples' losses")
    undesirable_weight: float = _opt(1.0, "KTO: weight of the undesirable examples' losses")
    max_prompt_length: int = _opt(0, "preference data: longest prompt in tokens (0: no own limit)")
    max_completion_length: int = _opt(
        0, "longest completion in tokens: preference data (0: no own limit), GRPO's "
        f"sampling (0: {GRPO_COMPLETION_LENGTH})",
    )  # fmt: skip
    truncation_mode: str = _opt(
        "keep_end", "preference rows past max_seq_length: keep_end or keep_start (as TRL)"
    )
    precompute_ref_log_probs: bool = _opt(
        False, "DPO/KTO: the reference log-probs once before training, not at every step"
    )
    share_prompt: bool = _opt(
        True, "DPO/ORPO/SimPO/GRPO: a prompt's completions (a pair, a GRPO group) in one row, "
        "the prompt computed once (models on sloth's attention; the log-probs are the rows')",
    )  # fmt: skip
    reward: list = _opt(
        [], "GRPO reward functions, module:function or file.py:function (built-ins: "
        "sloth_core.train.rewards:exact_match, :format_regex, :length_penalty)",
    )  # fmt: skip
    reward_weights: list = _opt([], "GRPO: one weight per reward function (default: 1 each)")
    num_generations: int = _opt(
        8, "GRPO: completions sampled per prompt; divides per_device_train_batch_size"
    )
    temperature: float = _opt(1.0, "GRPO sampling temperature (the loss's log-probs use it too)")
    top_p: float = _opt(1.0, "GRPO sampling: nucleus probability mass")
    top_k: int = _opt(0, "GRPO sampling: the k most likely tokens only (0: off)")
    epsilon: float = _opt(0.2, "GRPO: the importance ratio is clipped below 1 - epsilon")
    epsilon_high: float = _opt(0.0, "GRPO: and above 1 + epsilon_high (0: epsilon)")
    num_iterations: int = _opt(
        1, "GRPO: optimizer steps per batch of completions (1: not yet more)"
    )
    scale_rewards: str = _opt(
        "group", "GRPO advantages divided by the rewards' std in the group, the batch, or none"
    )
    # LoRA
    r: int = _opt(16, "LoRA rank")
    lora_alpha: int = _opt(16, "LoRA alpha (scale alpha/r, or alpha/sqrt(r) with use_rslora)")
    lora_dropout: float = _opt(0.0, "LoRA dropout (0 takes the fused kernels' fast path)")
    use_rslora: bool = _opt(False, "rank-stabilised LoRA scaling")
    target_modules: list = _opt(list(DEFAULT_TARGETS), "module names that get LoRA adapters")
    modules_to_save: list = _opt([], "modules trained in full beside LoRA (embed_tokens, lm_head)")
    target_parameters: list = _opt(
        [], "parameters that get LoRA (MoE expert weights, e.g. mlp.experts.gate_up_proj)"
    )
    target_experts: bool = _opt(False, "LoRA on every expert weight of an MoE model too")
    # optimisation
    per_device_train_batch_size: int = _opt(2, "rows per micro-batch", alias="batch_size")
    gradient_accumulation_steps: int = _opt(4, "micro-batches per optimizer step")
    max_steps: int = _opt(-1, "optimizer steps (-1: num_train_epochs over the data)")
    num_train_epochs: float = _opt(1.0, "passes over the training data when max_steps is -1")
    learning_rate: float = _opt(2e-4, "peak learning rate")
    embedding_learning_rate: float = _opt(
        0.0, "learning rate of trained embeddings/lm_head (0: same)"
    )
    warmup_steps: int = _opt(0, "linear warm-up steps")
    warmup_ratio: float = _opt(0.0, "warm-up as a fraction of the steps (if warmup_steps is 0)")
    lr_scheduler_type: str = _opt("linear", "linear, cosine or constant (after warm-up)")
    optim: str = _opt("adamw_torch_fused", "adamw_torch_fused, adamw_torch or adamw_8bit")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.999, "AdamW beta2")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0: off)")
    bf16: str = _opt("auto", "bf16 autocast: auto (on for fp32 weights on bf16 GPUs), on, off")
    gradient_checkpointing: str = _opt(
        "offload",
        "off, on, offload (layer inputs to pinned CPU memory), or auto (keep, "
        "recompute or offload per layer, to fit memory_budget_gib)",
    )
    memory_budget_gib: float = _opt(
        0.0,
        "device memory a step may use, in GiB: plans checkpointing per layer "
        "(gradient_checkpointing auto; 0 with auto: 90 percent of the device's)",
    )
    seed: int = _opt(3407, "seed of the adapters' init, the data order and dropout")
    cpu_threads: int = _opt(0, "intra-op threads when training on the CPU (0: torch's default)")
    nproc: int = _opt(1, "data-parallel processes, one per GPU: re-launches through torchrun")
    # several machines: launch options (`sloth train` passes them to torchrun), not resumed
    nnodes: int = _opt(1, "machines (nodes) of the run, each starting nproc processes")
    node_rank: int = _opt(0, "this machine's place, 0 to nnodes - 1; node 0 hosts the rendezvous")
    rdzv_endpoint: str = _opt(
        "", "host:port of node 0, where the nodes meet (c10d rendezvous); needed with nnodes > 1"
    )
    # outputs
    output_dir: str = _opt("outputs", "where checkpoints, metrics and the final model go")
    overwrite: bool = _opt(False, "replace a non-empty output_dir")
    resume: bool = _opt(False, "continue from the latest checkpoint in output_dir")
    logging_steps: int = _opt(1, "log metrics every N optimizer steps")
    save_steps: int = _opt(0, "write a checkpoint every N optimizer steps (0: only at the end)")
    save_total_limit: int = _opt(2, "checkpoints kept (older ones are deleted)")
    eval_steps: int = _opt(0, "evaluate every N optimizer steps (0: before and after training)")
    save_method: str = _opt(
        "auto",
        "final model: an installed export format (lora, merged_16bit, merged_4bit, ...: "
        "`sloth plugins list`), none, or auto (lora; merged_16bit with full_finetuning)",
    )
    export_format: str = _opt("", "also export at the end to this format (e.g. gguf, ollama)")
    export_quantization: str = _opt("", "quantization of the export (e.g. q8_0, q4_k_m)")
    report_to: str = _opt("auto", "tensorboard, none, or auto (tensorboard when installed)")

    @classmethod
    def fields_by_name(cls) -> dict[str, dataclasses.Field]:
        names = {}
        for f in dataclasses.fields(cls):
            names[f.name] = f
            if "alias" in f.metadata:
                names[f.metadata["alias"]] = f
        return names

    @classmethod
    def from_mapping(cls, values: dict[str, Any], *, source: str = "options") -> TrainConfig:
        """A config from a mapping (a parsed file); unknown keys and wrong types name the key."""
        known = cls.fields_by_name()
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                hint = difflib.get_close_matches(name, list(known), n=1)
                extra = f"; did you mean {hint[0]!r}?" if hint else ""
                raise ConfigError(f"{source}: unknown option {key!r}{extra}")
            f = known[name]
            kwargs[f.name] = _coerce(f, value, source)
        return cls(**kwargs)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def final_format(self) -> str:
        """The export format of ``output_dir/final`` (``"none"``: nothing), ``auto`` resolved."""
        if self.save_method == "auto":
            return "merged_16bit" if self.full_finetuning else "lora"
        return self.save_method

    @property
    def checkpointing(self) -> Checkpointing:
        """``gradient_checkpointing``, with a memory budget and the default (offload) auto."""
        if self.memory_budget_gib and self.gradient_checkpointing == Checkpointing.OFFLOAD:
            return Checkpointing.AUTO
        return Checkpointing(self.gradient_checkpointing)

    @property
    def quantization_method(self) -> str | None:
        return self.quantization or ("nf4" if self.load_in_4bit else None)

    def validate(self, *, check_output: bool = True) -> TrainConfig:
        """Raise :class:`ConfigError` naming the first bad option; return ``self``."""
        self._check_files()
        self._check_choices()
        self._check_ranges()
        self._check_combinations()
        if check_output:
            self._check_output()
        return self

    def _bad(self, name: str, why: str) -> ConfigError:
        return ConfigError(f"{name}={getattr(self, name)!r}: {why}")

    def _check_files(self) -> None:
        if not self.model_name:
            raise ConfigError("model_name is required (a model directory or hub id)")
        if not self.dataset:
            raise ConfigError("dataset is required (a .jsonl, .json, .csv or .parquet file)")
        for name in ("dataset", "eval_dataset"):
            value = getattr(self, name)
            if value and Path(value).is_dir():
                raise self._bad(name, "is a directory; name the data file in it (.jsonl, "
                                      ".json, .csv or .parquet)")  # fmt: skip
            if value and not Path(value).is_file():
                raise self._bad(name, "no such file")

    def _check_choices(self) -> None:
        choices = {
            "lr_scheduler_type": SCHEDULES, "optim": OPTIMIZERS,
            "gradient_checkpointing": CHECKPOINTING,
            "bf16": ("auto", "on", "off"), "dtype": ("auto", "bf16", "fp16", "fp32"),
            "report_to": ("auto", "tensorboard", "none"), "method": METHODS,
            "truncation_mode": ("keep_end", "keep_start"), "scale_rewards": SCALE_REWARDS,
        }  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise self._bad(name, f"choose one of {', '.join(allowed)}")
        if self.data_format and self.data_format not in FORMATS:
            raise self._bad("data_format", f"choose one of {', '.join(FORMATS)}")
        if self.quantization and self.quantization not in QUANTIZATIONS:
            raise self._bad("quantization", f"choose one of {', '.join(QUANTIZATIONS)}")

    def _check_ranges(self) -> None:
        bad = self._bad
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise bad(f.name, "must be a finite number")
        positive = ("max_seq_length", "r", "lora_alpha", "per_device_train_batch_size",
                    "gradient_accumulation_steps", "logging_steps", "save_total_limit",
                    "nproc", "nnodes", "num_generations", "num_iterations")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        self._check_nodes()
        for name in ("warmup_steps", "save_steps", "eval_steps", "weight_decay", "max_grad_norm",
                     "memory_budget_gib",
                     "cpu_threads", "embedding_learning_rate", "max_prompt_length",
                     "max_completion_length", "desirable_weight", "undesirable_weight",
                     "simpo_gamma", "top_k", "epsilon", "epsilon_high"):  # fmt: skip
            if getattr(self, name) < 0:
                raise bad(name, "must not be negative")
        if not 0 < self.learning_rate < 1:
            raise bad("learning_rate", "must be in (0, 1)")
        if self.max_steps == 0 or self.max_steps < -1:
            raise bad("max_steps", "must be positive, or -1 to train num_train_epochs")
        if self.max_steps == -1 and not (
            self.num_train_epochs > 0 and math.isfinite(self.num_train_epochs)
        ):
            raise bad("num_train_epochs", "must be positive")
        for name in ("lora_dropout", "warmup_ratio", "eval_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise bad(name, "must be in [0, 1)")
        if not all(0 <= b < 1 for b in (self.adam_beta1, self.adam_beta2)):
            raise ConfigError("adam_beta1/adam_beta2 must be in [0, 1)")
        if self.beta != -1 and (self.beta < 0 or (self.beta == 0 and self.method != "grpo")):
            raise bad("beta", "must be positive (GRPO: 0 or more), or -1 for the default")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError("temperature must be positive and top_p in (0, 1]")
        if not 0 <= self.label_smoothing < 0.5:
            raise bad("label_smoothing", "must be in [0, 0.5)")
        if self.desirable_weight + self.undesirable_weight <= 0:
            raise ConfigError(
                "desirable_weight and undesirable_weight are both 0: nothing to learn"
            )

    def _check_combinations(self) -> None:
        bad = self._bad
        if self.full_finetuning and self.save_method == "lora":
            raise bad("save_method", "full_finetuning has no adapters: use merged_16bit or none")
        if self.full_finetuning and self.quantization_method:
            raise ConfigError("full_finetuning trains every weight: it cannot be quantized")
        if self.load_in_4bit and self.quantization and self.quantization not in ("nf4", "fp4"):
            raise bad("quantization", "load_in_4bit asks for a 4-bit method (nf4 or fp4)")
        parameters = self.target_parameters or self.target_experts
        if not self.target_modules and not parameters and not self.full_finetuning:
            raise bad("target_modules", "name at least one module (or use full_finetuning)")
        for name in ("target_parameters", "target_experts"):
            if getattr(self, name) and self.full_finetuning:
                raise bad(name, "full_finetuning trains every weight: it takes no LoRA")
            if getattr(self, name) and self.lora_dropout:
                raise bad(name, "LoRA on expert weights takes no dropout: set lora_dropout to 0")
        if self.memory_budget_gib and self.checkpointing is not Checkpointing.AUTO:
            fixed = self.gradient_checkpointing
            raise bad("memory_budget_gib", f"gradient_checkpointing={fixed} is fixed; a budget "
                      "plans it per layer (auto, or leave the default)")  # fmt: skip
        if (self.checkpointing is Checkpointing.AUTO and self.full_finetuning
                and self.nproc * self.nnodes > 1):  # fmt: skip
            raise bad("gradient_checkpointing", "auto plans one device's whole model; full "
                      "fine-tuning over several processes (FSDP2) takes on or offload")  # fmt: skip
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite exclude each other")
        if self.method == "grpo":
            self._check_grpo()
        elif self.method != "sft":
            self._check_preference()
        if self.export_quantization and not self.export_format:
            raise bad("export_quantization", "applies to export_format, which is not set")

    def _check_preference(self) -> None:
        bad, method = self._bad, self.method
        if self.packing:
            raise bad("packing", f"applies to method=sft; {method} rows are not packed")
        if self.data_format:
            raise bad("data_format", f"applies to method=sft; {method} reads its rows by "
                                     "their fields (docs/preference.md)")  # fmt: skip
        if self.precompute_ref_log_probs and method not in REFERENCE_METHODS:
            raise bad("precompute_ref_log_probs", f"{method} has no reference model")
        if self.loss_type and method != "dpo":
            raise bad("loss_type", f"is DPO's; {method} has one loss")
        if self.loss_type and self.loss_type not in DPO_LOSS_TYPES:
            raise bad("loss_type", f"choose one of {', '.join(DPO_LOSS_TYPES)}")
        if self.label_smoothing and self.loss_kind != "sigmoid":
            raise bad("label_smoothing", f"applies to the sigmoid loss, not {self.loss_kind}")
        if self.label_smoothing and method not in ("dpo", "simpo"):
            raise bad("label_smoothing", f"applies to dpo and simpo, not {method}")

    def _check_grpo(self) -> None:
        bad = self._bad
        if not self.reward:
            raise bad("reward", "GRPO needs at least one reward function (module:function)")
        if self.reward_weights and len(self.reward_weights) != len(self.reward):
            raise bad("reward_weights", f"gives {len(self.reward_weights)} weights for "
                                        f"{len(self.reward)} reward functions")  # fmt: skip
        for weight in self.reward_weights:
            try:
                float(weight)
            except ValueError:
                raise bad("reward_weights", f"{weight!r} is not a number") from None
        if self.per_device_train_batch_size % self.num_generations:
            raise bad("per_device_train_batch_size", "counts completions, as TRL's: make it a "
                      f"multiple of num_generations={self.num_generations}")  # fmt: skip
        iterations = self.num_iterations
        for name in ("max_steps", "save_steps"):  # checkpoints fall between two batches
            value = getattr(self, name)
            if iterations > 1 and value > 0 and value % iterations:
                raise bad(name, f"must be a multiple of num_iterations={iterations}: a "
                          "checkpoint inside a batch's iterations could not resume")  # fmt: skip
        if self.loss_type and self.loss_type not in GRPO_LOSS_TYPES:
            raise bad("loss_type", f"GRPO's are {', '.join(GRPO_LOSS_TYPES)}")
        for name in ("packing", "data_format", "precompute_ref_log_probs", "label_smoothing"):
            if getattr(self, name):
                raise bad(name, "does not apply to grpo")
        if self.full_finetuning and self.nproc * self.nnodes > 1:
            # Sharded weights gather layer by layer in every rank's forward, in step: ranks
            # sampling completions of different lengths would wait on each other forever.
            raise bad("nproc", "grpo with full_finetuning samples on one process only "
                               "(sharded sampling is not built): use LoRA, or nproc=1")  # fmt: skip

    def _check_nodes(self) -> None:
        if not 0 <= self.node_rank < self.nnodes:
            raise self._bad("node_rank", f"must be in [0, nnodes={self.nnodes})")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise self._bad("nnodes", "several machines meet at rdzv_endpoint (host:port of "
                                      "node 0): give it")  # fmt: skip
        if self.rdzv_endpoint:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise self._bad("rdzv_endpoint", "must be host:port (e.g. 10.0.0.1:29500)")

    @property
    def kl_beta(self) -> float:
        """``beta`` with -1 resolved: 0.1, or GRPO's 0 (TRL's defaults)."""
        if self.beta != -1:
            return self.beta
        return 0.0 if self.method == "grpo" else 0.1

    @property
    def loss_kind(self) -> str:
        """``loss_type`` with the method's default: DPO ``sigmoid``, GRPO ``dapo``."""
        return self.loss_type or ("dapo" if self.method == "grpo" else "sigmoid")

    @property
    def completion_length(self) -> int:
        """GRPO's sampled completion length (``max_completion_length``, or 256)."""
        return self.max_completion_length or GRPO_COMPLETION_LENGTH

    def _check_output(self) -> None:
        out = Path(self.output_dir)
        if out.exists() and not out.is_dir():
            raise self._bad("output_dir", "exists and is not a directory")
        if self.resume and not out.exists():
            raise self._bad(
                "output_dir", "does not exist, so there is nothing to resume; check the "
                "path, or drop --resume to start a new run",
            )  # fmt: skip
        if out.is_dir() and any(out.iterdir()) and not (self.overwrite or self.resume):
            raise self._bad("output_dir", "is not empty: pass --overwrite to replace it or "
                                          "--resume to continue its latest checkpoint")  # fmt: skip


def options_markdown() -> str:
    """The table of every option, as docs/training.md shows it (a test keeps them equal)."""
    lines = ["| option | default | what |", "|---|---|---|"]
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
        if isinstance(default, list):
            default = ",".join(default)
        name = f"`{f.name}`" + (f" (`{f.metadata['alias']}`)" if "alias" in f.metadata else "")
        shown = f"`{default}`" if default != "" else "(none)"
        lines.append(f"| {name} | {shown} | {f.metadata['help']} |")
    return "\n".join(lines) + "\n"


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    """``value`` as the type of field ``f``; a clear error naming the option otherwise."""
    kind = type(f.default) if f.default is not dataclasses.MISSING else list
    where = f"{source}: option {f.name!r}"
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where} takes true or false, not {value!r}")
    if kind is list:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        plain = (str, int, float)
        if isinstance(value, (list, tuple)) and all(
            isinstance(v, plain) and not isinstance(v, bool) for v in value
        ):  # a repeated flag gives several, each maybe comma-separated; reward_weights numbers
            return [part.strip() for v in value for part in str(v).split(",") if part.strip()]
        raise ConfigError(f"{where} takes a list of names, not {value!r}")
    if kind is str:
        if isinstance(value, (bool, int, float)) and f.name in ("bf16",):
            return "on" if value else "off"
        if not isinstance(value, str):
            raise ConfigError(f"{where} takes a string, not {value!r}")
        return value
    try:
        if isinstance(value, bool):
            raise TypeError
        if kind is int:
            number = float(value)
            if number != int(number):
                raise ValueError
            return int(number)
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} takes a number, not {value!r}") from None


def _toml() -> Any:
    try:
        import tomllib  # Python >= 3.11
    except ImportError:
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError(
                "reading TOML on Python 3.10 needs tomli (pip install tomli)"
            ) from None
    return tomllib


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The options of a TOML (``.toml``), YAML (``.yaml``/``.yml``) or JSON file.

    A ``[train]`` table (or ``train:`` mapping) is used when present, else the top level.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = _toml().loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(
                    f"{path}: reading YAML needs PyYAML (pip install pyyaml)"
                ) from None
            try:
                data = yaml.safe_load(text) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: config files are .toml, .yaml, .yml or .json")
    except ValueError as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{path}: not valid {suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of options")
    if isinstance(data.get("train"), dict):
        data = data["train"]
    return data
