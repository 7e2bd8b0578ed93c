"""Data-parallel training over several processes: the process group, and ``--nproc``.

Every process (rank) holds the whole model; DDP all-reduces the gradients of the trainable
tensors only (LoRA adapters, ``modules_to_save``), so the frozen, possibly quantized base
weights never travel. ``torchrun`` (or ``sloth train --nproc N``, which re-launches itself
through it) starts the processes and sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``;
:func:`setup` joins the group: NCCL on GPUs (one per process), gloo on the CPU. Several
machines (``--nnodes``) meet at a c10d rendezvous (:func:`launch_command`); the ranks are
then global, and ``LOCAL_RANK`` picks the GPU.

Full fine-tuning shards instead (FSDP2, ``fully_shard``): each decoder layer, then the
root, keeps ``1/world_size`` of its weights, gradients and optimizer state, in float32 (the
master copy), and gathers the layer's weights in the compute dtype just before using them
(:func:`shard`). A model too big for one GPU trains this way.

The data of global micro-batch ``i`` is the same rows whatever the world size: every rank
builds the batches of the global batch ``per_device_train_batch_size * world_size`` and
keeps its own slice of rows (:func:`rank_slice`), so 2 ranks of batch ``b`` train on
exactly what 1 process of batch ``2b`` does.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from .config import TrainConfig

#: torchrun's variables; WORLD_SIZE marks a process started by a launcher.
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Group:
    """This process's place in the run; ``world_size == 1`` is a plain single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owned: bool = False  # we initialised the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """``values`` summed over the ranks (float64, so token counts stay exact)."""
        return self._all_reduce(values, dist.ReduceOp.SUM)

    def all_max(self, values: list[float]) -> list[float]:
        """``values``, each the largest over the ranks."""
        return self._all_reduce(values, dist.ReduceOp.MAX)

    def _all_reduce(self, values: list[float], op) -> list[float]:
        if not self.active:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=op)
        return tensor.tolist()

    def wrap(self, model: torch.nn.Module, *, full: bool = False, compute_dtype=None):
        """``model`` under DDP (gradients summed, see :func:`_sum_hook`), sharded by FSDP2
        when ``full`` (every weight trains; see :func:`shard`), or as it is alone."""
        if not self.active:
            return model
        if full:  # sharded already when it was loaded sharded (sharded_loading)
            return model if is_sharded(model) else shard(model, self, compute_dtype=compute_dtype)
        from torch.nn.parallel import DistributedDataParallel

        # Every rank loaded the same weights and seeded the same adapters; sending rank 0's
        # trainable tensors is enough (DDP's own init sync would send the frozen base too).
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    dist.broadcast(param.data, src=0)
        ddp = DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            broadcast_buffers=False,
            init_sync=False,
        )
        ddp.register_comm_hook(None, _sum_hook)
        return ddp

    def reseed(self, seed: int, step: int) -> None:
        """Rank 0 keeps the single-process generators; the others draw other dropout masks.

        Checkpoints hold rank 0's random states, so a resumed rank ``r > 0`` reseeds from
        ``(seed, rank, step)``: with ``lora_dropout`` > 0 a run is reproducible for a given
        world size, and exact across world sizes only without dropout.
        """
        if self.rank:
            torch.manual_seed(seed + 7919 * self.rank + 104729 * step)

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            # A sharded model is held in reference cycles (FSDP's hooks and states) with
            # the collectives' pending work objects; freed only at interpreter exit, after
            # the group, gloo's threads can abort the process ("terminate called without an
            # active exception"). Free them while the group still exists.
            gc.collect()
            dist.destroy_process_group()


def shard(model: torch.nn.Module, group: Group, *, compute_dtype=None) -> torch.nn.Module:
    """FSDP2 over ``group``: every decoder layer its own unit, the rest (embeddings, final
    norm, lm_head, tied or not) the root's. Modified in place and returned.

    The shards are float32, the master weights the optimizer updates; each unit is
    gathered in ``compute_dtype`` (the dtype the model was loaded in, by default) for its
    forward and backward, and gradients are reduced in float32. Gradients are summed, not
    averaged, over the ranks: each rank's loss is already divided by the step's global
    token count (as :func:`_sum_hook` does for DDP).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    _refuse_quantized(model)
    if compute_dtype is None:
        compute_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    mesh = init_device_mesh(group.device.type, (group.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    model.float()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for unit in model.modules():  # each unit reduces its own gradients
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)
            # A plain sum: a factor other than the world size takes NCCL's PreMulSum,
            # which gloo lacks.
            unit.set_force_sum_reduction_for_comms(True)
    return model


def _refuse_quantized(model: torch.nn.Module) -> None:
    """FSDP2 shards every parameter as a plain tensor: a bitsandbytes 4-bit or 8-bit weight
    would lose what it is read with (its ``quant_state``, bitsandbytes#1945)."""
    for name, param in model.named_parameters():
        if not param.is_floating_point() or any(
            hasattr(param, field) for field in ("quant_state", "SCB")
        ):
            raise ValueError(
                f"{name} is quantized: FSDP2 cannot shard bitsandbytes' quantized weights "
                "(each shard would lose its quant_state). Train a quantized model with LoRA, "
                "data-parallel on several processes, or fine-tune in full unquantized"
            )


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP shards one by one: the classes transformers names in
    ``_no_split_modules`` (kept whole when a model is split over devices, for the same
    reason: a block's weights are used together)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(model).__name__}: no decoder layers to shard (its _no_split_modules "
            f"{sorted(names)} name no submodule)"
        )
    return layers


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of a sharded ``model``, whole and on the CPU, on rank 0 (empty on the
    others). Every rank must call it: the shards are gathered."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return cast(dict[str, torch.Tensor], get_model_state_dict(model, options=options))


def _sum_hook(_state, bucket):  # unannotated: DDP checks hooks' annotations as types
    # DDP's default hook averages over ranks; each rank's loss is already divided by the
    # step's global label-token count, so the sum is the exact gradient (no loss * W).
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def launched() -> bool:
    """Started by torchrun (or ``sloth train --nproc``) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup() -> Group:
    """Join the process group torchrun describes; a single-process :class:`Group` otherwise."""
    if not launched():
        return Group()
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise RuntimeError(
                f"rank {rank} is process {local} of this host, which has "
                f"{torch.cuda.device_count()} GPU(s): start at most one process per GPU "
                f"(--nproc / --nproc-per-node)"
            )
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast: off unless asked
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    owned = not dist.is_initialized()
    if owned:
        # Rank 0 evaluates and writes alone while the others wait: NCCL's 10-minute
        # default would cut a long evaluation short.
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=1))
    return Group(rank=rank, world_size=world, local_rank=local, device=device, owned=owned)


def rank_slice(batch: dict[str, torch.Tensor], group: Group, per_device: int) -> dict:
    """This rank's rows of a global micro-batch, trimmed of columns that are padding alone.

    A rank left without rows (the short last batch of an epoch) gets one row with every
    label masked: it still runs forward and backward, so DDP's all-reduce matches up, and
    adds nothing to the loss or the gradients.
    """
    if not group.active:
        return batch
    start = group.rank * per_device
    rows = {key: value[start : start + per_device] for key, value in batch.items()}
    if rows["input_ids"].shape[0] == 0:
        rows = {key: value[:1].clone() for key, value in batch.items()}
        for key in rows:
            if key.endswith("labels"):  # a preference batch's KL rows too
                rows[key].fill_(-100)
        return rows
    if any(value.dim() != 2 for value in rows.values()):
        return rows  # a preference batch: padded to its own longest row already
    if "attention_mask" in rows:  # right padding: the columns past the longest row
        width = int(rows["attention_mask"].sum(1).max())
    else:  # packed: trailing padding sits on ids == pad with labels -100, restarted positions
        real = (rows["labels"] != -100).any(0).nonzero()
        width = rows["input_ids"].shape[1] if len(real) == 0 else int(real.max()) + 1
    return {key: value[:, :width] for key, value in rows.items()}


def no_sync(model: torch.nn.Module, last: bool):
    """DDP's ``no_sync`` for every micro-batch but the step's last (one all-reduce a step)."""
    from torch.nn.parallel import DistributedDataParallel

    if last or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


class NoLog:
    """The metrics log of ranks other than 0: they log nothing."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def launch_command(argv: list[str], config: TrainConfig) -> list[str]:
    """The torch.distributed.run command that starts ``sloth <argv>`` as ``config`` asks.

    One machine: ``--standalone`` (a local rendezvous on a free port). Several
    (``nnodes`` > 1): every node runs this with its own ``node_rank`` and they meet at
    ``rdzv_endpoint`` (c10d rendezvous); node 0 hosts the rendezvous store there
    (``is_host``), and the run's id comes from ``output_dir``, which every node names
    alike. c10d numbers the nodes itself (global rank 0 may be on any node), so the outputs
    need a path every node sees.
    """
    command = [sys.executable, "-m", "torch.distributed.run"]
    if config.nnodes > 1:
        run_id = hashlib.sha256(os.path.normpath(config.output_dir).encode()).hexdigest()
        command += [
            f"--nnodes={config.nnodes}", f"--node-rank={config.node_rank}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={config.rdzv_endpoint}",
            f"--rdzv-id=sloth-{run_id[:16]}", f"--rdzv-conf=is_host={int(config.node_rank == 0)}",
        ]  # fmt: skip
    else:
        command.append("--standalone")
    return [*command, f"--nproc-per-node={config.nproc}", "-m", "sloth_core", *argv]


def relaunch(argv: list[str], config: TrainConfig) -> int:
    """Run ``sloth <argv>`` through torch.distributed.run (:func:`launch_command`); its code.

    ``argv`` is the command line without the launch options: the children learn their
    place from torchrun's variables.
    """
    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARS}
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(launch_command(argv, config), env=env)
