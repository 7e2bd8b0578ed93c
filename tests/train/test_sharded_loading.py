"""Sharded loading (sloth_core.train.sharded_loading): at 2 and 4 gloo ranks no rank's
resident memory grows past its share of the float32 model plus a margin, and the
gathered weights equal the files' (the training equality at 2 and 4 ranks is in
test_train_distributed.py, whose full fine-tuning runs load sharded)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _ranks import ENV
from safetensors.torch import load_file, save_file

from sloth_core.errors import SlothError
from sloth_core.testing import tiny_model
from sloth_core.train import sharded_loading

PROBE = Path(__file__).with_name("_shard_probe.py")
#: What a rank may hold past its share of the float32 weights while loading: the one
#: slice being read (as stored, and its mapped file pages), the process group's buffers,
#: the allocator's slack. The whole model in float32 is 232 MB here.
MARGIN = 32 * 2**20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A 58M-parameter llama in bf16, its weights split over two files and an index (as
    transformers writes big models)."""
    path = tiny_model(
        "llama", tmp_path_factory.mktemp("sharded") / "model", dtype=torch.bfloat16,
        vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False,
    )  # fmt: skip
    whole = path / "model.safetensors"
    tensors = load_file(whole)
    names = sorted(tensors)
    parts = {"model-1.safetensors": names[::2], "model-2.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in parts.items():
        save_file({key: tensors[key] for key in keys}, str(path / file))
        weight_map.update(dict.fromkeys(keys, file))
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (path / sharded_loading.INDEX_FILE).write_text(json.dumps(index))
    whole.unlink()
    return path


@pytest.mark.parametrize("ranks", [2, 4])
def test_each_rank_holds_its_share_while_loading(model_dir, tmp_path, ranks):
    if torch.cuda.is_available() and torch.cuda.device_count() < ranks:
        pytest.skip(f"{ranks} ranks on a GPU machine need {ranks} GPUs")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={ranks}", str(PROBE), str(model_dir), str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(ranks)]
    full = 4 * sum(t.numel() for f in sharded_loading.weight_files(model_dir)
                   for t in load_file(f).values())  # fmt: skip
    assert full > 200e6  # big enough that the share and the margin differ
    for record in records:
        assert record["sharded"] and record["dtypes"] == ["torch.float32"]
        assert 0 < record["peak_growth"] < full / ranks + MARGIN, (record, full)
    assert records[0]["equal"]  # gathered, every weight is the file's, cast to float32
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(model_dir)  # the rotary tables as computed
    expected = {name: b.float().sum().item() for name, b in plain.named_buffers()}
    assert records[0]["buffers"] == pytest.approx(expected)


def test_a_name_the_files_lack_is_refused_before_anything_is_allocated(model_dir, tmp_path):
    from sloth_core.api import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(str(model_dir), full_finetuning=True, empty=True)
    assert all(p.is_meta for p in model.parameters())
    tensors = load_file(model_dir / "model-1.safetensors")
    dropped = sorted(tensors)[0]
    tensors.pop(dropped)
    save_file(tensors, str(tmp_path / "part.safetensors"))
    reader = sharded_loading.SliceReader([tmp_path / "part.safetensors",
                                          model_dir / "model-2.safetensors"])  # fmt: skip
    with pytest.raises(SlothError, match=f"missing from the weight files: .*{dropped}"):
        sharded_loading.check_names(model, reader)
