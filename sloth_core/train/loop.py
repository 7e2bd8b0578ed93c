"""The SFT loop of ``sloth train``.

Order of work, so that bad input fails before anything expensive and a failure writes
nothing: options (the export's too), then the data (read, formatted, tokenised, with the
tokenizer alone), then the checkpoint to resume (read and compared), then the model and
its adapters, and only then the output directory (:mod:`.outputs`). Each optimizer step
consumes ``gradient_accumulation_steps`` micro-batches; the loss of every micro-batch is
its summed token loss divided by the label tokens of the whole step
(``num_items_in_batch``), so the accumulated gradient is exactly the gradient of one big
batch's mean token loss, not a mean of per-batch means.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sloth_core import memory_plan
from sloth_core.checkpointing import Checkpointing, apply_checkpointing
from sloth_core.errors import Interrupted, SlothError
from sloth_core.quiet import progress_bars
from sloth_core.runs import FINAL_DIR, TRAIN_CONFIG

from . import distributed, sharded_export, sharded_loading
from .callbacks import (
    Callback,
    Evaluate,
    LogMetrics,
    RunProgress,
    RunState,
    SaveCheckpoints,
    TrainResult,
)
from .checkpoint import load_tensors, load_training_state, sweep_retired
from .config import ConfigError, TrainConfig
from .methods import Method, method_for
from .metrics import METRICS_FILE, MetricsLog, Progress, plot_losses
from .optim import build_optimizer, build_scheduler
from .outputs import RunOutput
from .resume import check_resume, choose_checkpoint, data_fingerprints, drop_metrics_after
from .step import train_step


@dataclass
class PreparedData:
    tokenizer: Any
    train: list[Any]
    eval: list[Any]
    stats: Any
    eval_stats: Any = None  # of eval_dataset, when it is a file of its own


def prepare_data(config: TrainConfig, tokenizer: Any, method: Method | None = None) -> PreparedData:
    """Read, format, tokenise and split the data (``DataError`` on bad rows), as the
    method reads its rows."""
    from sloth_core import data

    method = method or method_for(config)
    examples, stats = method.tokenize(config.dataset, tokenizer)
    if config.eval_dataset:
        eval_examples, eval_stats = method.tokenize(config.eval_dataset, tokenizer)
        train_examples = examples
    else:
        eval_stats = None
        train_examples, eval_examples = data.split_eval(
            examples, eval_fraction=config.eval_fraction, seed=config.seed
        )
    if not train_examples:
        raise ConfigError(f"{config.dataset}: no training rows left after the eval split")
    return PreparedData(tokenizer, train_examples, eval_examples, stats, eval_stats)


def _check_plugins(config: TrainConfig) -> None:
    """The quantizer and exporters the options name are installed, and the export's
    quantization is one its format takes (before any work, not after training)."""
    from sloth_core.plugins import get_plugin_manager

    manager = get_plugin_manager()
    wanted = [("quantization", config.quantization_method, manager.quantizers)]
    if config.final_format != "none":
        wanted.append(("save_method", config.final_format, manager.exporters))
    if config.export_format:
        wanted.append(("export_format", config.export_format, manager.exporters))
    for option, name, available in wanted:
        if name and name not in available:
            known = ", ".join(sorted(available)) or "none"
            raise ConfigError(
                f"{option}={name!r}: no installed plugin provides it (installed: {known}); "
                "`sloth plugins list` shows what each plugin provides"
            )
    declared = manager.export_format(config.export_format) if config.export_format else None
    wanted_q = config.export_quantization
    accepted = declared.quantization_names() if declared else None
    spelled = declared.weight_type(wanted_q) if declared and wanted_q else None
    if wanted_q and accepted is not None and (spelled is None or spelled.name not in accepted):
        takes = f"one of {', '.join(accepted)}" if accepted else "no quantization"
        raise ConfigError(
            f"export_quantization={config.export_quantization!r}: export_format "
            f"{config.export_format!r} takes {takes}"
        )


def _load_tokenizer(config: TrainConfig) -> Any:
    """The run's one tokenizer: it prepares the data, then the model loads with it."""
    from sloth_core.sdk.loading import load_tokenizer
    from sloth_core.trust import check_remote_code
    from sloth_core.types import ModelSpec

    local = Path(config.model_name).expanduser()
    if local.is_dir() and not (local / "config.json").is_file():
        raise ConfigError(
            f"model_name={config.model_name!r}: not a model directory: it has no config.json"
        )
    check_remote_code(config.model_name, config.trust_remote_code)
    spec = ModelSpec(
        model_name=config.model_name, max_seq_length=config.max_seq_length,
        trust_remote_code=config.trust_remote_code,
    )  # fmt: skip
    try:
        return load_tokenizer(spec)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"model_name={config.model_name!r}: cannot load its tokenizer: {exc}"
        ) from None


def _load_model(config: TrainConfig, tokenizer: Any, shard_over: Any = None) -> Any:
    """The model to train; with ``shard_over`` (a group), built empty and sharded over it,
    each rank reading only its own slices of the weights (:mod:`.sharded_loading`)."""
    from sloth_core.api import FastLanguageModel, default_dtype

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(config.dtype)
    if shard_over is not None and dtype is None:  # auto: for the device the shards go to
        dtype = default_dtype(shard_over.device.type)
    model, _ = FastLanguageModel.from_pretrained(
        config.model_name,
        max_seq_length=config.max_seq_length,
        dtype=dtype,
        quantization=config.quantization_method,
        full_finetuning=config.full_finetuning,
        device_map=None if shard_over else training_device_map(),
        trust_remote_code=config.trust_remote_code,
        allow_pickle=config.allow_pickle,
        tokenizer=tokenizer,
        empty=shard_over is not None,
    )
    checkpointing = config.checkpointing
    if config.full_finetuning:
        # Sharded by FSDP2 when several processes run (distributed.launched()).
        apply_checkpointing(model, checkpointing, sharded=distributed.launched())
        if shard_over is not None:
            files = sharded_loading.weight_files(_weight_directory(config))
            dtype = model.sloth_spec.dtype
            try:
                model = sharded_loading.load_sharded(model, shard_over, files, compute_dtype=dtype)
            except sharded_loading.NamesDiffer:  # names converted while loading: whole
                return _load_model(config, tokenizer)
        return model
    _check_module_names(config, model)
    return FastLanguageModel.get_peft_model(
        model,
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        use_rslora=config.use_rslora,
        modules_to_save=list(config.modules_to_save) or None,
        target_parameters=list(config.target_parameters) or None,
        target_experts=config.target_experts,
        use_gradient_checkpointing=checkpointing,
        random_state=config.seed,
    )


def _loads_sharded(config: TrainConfig, group, method: Method) -> bool:
    """Full fine-tuning over several processes loads sharded, unless the method keeps a
    frozen copy of the whole model as its reference (DPO, KTO, GRPO with ``beta`` > 0):
    that copy is whole on every rank, so the model loads whole and is sharded after."""
    return group.active and config.full_finetuning and not method.frozen_reference


def _weight_directory(config: TrainConfig) -> Path:
    """The directory of the model's weight files: ``model_name`` itself, or the hub
    snapshot transformers would load (fetched once, as ``from_pretrained`` does)."""
    local = Path(config.model_name).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    patterns = ["*.safetensors", sharded_loading.INDEX_FILE]
    return Path(snapshot_download(config.model_name, allow_patterns=patterns))


def _check_module_names(config: TrainConfig, model) -> None:
    """Every name of ``target_modules``/``modules_to_save`` names a module of the model.

    PEFT refuses a list none of whose names match, but trains a list with one typo
    silently without that adapter.
    """
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for option in ("target_modules", "modules_to_save"):
        wanted = [n for n in getattr(config, option) if n != "all-linear"]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear)})  # fmt: skip
            raise ConfigError(
                f"{option}={list(getattr(config, option))}: {config.model_name} has no "
                f"module named {', '.join(map(repr, unknown))} (its linear layers: "
                f"{', '.join(linear)}){_experts_hint(model)}"
            )
    _check_parameter_names(config, model)


def _experts_hint(model) -> str:
    # An MoE model's experts are 3-D parameters, not modules: say how to reach them.
    from sloth_core.patches import expert_parameter_names

    experts = expert_parameter_names(model)
    if not experts:
        return ""
    return f"; its experts take LoRA through target_experts or target_parameters: {experts}"


def _check_parameter_names(config: TrainConfig, model) -> None:
    """``target_parameters`` name parameters of the model (as PEFT matches them: the whole
    name or a suffix after a dot), and ``target_experts`` asks for a model with experts."""
    from sloth_core.patches import expert_parameter_names

    experts = expert_parameter_names(model)
    if config.target_experts and not experts:
        raise ConfigError(f"target_experts=True: {config.model_name} has no expert weights")
    names = [name for name, _ in model.named_parameters()]
    unknown = [
        wanted
        for wanted in config.target_parameters
        if not any(name == wanted or name.endswith(f".{wanted}") for name in names)
    ]
    if unknown:
        raise ConfigError(
            f"target_parameters={list(config.target_parameters)}: {config.model_name} has no "
            f"parameter named {', '.join(map(repr, unknown))} (its expert weights: "
            f"{', '.join(experts) or 'none'})"
        )


def training_device_map() -> dict[str, int] | None:
    """The whole model on this process's GPU (the one torchrun's rank was given), or
    ``None`` (the CPU) on a machine without one."""
    if not torch.cuda.is_available():
        return None
    return {"": torch.cuda.current_device()}


def _on_cuda(model) -> bool:
    return any(p.is_cuda for p in model.parameters())


def _autocast(config: TrainConfig, model):
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    enabled = config.bf16 == "on" or (config.bf16 == "auto" and bf16_ok and dtype == torch.float32)
    if not enabled:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def _gpu_memory() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def train(config: TrainConfig, *, show_progress: bool = True, console: Any = None) -> TrainResult:
    """Fine-tune as ``config`` says; see :class:`TrainConfig` for the options.

    Started by torchrun with several processes, each is one data-parallel rank
    (:mod:`sloth_core.train.distributed`); rank 0 alone logs and writes.

    Raises:
        Interrupted: on Ctrl-C; the newest checkpoint is intact (a run that had
            written none leaves its output directory as it found it).
    """
    from rich.console import Console

    config.validate()
    if (config.nproc > 1 or config.nnodes > 1) and not distributed.launched():
        name, value = ("nproc", config.nproc) if config.nproc > 1 else ("nnodes", config.nnodes)
        raise ConfigError(
            f"{name}={value}: several processes start from the command line "
            f"(`sloth train --{name} {value}` or torchrun), not inside this one"
        )
    progress = RunProgress()
    group = distributed.setup()
    try:
        if not group.is_main:
            console = Console(quiet=True)
        # soft_wrap: a long line is left whole (a path in it stays one word, for copying).
        with progress_bars(show_progress and group.is_main):
            return _train(config, group, progress, show_progress=show_progress and group.is_main,
                          console=console or Console(soft_wrap=True))  # fmt: skip
    except KeyboardInterrupt:
        if group.is_main:  # a checkpoint retired as Ctrl-C came leaves no hidden folder
            sweep_retired(Path(config.output_dir))
        raise Interrupted(_interrupted(progress)) from None
    finally:
        group.close()


def _interrupted(progress: RunProgress) -> str:
    if not progress.training:
        return "interrupted before training started; nothing was written"
    if progress.checkpoint is None:
        kept = "nothing was kept" if not progress.kept else "its outputs are kept"
        return f"interrupted at step {progress.step}, before the first checkpoint: {kept}"
    return (
        f"interrupted at step {progress.step}; {progress.checkpoint.name} is intact: "
        "resume with --resume"
    )


def _train(
    config: TrainConfig, group, progress: RunProgress, *, show_progress: bool, console: Any
) -> TrainResult:
    _check_plugins(config)
    tokenizer = _load_tokenizer(config)
    method = method_for(config)
    prepared = prepare_data(config, tokenizer, method)
    console.print("data: " + _data_line(prepared, config))
    data = data_fingerprints(config)
    checkpoint = None
    if config.resume:  # read and compared before the model loads: refuse mismatches early
        checkpoint = choose_checkpoint(config.output_dir, console.print)
        if checkpoint is None:
            console.print(f"no checkpoint in {config.output_dir}: starting from step 0")
        else:
            check_resume(config, checkpoint, data, group.world_size)
            progress.checkpoint = checkpoint.path
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    torch.manual_seed(config.seed)
    sharded = _loads_sharded(config, group, method)
    model = _load_model(config, tokenizer, group if sharded else None)
    if sharded and distributed.is_sharded(model):
        console.print(f"model: loaded sharded over {group.world_size} processes (each read "
                      "its own slices of the weights)")  # fmt: skip
    elif sharded:
        console.print("model: loaded whole on every process, then sharded (the weight files "
                      "name their tensors other than the model does, e.g. per-expert MoE "
                      "weights transformers converts while loading)")  # fmt: skip
    if group.active and group.device.type == "cuda" and not _on_cuda(model):
        model.to(group.device)
    method.attach(model)  # the reference model is the one loaded, not the checkpoint's
    if config.checkpointing is Checkpointing.AUTO:
        _plan_memory(config, model, method, prepared.train, console)
    if checkpoint is not None:  # each rank's own slices when sharded already, else whole
        load_tensors(checkpoint, model)
    # Everything that can be refused has been: now the output directory.
    output = RunOutput(config)
    if group.is_main:
        output.open()
        if checkpoint is not None:
            drop_metrics_after(output.path, checkpoint.step)
        elif config.resume:
            (output.path / METRICS_FILE).unlink(missing_ok=True)
    group.barrier()  # rank 0 has made the directory every rank's checkpoints go to
    try:
        progress.training = True
        return _run(config, group, progress, model, tokenizer, prepared, checkpoint, data,
                    output, method, show_progress=show_progress, console=console)  # fmt: skip
    except BaseException:
        if group.is_main:
            output.rollback()
        progress.kept = output.committed
        raise


def _plan_memory(config: TrainConfig, model, method: Method, examples: list[Any],
                 console: Any) -> None:  # fmt: skip
    """``gradient_checkpointing = auto``: keep, recompute or offload each decoder layer so
    that the largest micro-batch ``examples`` make (``method.forward_shape``: rows of the
    longest example, or packed to ``max_seq_length``) fits ``memory_budget_gib``; the plan
    is printed."""
    device = next(model.parameters()).device
    budget = int(config.memory_budget_gib * 2**30) or memory_plan.device_budget_bytes(device)
    rows, width = method.forward_shape(examples, model)
    try:
        plan = memory_plan.plan_for_step(
            model, sequences=rows, seq=width, budget_bytes=budget,
            autocast=_autocast(config, model),
        )  # fmt: skip
    except ValueError as exc:  # the budget is below what the step needs
        raise ConfigError(f"memory_budget_gib={config.memory_budget_gib:g}: {exc}") from None
    console.print(plan.describe())
    console.print(plan.table())


def _data_line(prepared: PreparedData, config: TrainConfig) -> str:
    """What the data came to: rows kept and dropped, the split, the eval set's own rows."""
    stats = prepared.stats
    line = f"{stats.summary()}; {len(prepared.train)} train / {len(prepared.eval)} eval"
    if prepared.eval_stats is not None:
        line += f"; eval_dataset {config.eval_dataset}: {prepared.eval_stats.summary()}"
    return line


def _run(
    config: TrainConfig, group, progress: RunProgress, model, tokenizer,
    prepared: PreparedData, checkpoint, data: dict, output: RunOutput, method: Method, *,
    show_progress: bool, console: Any,
) -> TrainResult:  # fmt: skip
    """Train from step 0 or ``checkpoint``'s, save, export: the run proper."""
    # Wrapped before the optimizer exists: FSDP2 replaces the parameters by their shards.
    sharded = group.active and config.full_finetuning
    compute_dtype = (  # sharded at load, the parameters are the float32 master shards
        model.sloth_spec.dtype if distributed.is_sharded(model)
        else next(p.dtype for p in model.parameters() if p.is_floating_point())
    )  # fmt: skip
    run = _build(config, group, progress, model, tokenizer, prepared, checkpoint, data, output,
                 method, sharded=sharded, compute_dtype=compute_dtype, console=console)  # fmt: skip
    bar_shown = show_progress and console.is_terminal
    _loop(run, [LogMetrics(bar_shown=bar_shown), Evaluate(), SaveCheckpoints()], bar_shown)
    with _keeps_checkpoint(config, progress.checkpoint):
        final = config.final_format
        if sharded and final in sharded_export.FORMATS:  # every rank writes its own rows
            run.result.final_path = output.path / FINAL_DIR
            sharded_export.write_final(model, tokenizer, run.result.final_path,
                                       dtype=compute_dtype, group=group)  # fmt: skip
            console.print(f"saved {final} to {run.result.final_path} (written shard by shard)")
            final = "none"
        if sharded and (final != "none" or config.export_format):
            model = _gathered(config, model, compute_dtype)  # rank 0 gets the whole model
        if group.is_main:
            _export_run(config, model, tokenizer, run.result, console, final)
    group.barrier()  # every rank's collectives are over before any tears the group down
    return run.result


def _build(
    config: TrainConfig, group, progress: RunProgress, model, tokenizer,
    prepared: PreparedData, checkpoint, data: dict, output: RunOutput, method: Method, *,
    sharded: bool, compute_dtype: torch.dtype, console: Any,
) -> RunState:  # fmt: skip
    """The model as the ranks run it, the batches, the optimizer and schedule, the state
    of the checkpoint resumed from, the metrics log."""
    train_model = group.wrap(model, full=sharded, compute_dtype=compute_dtype)
    group.reseed(config.seed, 0)
    model.train()
    method.rank = group.rank
    method.output_dir = output.path if group.is_main else None
    batches, eval_batches, total_steps = _batches(config, group, method, prepared, tokenizer,
                                                  sharded=sharded)  # fmt: skip
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, total_steps)
    resumed: dict[str, Any] = {}
    if checkpoint is not None:
        resumed = load_training_state(
            checkpoint, model=model, optimizer=optimizer, scheduler=scheduler
        )  # fmt: skip
        console.print(f"resumed from {checkpoint.path.name}: step {resumed['step']}")
        group.reseed(config.seed, resumed["step"])
    step = resumed.get("step", 0)
    progress.step = step
    autocast = contextlib.nullcontext if sharded else _autocast(config, model)
    if config.precompute_ref_log_probs:
        in_order = method.batches(
            prepared.train, batch_size=config.per_device_train_batch_size,
            pad_token_id=_pad(tokenizer), seed=config.seed, train=False,
        )  # fmt: skip
        method.precompute(in_order, len(prepared.train), autocast)
    if group.is_main:
        (output.path / TRAIN_CONFIG).write_text(_json(config.to_dict()))
    log = (
        MetricsLog(output.path, report_to=config.report_to, purge_step=step + 1 if step else None)
        if group.is_main else distributed.NoLog()
    )  # fmt: skip
    return RunState(
        config=config, group=group, model=model, train_model=train_model, optimizer=optimizer,
        scheduler=scheduler, batches=batches, eval_batches=eval_batches,
        # Sharded, FSDP2 casts each layer to the compute dtype itself (the shards are fp32).
        autocast=autocast, method=method,
        total_steps=total_steps, output=output, progress=progress,
        result=TrainResult(output.path, total_steps, data_stats=prepared.stats), log=log,
        console=console, data=data, resumed=resumed, step=step,
        consumed=resumed.get("micro_batches", 0),
    )  # fmt: skip


def _pad(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _batches(
    config: TrainConfig, group, method: Method, prepared: PreparedData, tokenizer, *,
    sharded: bool,
) -> tuple[Any, Any, int]:  # fmt: skip
    """The training batches (global: every rank's rows), the eval batches (``None`` where
    this rank does not evaluate) and the run's optimizer steps."""
    pad, per_device = _pad(tokenizer), config.per_device_train_batch_size
    batches = method.batches(
        prepared.train, batch_size=per_device * group.world_size, pad_token_id=pad,
        seed=config.seed, train=True,
    )  # fmt: skip
    eval_batches = None
    # The other ranks do not evaluate, unless the model is sharded: then every forward
    # needs them all.
    if prepared.eval and (group.is_main or sharded):
        eval_batches = method.batches(
            prepared.eval, batch_size=per_device, pad_token_id=pad, seed=config.seed, train=False
        )  # fmt: skip
    if config.max_steps > 0:
        return batches, eval_batches, config.max_steps
    # GRPO's num_iterations: each batch of completions serves that many steps.
    used = math.ceil(
        config.num_train_epochs * batches.num_batches() / config.gradient_accumulation_steps
    )
    return batches, eval_batches, max(1, used) * method.steps_per_batch


def _loop(run: RunState, callbacks: list[Callback], bar_shown: bool) -> None:
    """Optimizer steps up to ``total_steps``, the callbacks after each, then at the end."""
    config, group = run.config, run.group
    try:
        for callback in callbacks:
            callback.on_start(run)
        with Progress(run.total_steps, start=run.step, enabled=bar_shown) as run.bar:
            while run.step < run.total_steps:
                micro = []  # none when the method reuses its last batch (GRPO's iterations)
                for _ in range(
                    config.gradient_accumulation_steps if run.method.needs_data(run.step) else 0
                ):
                    epoch, index = divmod(run.consumed, run.per_epoch)
                    batch = run.batches.batch(epoch, index)
                    micro.append(distributed.rank_slice(batch, group, run.method.rows_per_device))
                    run.consumed += 1
                run.method.step = run.step
                done = train_step(
                    run.train_model, run.optimizer, micro, scheduler=run.scheduler,
                    autocast=run.autocast, group=group, max_grad_norm=config.max_grad_norm,
                    forward_backward=run.method.forward_backward,
                )  # fmt: skip
                run.step += 1
                run.progress.step = run.step
                run.tokens_seen += done.tokens
                run.result.losses.append(done.loss)
                elapsed = time.perf_counter() - run.started
                record = {
                    "step": run.step, "epoch": run.consumed / run.per_epoch, "loss": done.loss,
                    "lr": done.lr, "grad_norm": done.grad_norm,
                    "tokens_per_s": run.tokens_seen / max(elapsed, 1e-9),
                    "gpu_mem_gib": _gpu_memory(), **done.metrics,
                }  # fmt: skip
                for callback in callbacks:
                    callback.on_step(run, record)
        run.bar = None
        for callback in callbacks:
            callback.on_end(run)
    finally:
        run.log.close()


def _gathered(config: TrainConfig, model, dtype: torch.dtype) -> Any:
    """The trained weights of a sharded model in a whole one on rank 0's CPU (for the
    final export, which writes from one process); None on the other ranks.

    The model is built empty and takes the gathered tensors as its own (cast one by one):
    rank 0 holds the trained weights once, and reads none of the original files."""
    from transformers import AutoConfig

    from sloth_core.sdk.loading import empty_causal_lm

    whole = distributed.full_state(model)
    if not whole:
        return None
    for name, tensor in whole.items():
        whole[name] = tensor.to(dtype)
    plain_config = AutoConfig.from_pretrained(
        config.model_name, trust_remote_code=config.trust_remote_code
    )  # fmt: skip
    plain = empty_causal_lm(plain_config, dtype, config.trust_remote_code)
    missing, unexpected = plain.load_state_dict(whole, strict=False, assign=True)
    plain.tie_weights()
    left = [name for name, p in plain.named_parameters() if p.is_meta]
    if left or unexpected:
        raise SlothError(f"the gathered weights do not fit {type(plain).__name__}: "
                         f"missing {left[:3]}, unexpected {unexpected[:3]}")  # fmt: skip
    return plain


@contextlib.contextmanager
def _keeps_checkpoint(config: TrainConfig, checkpoint: Path | None):
    """A failure of the final save or export keeps the run (its last checkpoint) and says
    how to export it again."""
    try:
        yield
    except Exception as exc:
        raise SlothError(
            f"training finished and {checkpoint} is saved, but the final save/export "
            f"failed: {exc}; export it with `sloth export {checkpoint} --format "
            f"{config.export_format or config.final_format} --output PATH`"
        ) from exc


def _export_run(
    config: TrainConfig, model, tokenizer, result: TrainResult, console, final: str
) -> None:  # fmt: skip
    """The final model in ``final`` (its format; ``none``: nothing, or written already),
    then the export."""
    from sloth_core.api import export

    out = result.output_dir
    if final != "none":
        result.final_path = out / FINAL_DIR
        export(model, tokenizer, result.final_path, format=final, force=True)
        console.print(f"saved {final} to {result.final_path}")
    if config.export_format:
        result.export_path = out / f"export-{config.export_format}"
        export(
            model, tokenizer, result.export_path, format=config.export_format, force=True,
            quantization=config.export_quantization or None,
        )  # fmt: skip
        console.print(f"exported {config.export_format} to {result.export_path}")
    picture = plot_losses(out)
    if picture is not None:
        console.print(f"loss curve: {picture}")


def _json(value: Any) -> str:
    return json.dumps(value, indent=2)
