"""``sloth bench train --targets``: the project's performance targets, measured in one run.

Each row is a workload of ``sloth bench train`` (or ``--max-context``) run for ``sloth``
and ``hf`` (each system in its own process, as always); the row holds when sloth's
tokens/s, peak memory (and, where named, MFU or context length) reach the target ratios
to ``hf`` measured in the same run. The targets are those of the performance issue: past
the fastest fine-tuning stacks people use, on one H200.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sloth_core.bench import context as bench_context
from sloth_core.bench import train as bench_train


@dataclass(frozen=True)
class Target:
    name: str
    shape: str
    seq: int
    batch: int
    quantization: str | None = None
    speed: float | None = None  # at least this many times hf's tokens/s
    memory: float | None = None  # at most this fraction of hf's peak memory
    mfu: float | None = None  # at least this MFU
    context: float | None = None  # at least this many times hf's longest sequence
    budget_gib: float | None = None  # a context row's budget; else sloth's peak at most this
    #: what measures it: ``train`` (sloth bench train), ``dpo`` (sloth bench dpo: hf is
    #: TRL's DPOTrainer; seq is prompt + completion, batch the pairs) or ``generate``
    #: (sloth bench generate: batch completions of seq new tokens, 8 per prompt).
    bench: str = "train"

    @property
    def workload(self) -> str:
        kind = self.quantization or "bf16"
        if self.bench == "dpo":
            return f"`{self.shape}` DPO, {self.seq}-token pairs x batch {self.batch}, vs TRL"
        if self.bench == "generate":
            return (f"`{self.shape}` GRPO generation, {self.batch} completions of {self.seq} "
                    "tokens, vs HF generate")  # fmt: skip
        if self.context:
            return f"`{self.shape}` {kind} max context, batch 1, {self.budget_gib:g} GiB"
        budget = f", `--memory-budget-gib {self.budget_gib:g}`" if self.budget_gib else ""
        return f"`{self.shape}` {kind} LoRA, seq {self.seq} x batch {self.batch}{budget}"


TARGETS: tuple[Target, ...] = (
    Target("bf16", "llama-8b", 2048, 4, speed=2.0, memory=0.58, mfu=0.54),
    # sloth plans its checkpointing per layer for the budget (sloth_core.memory_plan).
    Target("bf16-40g", "llama-8b", 2048, 4, speed=2.4, budget_gib=40.0),
    Target("nf4", "llama-8b", 2048, 4, "nf4", speed=1.9, memory=0.33),
    Target("bf16-8k", "llama-8b", 8192, 1, speed=1.9, memory=0.58),
    Target("1b", "llama-1b", 2048, 4, speed=2.3, memory=0.22),
    Target("context-nf4", "llama-8b", 0, 1, "nf4", context=12.0, budget_gib=40.0),
    # sloth's base weights in FP8 (sloth-fp8) against hf in bf16.
    Target("fp8", "llama-8b", 2048, 4, "fp8", speed=2.6, memory=0.40),
    # LoRA on attention and every expert (PEFT maps gate/up/down_proj to the 3-D experts).
    Target("moe", "qwen3-30b-a3b", 2048, 2, speed=3.0, memory=0.6),
    Target("dpo", "llama-8b", 1024, 4, speed=2.0, memory=0.5, bench="dpo"),
    Target("grpo-gen", "llama-8b", 512, 64, speed=3.0, bench="generate"),
)


def select(names: str) -> list[Target]:
    """``all`` or comma-separated row names; unknown names raise ``ValueError``."""
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    if wanted in ([], ["all"]):
        return list(TARGETS)
    known = {t.name: t for t in TARGETS}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"unknown target row(s) {unknown}; rows: {', '.join(known)}, or all")
    return [known[n] for n in wanted]


def judge(target: Target, report: dict[str, Any]) -> dict[str, Any]:
    """sloth's ratios to hf in ``report`` against ``target``: a row of the summary."""
    by = {r["system"]: r for r in report["results"]}
    sloth, hf = by.get("sloth", {}), by.get("hf", {})
    row: dict[str, Any] = {"name": target.name, "workload": target.workload,
                           "target": {k: getattr(target, k)
                                      for k in ("speed", "memory", "mfu", "context")
                                      if getattr(target, k) is not None}}  # fmt: skip
    if target.context and sloth.get("incomplete") and not (hf.get("error") or hf.get("skipped")):
        # A search cut short still proves "at least": its longest length that fitted.
        low = sloth["bounds"][0]
        if hf.get("max_seq") and low >= target.context * hf["max_seq"]:
            sloth = {k: v for k, v in sloth.items() if k != "error"}
            sloth["max_seq"], row["at_least"] = low, True
    errors = [f"{r['system']}: {r.get('error') or r.get('skipped')}"
              for r in (sloth, hf) if not r or r.get("error") or r.get("skipped")]  # fmt: skip
    if errors or not (sloth and hf):
        row.update(error="; ".join(errors) or "sloth or hf missing", met=False)
        return row
    checks: dict[str, bool] = {}
    if target.context:
        row["context"] = sloth["max_seq"] / max(hf["max_seq"], 1)
        row["sloth_context"], row["hf_context"] = sloth["max_seq"], hf["max_seq"]
        checks["context"] = row["context"] >= target.context
    else:
        row["speed"] = sloth["tokens_per_s"] / hf["tokens_per_s"]
        row["sloth_tokens_per_s"], row["hf_tokens_per_s"] = (
            sloth["tokens_per_s"],
            hf["tokens_per_s"],
        )
        checks["speed"] = row["speed"] >= target.speed
        if sloth.get("peak_gib") and hf.get("peak_gib"):
            row["memory"] = sloth["peak_gib"] / hf["peak_gib"]
            row["sloth_gib"], row["hf_gib"] = sloth["peak_gib"], hf["peak_gib"]
            if target.memory is not None:
                checks["memory"] = row["memory"] <= target.memory
        if target.budget_gib is not None:
            row["budget_gib"] = target.budget_gib
            checks["budget"] = sloth.get("peak_gib") is not None and (
                sloth["peak_gib"] <= target.budget_gib
            )
        if target.mfu is not None:
            row["mfu"] = sloth.get("mfu")
            checks["mfu"] = row["mfu"] is not None and row["mfu"] >= target.mfu
        row["losses_agree"] = report.get("losses_agree", True)
        if "losses_agree" in report:  # speed from another training is no speed (session 24)
            checks["losses"] = bool(report["losses_agree"])
    row["checks"] = checks
    row["met"] = bool(checks) and all(checks.values())
    return row


CONTEXT_CAP = 262144  # the longest length a context row probes


def context_row(target: Target, model_dir: Path, device: str, *, start: int, granularity: int,
                journal: Path | None = None, progress=None,
                deadline: float | None = None) -> dict[str, Any]:  # fmt: skip
    """A context row's report, its probes aimed at the target: hf's longest sequence
    first, then sloth's search starting at ``target.context`` times it (rounded up to the
    granularity), so that its first probe decides the row; past it the search goes on to
    the longest length, and where that first probe fails, it searches below it instead.
    Each system's result holds its own ``start``."""

    def search(system: str, first: int, cap: int) -> dict[str, Any]:
        left = None if deadline is None else deadline - time.monotonic()
        return bench_context.run_max_context(
            target.shape, systems=(system,), model_dir=model_dir, device=device,
            quantization=target.quantization, budget_gib=target.budget_gib, start=first,
            cap=cap, granularity=granularity, journal=journal, progress=progress,
            time_limit_s=left,
        )  # fmt: skip

    hf = search("hf", start, CONTEXT_CAP)
    (hf_result,) = hf["results"]
    first = start
    if hf_result.get("max_seq"):
        aim = math.ceil(target.context * hf_result["max_seq"] / granularity) * granularity
        first = min(CONTEXT_CAP, max(start, aim))
    sloth = search("sloth", first, CONTEXT_CAP)
    (sloth_result,) = sloth["results"]
    sloth_result["start"] = first
    if first > start and sloth_result.get("max_seq") == 0:  # missed: how far below it
        below = search("sloth", start, first - granularity)
        (sloth_result,) = below["results"]
        sloth_result["probes"] = sloth["results"][0]["probes"] + sloth_result["probes"]
        sloth_result["start"], sloth_result["aimed_at"] = start, first
    hf_result["start"] = start
    if sloth_result.get("max_seq") and hf_result.get("max_seq"):
        sloth_result["context_vs_hf"] = sloth_result["max_seq"] / hf_result["max_seq"]
    return {**sloth, "start": start, "results": [sloth_result, hf_result]}


def run_targets(targets: list[Target], *, model_root: Path, device: str, steps: int = 10,
                warmup: int = 3, context_start: int = 8192, context_granularity: int = 2048,
                progress=None, journal: Path | None = None, time_limit_s: float | None = None,
                probe_progress=None, on_report=None) -> dict[str, Any]:  # fmt: skip
    """Every row, sloth then hf; the summary rows and each row's full report. A context
    row's search keeps its answers in ``journal`` and stops ``time_limit_s`` after the
    run's start (see :mod:`sloth_core.bench.context`). ``on_report`` gets the report so
    far after each row (a run stopped later still leaves the rows it finished)."""
    deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
    rows, reports = [], []
    for target in targets:
        model_dir = Path(model_root) / target.shape
        if target.bench != "train":
            report = _other_bench(target, model_dir, device, steps, warmup)
        elif target.context:
            report = context_row(
                target, model_dir, device, start=context_start,
                granularity=context_granularity, journal=journal, progress=probe_progress,
                deadline=deadline,
            )  # fmt: skip
        else:
            report = bench_train.run_bench(
                target.shape, seq=target.seq, batch=target.batch, steps=steps, warmup=warmup,
                systems=("sloth", "hf"), model_dir=model_dir, device=device,
                quantization=target.quantization, budget_gib=target.budget_gib,
            )  # fmt: skip
        report["target"] = target.name
        reports.append(report)
        rows.append(judge(target, report))
        if progress is not None:
            progress(rows[-1])
        if on_report is not None and len(rows) < len(targets):
            on_report(_summary(device, steps, warmup, rows, reports))
    return _summary(device, steps, warmup, rows, reports)


def _summary(device: str, steps: int, warmup: int, rows: list[dict[str, Any]],
             reports: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """The targets' report of the rows run so far."""
    device_name = next((r.get("device_name") for r in reports if r.get("device_name")), None)
    return {"device": device, "device_name": device_name, "versions": bench_train.versions(),
            "steps": steps, "warmup": warmup, "rows": list(rows), "reports": list(reports),
            "met": all(r["met"] for r in rows)}  # fmt: skip


def _table_of(kind: str | None):
    """The markdown function of a row's own report, by its ``kind``."""
    if kind == "max_context":
        return bench_context.markdown
    if kind == "dpo":
        from sloth_core.bench.dpo import markdown as dpo_markdown

        return dpo_markdown
    if kind == "generate":
        from sloth_core.bench.generate import markdown as generate_markdown

        return generate_markdown
    return bench_train.markdown


def _other_bench(target: Target, model_dir: Path, device: str, steps: int,
                 warmup: int) -> dict[str, Any]:  # fmt: skip
    """A ``dpo`` or ``generate`` row's report (each system in its own process, as always)."""
    if target.bench == "dpo":
        from sloth_core.bench.dpo import run_dpo_bench

        return run_dpo_bench(target.shape, seq=target.seq, batch=target.batch, steps=steps,
                             warmup=warmup, model_dir=model_dir, device=device)  # fmt: skip
    from sloth_core.bench.generate import run_generate_bench

    return run_generate_bench(target.shape, prompts=target.batch // 8, generations=8,
                              new_tokens=target.seq, model_dir=model_dir,
                              device=device)  # fmt: skip


def markdown(report: dict[str, Any], command: str) -> str:
    """The summary table, then each row's own table, with the exact command."""

    def num(value, spec):
        return "-" if value is None else format(value, spec)

    def ratio(row, key, sign):
        value, target = row.get(key), row["target"].get(key)
        if target is None:
            return "-"
        return f"{'-' if value is None else f'{value:.2f}x'} ({sign} {target:g}x)"

    lines = [f"    {command}", "",
             "| workload | sloth | hf | speed vs hf (target) | memory vs hf (target) "
             "| MFU (target) | context vs hf (target) | met |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in report["rows"]:
        if row.get("error"):
            lines.append(f"| {row['workload']} | error: {row['error'][:160]} | | | | | | no |")
            continue
        if "context" in row:
            # a search cut short after it had shown enough: its longest fit, "at least"
            sloth = f"{'>= ' if row.get('at_least') else ''}{row['sloth_context']} tokens"
            hf = f"{row['hf_context']} tokens"
        else:
            sloth = f"{row['sloth_tokens_per_s']:.0f} tok/s, {num(row.get('sloth_gib'), '.2f')} GiB"
            hf = f"{row['hf_tokens_per_s']:.0f} tok/s, {num(row.get('hf_gib'), '.2f')} GiB"
        mfu = "-"
        if "mfu" in row["target"]:
            got = num(row.get("mfu") and row["mfu"] * 100, ".1f")
            mfu = f"{got}% (>= {row['target']['mfu'] * 100:g}%)"
        memory = ratio(row, "memory", "<=")
        if row.get("budget_gib"):  # sloth's peak against the budget it planned for
            memory = f"{num(row.get('sloth_gib'), '.2f')} GiB (<= {row['budget_gib']:g} GiB)"
        missed = [k for k, ok in row["checks"].items() if not ok]
        met = "yes" if row["met"] else "no: " + ", ".join(missed)
        lines.append(f"| {row['workload']} | {sloth} | {hf} | {ratio(row, 'speed', '>=')} | "
                     f"{memory} | {mfu} | {ratio(row, 'context', '>=')} "
                     f"| {met} |")  # fmt: skip
    lines += ["", bench_train.device_line(report)]
    for sub in report["reports"]:
        table = _table_of(sub.get("kind"))
        # Each row's own table, without the command line it would repeat.
        text = table(sub, command).replace(f"    {command}\n\n", "")
        lines += ["", f"Row `{sub['target']}`: {text}"]
    return "\n".join(lines) + "\n"
