"""``sloth bench train --targets``: the performance targets, every row in one run."""

from __future__ import annotations

import json

import pytest

from sloth_core.bench import context as bench_context
from sloth_core.bench import targets as bench_targets
from sloth_core.bench.targets import Target, judge, select
from sloth_core.cli import main


def _report(sloth: dict, hf: dict, **extra) -> dict:
    return {"results": [{"system": "sloth", **sloth}, {"system": "hf", **hf}],
            "losses_agree": True, **extra}  # fmt: skip


def test_a_row_holds_only_when_every_ratio_does():
    target = Target("t", "llama-8b", 2048, 4, speed=2.0, memory=0.5, mfu=0.5)
    hf = {"tokens_per_s": 1000.0, "peak_gib": 30.0, "mfu": 0.25}
    met = judge(target, _report({"tokens_per_s": 2100.0, "peak_gib": 14.0, "mfu": 0.52}, hf))
    assert met["met"] and met["speed"] == pytest.approx(2.1)
    assert met["memory"] == pytest.approx(14 / 30)
    slow = judge(target, _report({"tokens_per_s": 1900.0, "peak_gib": 14.0, "mfu": 0.52}, hf))
    assert not slow["met"] and slow["checks"] == {
        "speed": False,
        "memory": True,
        "mfu": True,
        "losses": True,
    }
    big = judge(target, _report({"tokens_per_s": 2100.0, "peak_gib": 16.0, "mfu": 0.52}, hf))
    assert big["checks"]["memory"] is False and not big["met"]
    # as fast and as lean, but trained otherwise (the last losses apart): not met
    apart = judge(target, _report({"tokens_per_s": 2100.0, "peak_gib": 14.0, "mfu": 0.52}, hf,
                                  losses_agree=False))  # fmt: skip
    assert not apart["met"] and apart["checks"]["losses"] is False
    failed = judge(target, _report({"error": "CUDA out of memory"}, hf))
    assert not failed["met"] and "sloth: CUDA out of memory" in failed["error"]


def test_a_context_row_compares_the_longest_sequences():
    target = Target("c", "llama-8b", 0, 1, "nf4", context=12.0, budget_gib=40.0)
    row = judge(target, _report({"max_seq": 131072}, {"max_seq": 16384}))
    assert row["context"] == 8.0 and row["checks"] == {"context": False}


def test_a_budget_row_holds_sloths_peak_to_the_budget():
    target = Target("b", "llama-8b", 2048, 4, speed=2.4, budget_gib=40.0)
    hf = {"tokens_per_s": 1000.0, "peak_gib": 30.0}
    row = judge(target, _report({"tokens_per_s": 2500.0, "peak_gib": 39.5}, hf))
    assert row["met"] and row["checks"] == {"speed": True, "budget": True, "losses": True}
    over = judge(target, _report({"tokens_per_s": 2500.0, "peak_gib": 40.5}, hf))
    assert over["checks"] == {"speed": True, "budget": False, "losses": True}
    assert not over["met"]
    cpu = judge(target, _report({"tokens_per_s": 2500.0, "peak_gib": None}, hf))
    assert cpu["checks"]["budget"] is False  # no peak measured: the budget is not shown met
    assert "`--memory-budget-gib 40`" in target.workload
    text = bench_targets.markdown({"device": "cuda", "rows": [row], "reports": []}, "cmd")
    assert "39.50 GiB (<= 40 GiB)" in text


def test_sloth_with_a_budget_plans_its_checkpointing(tmp_path, monkeypatch):
    """``sloth`` given a budget (and ``sloth:auto``) plans per layer, as sloth train does;
    the plan is in the result (in-process on the CPU: the worker's body)."""
    from sloth_core.bench import train as bench_train

    monkeypatch.setenv("SLOTH_KERNELS", "torch")
    model_dir = bench_train.make_model("llama-tiny", tmp_path / "tiny", device="cpu")
    common = dict(seq=16, batch=2, steps=1, warmup=0, device="cpu")
    planned = bench_train.run_system("sloth", model_dir, budget_gib=64.0, **common)
    assert planned.plan.startswith("memory plan: 2 kept, 0 recomputed, 0 offloaded of 2 layers")
    assert bench_train.run_system("sloth", model_dir, **common).plan is None
    auto = bench_train.run_system("sloth:auto", model_dir, **common)  # 90% of the host's
    assert auto.plan.startswith("memory plan: 2 kept")
    with pytest.raises(ValueError, match="below the least this step needs"):
        bench_train.run_system("sloth", model_dir, budget_gib=1e-6, **common)


def test_rows_are_selected_by_name():
    assert [t.name for t in select("all")] == ["bf16", "bf16-40g", "nf4", "bf16-8k", "1b",
                                               "context-nf4", "fp8", "moe", "dpo",
                                               "grpo-gen"]  # fmt: skip
    assert [t.name for t in select("nf4, 1b")] == ["nf4", "1b"]
    with pytest.raises(ValueError, match="unknown target row.*'fast'"):
        select("fast")


def test_targets_run_every_row_and_write_the_summary(tmp_path, monkeypatch, capsys):
    """One real row on the CPU (the tiny shape, sloth and hf each in its own process) and a
    context row answered by a fake search, through the CLI."""
    # The reference ops: under CI's TRITON_INTERPRET=1 the kernels would run interpreted.
    monkeypatch.setenv("SLOTH_KERNELS", "torch")
    rows = (
        Target("tiny", "llama-tiny", 16, 2, speed=1e-3, memory=0.9),
        Target("context-nf4", "llama-tiny", 0, 1, "nf4", context=12.0, budget_gib=40.0),
    )
    monkeypatch.setattr(bench_targets, "TARGETS", rows)

    def fake_context(shape, **kwargs):
        assert kwargs["quantization"] == "nf4" and kwargs["budget_gib"] == 40.0
        # the journal and what is left of the run's time limit after the rows before it
        assert kwargs["journal"] == tmp_path / "probes.jsonl"
        assert 0 < kwargs["time_limit_s"] < 300 and callable(kwargs["progress"])
        # the row before is on disk already: a run stopped here still leaves it
        so_far = json.loads((tmp_path / "targets.json").read_text())
        assert [r["name"] for r in so_far["rows"]] == ["tiny"]
        assert "Row `tiny`:" in (tmp_path / "targets.md").read_text()
        return {"kind": "max_context", "shape": shape, "device": "cpu", "budget_gib": 40.0,
                "budget_measure": "peak RSS growth", "quantization": "nf4", "start": 8192,
                "cap": 262144, "granularity": 2048,
                "results": [r for r in ({"system": "sloth", "max_seq": 262144, "capped": True,
                                         "probes": []},
                                        {"system": "hf", "max_seq": 16384, "probes": []})
                            if r["system"] in kwargs["systems"]]}  # fmt: skip

    monkeypatch.setattr(bench_context, "run_max_context", fake_context)
    out = tmp_path / "targets"
    monkeypatch.setattr("sys.argv", ["sloth", "bench", "train", "--targets"])
    code = main(["bench", "train", "--targets", "--device", "cpu", "--steps", "2", "--warmup",
                 "1", "--model-dir", str(tmp_path / "models"), "--json", f"{out}.json",
                 "--markdown", f"{out}.md", "--journal", str(tmp_path / "probes.jsonl"),
                 "--time-limit-s", "300"])  # fmt: skip
    assert code == 0, capsys.readouterr()
    report = json.loads((tmp_path / "targets.json").read_text())
    tiny, context = report["rows"]
    assert (
        tiny["checks"] == {"speed": True, "losses": True} and tiny["met"]
    )  # no GPU: no peak memory
    assert tiny["sloth_tokens_per_s"] > 0 and tiny["losses_agree"]
    assert context["context"] == 16.0 and context["met"]
    text = (tmp_path / "targets.md").read_text()
    assert "sloth bench train --targets" in text
    assert "| `llama-tiny` bf16 LoRA, seq 16 x batch 2 |" in text and "- (<= 0.9x)" in text
    assert "16.00x (>= 12x)" in text and "Row `tiny`:" in text and "Row `context-nf4`:" in text
    assert not list(tmp_path.glob(".*.tmp"))  # written beside, then renamed


def _result(system, tokens_per_s, peak_gib, **extra):
    return {"system": system, "tokens_per_s": tokens_per_s, "peak_gib": peak_gib,
            "attention": "sdpa", "mfu": None, "first_loss": 0.6931, "last_loss": 0.5,
            "median_s": 1.0, **extra}  # fmt: skip


def test_dpo_and_generation_rows_run_their_own_benches(tmp_path, monkeypatch):
    """A ``dpo`` row runs sloth bench dpo (hf: TRL), a ``generate`` row sloth bench
    generate (64 completions: 8 prompts x 8), each judged and tabled by its own kind."""
    from sloth_core.bench import dpo, generate

    asked = {}

    def fake_dpo(shape, **kwargs):
        asked["dpo"] = kwargs
        return {"kind": "dpo", "shape": shape, "seq": kwargs["seq"], "batch": kwargs["batch"],
                "steps": 2, "warmup": 1, "device": "cpu", "losses_agree": True,
                "results": [_result("sloth", 300.0, 9.0), _result("hf", 100.0, 20.0)]}  # fmt: skip

    def fake_generate(shape, **kwargs):
        asked["generate"] = kwargs
        return {"kind": "generate", "shape": shape, "prompts": kwargs["prompts"],
                "generations": kwargs["generations"], "prompt_len": 128,
                "new_tokens": kwargs["new_tokens"], "temperature": 1.0, "top_p": 1.0,
                "repeats": 3, "device": "cpu",
                "results": [_result("sloth", 250.0, None), _result("hf", 100.0, None)]}  # fmt: skip

    monkeypatch.setattr(dpo, "run_dpo_bench", fake_dpo)
    monkeypatch.setattr(generate, "run_generate_bench", fake_generate)
    report = bench_targets.run_targets(select("dpo,grpo-gen"), model_root=tmp_path,
                                       device="cpu", steps=2, warmup=1)  # fmt: skip
    assert (asked["dpo"]["seq"], asked["dpo"]["batch"]) == (1024, 4)
    assert asked["generate"] == {"prompts": 8, "generations": 8, "new_tokens": 512,
                                 "model_dir": tmp_path / "llama-8b", "device": "cpu"}  # fmt: skip
    dpo_row, gen_row = report["rows"]
    assert dpo_row["checks"] == {"speed": True, "memory": True, "losses": True}
    assert dpo_row["met"]
    assert gen_row["checks"] == {"speed": False} and gen_row["speed"] == 2.5
    text = bench_targets.markdown(report, "sloth bench train --targets dpo,grpo-gen")
    assert "Row `dpo`: DPO, shape `llama-8b`" in text and "TRL's DPOTrainer" in text
    assert "Row `grpo-gen`: Shape `llama-8b`, GRPO sampling: 8 prompts x 8" in text
    assert "GRPO generation, 64 completions of 512 tokens, vs HF generate" in text


def _context_search(limits, calls, cut_after=None):
    """A fake run_max_context over systems with known limits: the lengths it would probe
    (doubling from start, then bisection), cut by the time limit after ``cut_after``
    probes of sloth."""

    def run(shape, *, systems, start, cap, granularity, **kwargs):
        (system,) = systems
        probed = []

        def fits(seq):
            if system == "sloth" and cut_after is not None and len(probed) >= cut_after:
                raise bench_context.SearchIncomplete("the time limit came")
            probed.append(seq)
            return seq <= limits[system]

        result = {"system": system, "probes": probed}
        try:
            result["max_seq"] = bench_context.max_fitting(
                fits, start=start, cap=cap, granularity=granularity
            ).best
        except bench_context.SearchIncomplete:
            result.update(incomplete=True, error="search incomplete",
                          bounds=[max([s for s in probed if s <= limits[system]], default=0),
                                  None])  # fmt: skip
        calls.append((system, start, cap, list(probed)))
        return {
            "kind": "max_context",
            "shape": shape,
            "device": "cpu",
            "start": start,
            "results": [result],
        }

    return run


def test_a_context_row_aims_sloths_first_probe_at_the_target(monkeypatch, tmp_path):
    target = Target("c", "llama-8b", 0, 1, "nf4", context=12.0, budget_gib=40.0)
    calls = []
    monkeypatch.setattr(bench_context, "run_max_context",
                        _context_search({"hf": 10000, "sloth": 200000}, calls))  # fmt: skip
    report = bench_targets.context_row(target, tmp_path, "cpu", start=8192, granularity=2048)
    (hf_call, sloth_call) = calls
    assert hf_call[:3] == ("hf", 8192, 262144) and report["results"][1]["max_seq"] == 8192
    # 12 x 8192 rounded up to 2048: the first probe decides the row; then the longest
    assert sloth_call[1] == 98304 and sloth_call[3][0] == 98304
    row = judge(target, report)
    assert row["met"] and row["sloth_context"] == report["results"][0]["max_seq"] >= 98304

    calls.clear()  # a miss: the first probe fails, and the search goes on below it
    monkeypatch.setattr(bench_context, "run_max_context",
                        _context_search({"hf": 10000, "sloth": 50000}, calls))  # fmt: skip
    report = bench_targets.context_row(target, tmp_path, "cpu", start=8192, granularity=2048)
    assert [(c[0], c[1], c[2]) for c in calls] == [
        ("hf", 8192, 262144),
        ("sloth", 98304, 262144),
        ("sloth", 8192, 96256),
    ]
    sloth = report["results"][0]
    assert sloth["aimed_at"] == 98304 and sloth["probes"][0] == 98304
    assert 49152 <= sloth["max_seq"] <= 50000
    row = judge(target, report)
    assert not row["met"] and row["context"] == pytest.approx(sloth["max_seq"] / 8192)


def test_a_context_search_cut_short_shows_at_least_what_it_fitted(monkeypatch, tmp_path):
    target = Target("c", "llama-8b", 0, 1, "nf4", context=12.0, budget_gib=40.0)
    calls = []
    search = _context_search({"hf": 10000, "sloth": 200000}, calls, cut_after=1)
    monkeypatch.setattr(bench_context, "run_max_context", search)
    report = bench_targets.context_row(target, tmp_path, "cpu", start=8192, granularity=2048)
    row = judge(target, report)
    assert row["met"] and row["at_least"] and row["sloth_context"] == 98304
    text = bench_targets.markdown({"rows": [row], "reports": [], "versions": {}, "device": "cpu"},
                                  "sloth bench train --targets c")  # fmt: skip
    assert ">= 98304 tokens" in text
    # cut before its first fit: not shown, an error that says so
    calls.clear()
    search = _context_search({"hf": 10000, "sloth": 200000}, calls, cut_after=0)
    monkeypatch.setattr(bench_context, "run_max_context", search)
    report = bench_targets.context_row(target, tmp_path, "cpu", start=8192, granularity=2048)
    row = judge(target, report)
    assert not row["met"] and "incomplete" in row["error"]
