"""``sloth train`` options: files, flags, and errors that name the option before any work."""

from __future__ import annotations

import pytest

from sloth_core.cli import main
from sloth_core.train import ConfigError, TrainConfig, read_config_file


def _valid(tmp_path, **changes):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    return TrainConfig(model_name="m", dataset=str(data), output_dir=str(tmp_path / "out"),
                       **changes)  # fmt: skip


def test_toml_yaml_and_json_files_give_the_same_config(tmp_path):
    (tmp_path / "a.toml").write_text('[train]\nmodel_name = "m"\nr = 8\npacking = true\n'
                                     'target_modules = ["q_proj", "v_proj"]\n')  # fmt: skip
    (tmp_path / "a.yaml").write_text("model_name: m\nr: 8\npacking: true\n"
                                     "target_modules: [q_proj, v_proj]\n")  # fmt: skip
    (tmp_path / "a.json").write_text('{"model_name": "m", "r": 8, "packing": true, '
                                     '"target_modules": ["q_proj", "v_proj"]}')  # fmt: skip
    configs = [TrainConfig.from_mapping(read_config_file(tmp_path / f"a.{ext}"))
               for ext in ("toml", "yaml", "json")]  # fmt: skip
    assert configs[0] == configs[1] == configs[2]
    assert (configs[0].r, configs[0].packing, configs[0].target_modules) == (
        8, True, ["q_proj", "v_proj"],
    )  # fmt: skip


def test_unknown_option_suggests_the_right_one(tmp_path):
    (tmp_path / "c.toml").write_text("learning_rat = 1e-4\n")
    with pytest.raises(
        ConfigError, match=r"c.toml: unknown option 'learning_rat'.*'learning_rate'"
    ):
        TrainConfig.from_mapping(read_config_file(tmp_path / "c.toml"), source="c.toml")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("r", "sixteen", "option 'r' takes a number"), ("packing", "maybe", "takes true or false"),
     ("max_steps", 2.5, "takes a number")],
)  # fmt: skip
def test_wrong_types_name_the_option(key, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_mapping({key: value})


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"learning_rate": 2.0}, "learning_rate"),
     ({"lr_scheduler_type": "step"}, "lr_scheduler_type"),
     ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
     ({"max_steps": 0}, "max_steps"), ({"optim": "sgd"}, "optim"),
     ({"data_format": "xml"}, "data_format"), ({"lora_dropout": 1.5}, "lora_dropout"),
     ({"full_finetuning": True, "load_in_4bit": True}, "cannot be quantized"),
     ({"resume": True, "overwrite": True}, "exclude"),
     ({"memory_budget_gib": -1.0}, "memory_budget_gib=-1.0: must not be negative"),
     ({"memory_budget_gib": 40.0, "gradient_checkpointing": "off"},
      "memory_budget_gib=40.0: gradient_checkpointing=off is fixed"),
     ({"gradient_checkpointing": "auto", "full_finetuning": True, "nproc": 2,
       "save_method": "none"}, "gradient_checkpointing='auto': auto plans one device")],
)  # fmt: skip
def test_validation_names_the_bad_option(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        _valid(tmp_path, **changes).validate()


def test_missing_dataset_file_and_non_empty_output(tmp_path):
    with pytest.raises(ConfigError, match="dataset=.*no such file"):
        TrainConfig(model_name="m", dataset=str(tmp_path / "nope.jsonl")).validate()
    config = _valid(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="output_dir=.*not empty.*--overwrite.*--resume"):
        config.validate()
    config.replace(overwrite=True).validate()
    config.replace(resume=True).validate()


def test_flags_override_the_file_and_accept_both_spellings(tmp_path, monkeypatch):
    from sloth_core.cli import build_parser
    from sloth_core.cli.train_cmd import build_config

    (tmp_path / "c.toml").write_text('model_name = "m"\nr = 8\nlearning_rate = 1e-4\n')
    args = build_parser().parse_args(
        ["train", str(tmp_path / "c.toml"), "--r", "4", "--learning_rate", "3e-4",
         "--batch-size", "3", "--no-train-on-responses-only", "--target-modules", "q_proj,o_proj"]
    )  # fmt: skip
    config = build_config(args)
    assert (config.r, config.learning_rate, config.per_device_train_batch_size) == (4, 3e-4, 3)
    assert config.train_on_responses_only is False
    assert config.target_modules == ["q_proj", "o_proj"]
    assert config.model_name == "m"


def test_cli_errors_exit_non_zero_and_write_nothing(tmp_path, capsys, tiny_llama):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken"\n')
    out = tmp_path / "out"
    code = main(["train", "--model-name", str(tiny_llama), "--dataset", str(bad),
                 "--output-dir", str(out)])  # fmt: skip
    assert code == 1
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert not out.exists()
    code = main(["train", "--model-name", str(tiny_llama), "--dataset", str(bad),
                 "--output-dir", str(out), "--save-method", "gguf-nope"])  # fmt: skip
    assert code == 1 and "save_method" in capsys.readouterr().err and not out.exists()


def test_rows_all_too_long_and_unknown_template_fail_before_loading(tmp_path, capsys, tiny_llama):
    data = tmp_path / "long.jsonl"
    data.write_text('{"instruction": "' + "word " * 200 + '", "input": "", "output": "x"}\n')
    out = tmp_path / "out"
    args = ["train", "--model-name", str(tiny_llama), "--dataset", str(data),
            "--output-dir", str(out), "--max-seq-length", "16"]  # fmt: skip
    assert main(args) == 1
    assert "max_seq_length" in capsys.readouterr().err and not out.exists()
    data.write_text('{"instruction": "hi", "input": "", "output": "there"}\n')
    assert main([*args[:-2], "--chat-template", "klingon"]) == 1
    assert "klingon" in capsys.readouterr().err and not out.exists()


def test_a_memory_budget_makes_the_default_checkpointing_auto(tmp_path):
    assert _valid(tmp_path).validate().checkpointing == "offload"
    assert _valid(tmp_path, memory_budget_gib=40.0).validate().checkpointing == "auto"
    config = _valid(tmp_path, gradient_checkpointing="auto").validate()
    assert config.checkpointing == "auto" and config.memory_budget_gib == 0


def test_docs_list_every_option():
    from pathlib import Path

    from sloth_core.train.config import options_markdown

    docs = (Path(__file__).parents[2] / "docs" / "training.md").read_text()
    assert options_markdown() in docs, "regenerate docs/training.md's option table"


def test_full_finetuning_saves_merged_weights_unless_told_otherwise(alpaca_file, tmp_path):
    base = {"model_name": "m", "dataset": str(alpaca_file), "output_dir": str(tmp_path / "o")}
    assert TrainConfig.from_mapping(base).final_format == "lora"
    full = TrainConfig.from_mapping({**base, "full_finetuning": True})
    assert full.final_format == "merged_16bit"
    with pytest.raises(ConfigError, match="save_method.*no adapters"):
        TrainConfig.from_mapping(
            {**base, "full_finetuning": True, "save_method": "lora"}
        ).validate()


def test_the_demo_with_another_model_builds_no_demo_model(tmp_path, monkeypatch):
    from sloth_core.cli import build_parser
    from sloth_core.cli.train_cmd import build_config

    monkeypatch.setenv("SLOTH_CACHE", str(tmp_path / "cache"))
    args = build_parser().parse_args(["train", "--demo", "--model-name", "my/model"])
    config = build_config(args)
    assert config.model_name == "my/model" and config.data_format == "alpaca"
    assert not (tmp_path / "cache").exists()


def test_training_loads_onto_the_gpu_when_there_is_one(monkeypatch):
    """`sloth train` on a GPU machine trains there (transformers' default is the CPU), and a
    model left on the CPU is float32 there whatever GPU the machine has."""
    import torch

    from sloth_core.api import default_dtype
    from sloth_core.train.loop import training_device_map

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_device_map() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # torchrun's local rank
    assert training_device_map() == {"": 1}
    assert default_dtype("cpu") == torch.float32


def test_the_log_reports_dropped_rows_and_the_eval_sets_own(tmp_path, capsys, tiny_llama):
    """Rows dropped for having nothing to train on are counted in the data line, and a
    separate eval_dataset gets its own figures."""
    import json

    from sloth_core.testing.datasets import load_tiny_instructions

    rows = load_tiny_instructions()[:12]
    long_prompt = {"instruction": "word " * 80, "input": "", "output": "yes"}  # cut to prompt
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [*rows, long_prompt]))
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in load_tiny_instructions()[20:25]))
    code = main(["train", "--model-name", str(tiny_llama), "--dataset", str(data),
                 "--eval-dataset", str(held), "--output-dir", str(tmp_path / "out"),
                 "--max-seq-length", "48", "--max-steps", "1", "--batch-size", "2",
                 "--gradient-checkpointing", "off", "--report-to", "none", "--quiet",
                 "--save-method", "none"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    line = next(line for line in out.splitlines() if line.startswith("data: "))
    assert "13 rows: 12 kept, 1 dropped (no trained tokens left after truncation)" in line
    assert f"eval_dataset {held}: 5 rows: 5 kept" in " ".join(out.split()), out
