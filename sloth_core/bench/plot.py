"""``sloth bench ... --plot out.png``: the report as a bar chart (matplotlib).

A training, DPO or generation report gives two panels, tokens/s and peak memory per
system; a max-context report one, the longest sequence per system; a targets report
(``--targets``) two, sloth's speed and memory against hf per row, each row's target
marked beside its bar. Systems that were skipped or failed are left out; a missing value
(no peak memory on the CPU, a row without a memory ratio) is drawn as an empty bar marked
``n/a``. ``sloth bench plot REPORT.json OUT.png`` draws a saved ``--json`` report.
matplotlib is not a dependency of sloth: without it, ``--plot`` says so before anything
is measured.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class PlotUnavailable(RuntimeError):
    """``--plot`` needs matplotlib, which is not installed."""


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise PlotUnavailable(
            "sloth bench --plot needs matplotlib, which is not installed: pip install matplotlib"
        ) from exc


def panels(report: dict[str, Any]) -> list[tuple[str, list[str], list[float | None]]]:
    """(title, systems, values) for each panel of ``report``'s chart; a targets report's
    names are its rows (their targets: :func:`target_marks`)."""
    if "rows" in report:  # sloth bench train --targets
        rows = _target_rows(report)
        names = [r["name"] for r in rows]
        return [("speed vs hf (x)", names, [r.get("speed") for r in rows]),
                ("memory vs hf (x)", names, [r.get("memory") for r in rows])]  # fmt: skip
    rows = [r for r in report["results"] if not r.get("error") and not r.get("skipped")]
    names = [r["system"] for r in rows]
    if report.get("kind") == "max_context":
        return [("max context (tokens)", names, [r.get("max_seq") for r in rows])]
    return [("tokens/s", names, [r.get("tokens_per_s") for r in rows]),
            ("peak memory (GiB)", names, [r.get("peak_gib") for r in rows])]  # fmt: skip


def _target_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """A targets report's rows that ran: the bars of its panels."""
    return [r for r in report["rows"] if not r.get("error")]


def target_marks(report: dict[str, Any]) -> list[list[float | None]]:
    """A targets report's goal per bar of each panel (``None``: that row has none)."""
    if "rows" not in report:
        return []
    rows = _target_rows(report)
    return [[r["target"].get(key) for r in rows] for key in ("speed", "memory")]


def _title(report: dict[str, Any]) -> str:
    device = report.get("device_name") or report.get("device", "")
    if "rows" in report:
        return f"sloth bench train --targets: sloth against hf, {device} (targets: black ticks)"
    if report.get("kind") == "generate":
        what = f"{report['prompts'] * report['generations']} x {report['new_tokens']} tokens"
        return f"sloth bench generate: {report['shape']}, {what}, {device}"
    quant = report.get("quantization")
    what = (f"seq {report['seq']} x batch {report['batch']}" if "seq" in report
            else "batch 1")  # fmt: skip
    bench = "sloth bench dpo" if report.get("kind") == "dpo" else "sloth bench"
    return f"{bench}: {report['shape']}, {what}{f', {quant}' if quant else ''}, {device}"


def plot_report(report: dict[str, Any], path: Path) -> Path:
    """Write ``report``'s bar chart to ``path`` (the format from its suffix)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    charts = panels(report)
    marks = target_marks(report) or [[None] * len(names) for _, names, _ in charts]
    width = max(5, 0.8 * max((len(names) for _, names, _ in charts), default=0))
    fig, axes = plt.subplots(1, len(charts), figsize=(width * len(charts), 4), squeeze=False)
    for ax, (title, names, values), goals in zip(axes[0], charts, marks, strict=True):
        heights = [0.0 if v is None else v for v in values]
        bars = ax.bar(names, heights, color="tab:blue")
        labels = ["n/a" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.2f}"
                  for v in values]  # fmt: skip
        ax.bar_label(bars, labels=labels)
        for bar, goal in zip(bars, goals, strict=True):
            if goal is not None:  # the row's target, a tick across its bar
                x = bar.get_x()
                ax.hlines(goal, x, x + bar.get_width(), colors="black", linewidth=2)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(_title(report))
    fig.tight_layout()
    path = Path(path)
    # Written beside, then renamed: a failed write leaves no half image at ``path``.
    staging = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(staging, dpi=120, format=path.suffix.lstrip(".").lower() or "png")
        os.replace(staging, path)
    finally:
        plt.close(fig)
        staging.unlink(missing_ok=True)
    return path
