"""Several machines: `sloth train --nnodes N --node-rank R --rdzv-endpoint host:port`
starts torchrun with a c10d rendezvous; two "nodes" of two processes each on this machine
(gloo, CPU) train exactly as one process of the global batch."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest
import torch
from _ranks import ENV, REL, losses, options, train_argv, write_data

from sloth_core.cli import build_parser
from sloth_core.cli.train_cmd import _argv_without_launch
from sloth_core.train import ConfigError, TrainConfig
from sloth_core.train.distributed import launch_command


def _config(**values) -> TrainConfig:
    return TrainConfig.from_mapping({"model_name": "m", "dataset": "d.jsonl", **values})


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"nnodes": 0}, "nnodes=0: must be at least 1"),
        ({"nnodes": 2, "node_rank": 2, "rdzv_endpoint": "h:1"}, r"node_rank=2: .*\[0, nnodes=2\)"),
        ({"node_rank": -1}, r"node_rank=-1: must be in \[0, nnodes=1\)"),
        ({"nnodes": 2}, "nnodes=2: .*rdzv_endpoint"),
        ({"nnodes": 2, "rdzv_endpoint": "node0"}, "rdzv_endpoint='node0': must be host:port"),
        ({"nnodes": 2, "rdzv_endpoint": ":29500"}, "must be host:port"),
        ({"nnodes": 2, "rdzv_endpoint": "node0:99999"}, "must be host:port"),
    ],
)  # fmt: skip
def test_node_options_are_checked(values, match, alpaca_file):
    with pytest.raises(ConfigError, match=match):
        _config(**{**values, "dataset": str(alpaca_file)}).validate(check_output=False)


def test_node_options_are_launch_options_not_resume_keys():
    from sloth_core.train.resume import RESUME_KEYS

    assert not {"nproc", "nnodes", "node_rank", "rdzv_endpoint"} & set(RESUME_KEYS)


def test_several_nodes_launch_through_a_c10d_rendezvous():
    nodes = [_config(nproc=2, nnodes=2, node_rank=rank, rdzv_endpoint="node0:29400",
                     output_dir="/shared/run")  # fmt: skip
             for rank in (0, 1)]  # fmt: skip
    first, second = (launch_command(["train", "x.toml"], c) for c in nodes)
    assert "--standalone" not in first
    for flag in ("--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29400",
                 "--nproc-per-node=2"):  # fmt: skip
        assert flag in first and flag in second
    assert "--node-rank=0" in first and "--node-rank=1" in second
    assert "--rdzv-conf=is_host=1" in first and "--rdzv-conf=is_host=0" in second
    run_id = [arg for arg in first if arg.startswith("--rdzv-id=")]
    assert len(run_id) == 1 and run_id[0] in second  # the same run on every node
    other = launch_command(["train"], nodes[0].replace(output_dir="/shared/other"))
    assert run_id[0] not in other  # another output_dir, another run
    assert first[-4:] == ["-m", "sloth_core", "train", "x.toml"]
    alone = launch_command(["train"], _config(nproc=2))
    assert "--standalone" in alone and not any(a.startswith("--rdzv") for a in alone)


def test_the_processes_are_not_given_the_launch_options():
    args = build_parser().parse_args(
        [
            "train",
            "--nproc",
            "2",
            "--nnodes",
            "2",
            "--node-rank",
            "1",
            "--rdzv-endpoint",
            "h:1",
            "--max-steps",
            "3",
        ]  # fmt: skip
    )
    assert _argv_without_launch(args) == ["train", "--max_steps", "3"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="two nodes of 2 ranks on one host: CPU")
def test_two_nodes_of_two_ranks_train_as_one_process_of_the_global_batch(tiny_llama, tmp_path):
    """4 ranks of batch 1 (2 nodes x 2 processes, meeting at a c10d rendezvous on
    localhost) give 1 process of batch 4's per-step losses; the global rank 0 alone logs
    and writes."""
    data = write_data(tmp_path / "data.jsonl")
    short = {"max_steps": 2, "save_steps": 0}
    out, endpoint = tmp_path / "nodes", f"127.0.0.1:{_free_port()}"
    node_flags = ["--nproc", "2", "--nnodes", "2", "--rdzv-endpoint", endpoint]
    # The baseline runs beside the nodes: their processes spend much of their time starting.
    commands = [train_argv(options(tiny_llama, data, tmp_path / "single", 4, **short))] + [
        train_argv(options(tiny_llama, data, out, 1, **short), *node_flags, "--node-rank", rank)
        for rank in ("0", "1")
    ]  # fmt: skip
    logs = [tmp_path / f"run{i}.log" for i in range(len(commands))]
    runs = []
    for command, log in zip(commands, logs, strict=True):
        with log.open("w") as sink:  # a file, not a pipe: no run waits on a full pipe
            runs.append(subprocess.Popen(command, env=ENV, stdout=sink, stderr=sink))
    try:
        codes = [run.wait(timeout=240) for run in runs]
    finally:
        for run in runs:
            run.kill()
    for code, log in zip(codes, logs, strict=True):
        assert code == 0, log.read_text()[-4000:]
    single, four = losses(tmp_path / "single"), losses(out)
    assert sorted(four) == sorted(single) == [1, 2]
    for step, loss in single.items():
        assert four[step] == pytest.approx(loss, rel=REL), step
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["world_size"] == 4 and state["micro_batches"] == 4  # global micro-batches
