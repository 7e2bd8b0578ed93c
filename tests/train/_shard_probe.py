"""Run by torchrun in tests/train/test_sharded_loading.py: one rank of a sharded load.

Argv: MODEL_DIR OUT_DIR. Each rank builds the model empty, resets its peak resident
memory (VmHWM), loads and shards it (:func:`sloth_core.train.sharded_loading.load_sharded`)
and writes ``rank-R.json`` with the peak's growth over the resident memory at the reset;
then rank 0 gathers the whole model and writes whether every weight equals the file's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from sloth_core.api import FastLanguageModel
from sloth_core.train import distributed, sharded_loading


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main(model_dir: Path, out: Path) -> None:
    group = distributed.setup()
    model, _ = FastLanguageModel.from_pretrained(
        str(model_dir), dtype=torch.bfloat16, full_finetuning=True, empty=True
    )  # fmt: skip
    group.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS from here on
    before = _status_kib("VmRSS")
    files = sharded_loading.weight_files(model_dir)
    sharded_loading.load_sharded(model, group, files, compute_dtype=torch.bfloat16)
    growth = (_status_kib("VmHWM") - before) * 1024
    record = {"rank": group.rank, "world": group.world_size, "peak_growth": growth,
              "sharded": distributed.is_sharded(model),
              "dtypes": sorted({str(p.to_local().dtype) for p in model.parameters()})}  # fmt: skip
    whole = distributed.full_state(model)  # every rank takes part; rank 0 gets it
    if group.is_main:
        saved = {k: v for f in files for k, v in load_file(f).items()}
        record["equal"] = sorted(whole) == sorted(saved) and all(
            torch.equal(whole[name], saved[name].float()) for name in saved
        )
        record["buffers"] = {name: b.float().sum().item() for name, b in model.named_buffers()}
    (out / f"rank-{group.rank}.json").write_text(json.dumps(record))
    # The sharded model and its collectives' work objects go before the group does (as
    # the trainer drops them): alive at interpreter exit, after the group, gloo's threads
    # can abort the process ("terminate called without an active exception").
    del model, whole
    group.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
