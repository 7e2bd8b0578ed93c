"""``sloth bench train --plot out.png``: the report as a bar chart (matplotlib).

A training report gives two panels, tokens/s and peak memory per system; a max-context
report one, the longest sequence per system. Systems that were skipped or failed are
left out; a missing value (no peak memory on the CPU) is drawn as an empty bar marked
``n/a``. matplotlib is not a dependency of sloth: without it, ``--plot`` says so before
anything is measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class PlotUnavailable(RuntimeError):
    """``--plot`` needs matplotlib, which is not installed."""


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise PlotUnavailable(
            "sloth bench --plot needs matplotlib, which is not installed: "
            "pip install matplotlib"
        ) from exc


def panels(report: dict[str, Any]) -> list[tuple[str, list[str], list[float | None]]]:
    """(title, systems, values) for each panel of ``report``'s chart."""
    rows = [r for r in report["results"] if not r.get("error") and not r.get("skipped")]
    names = [r["system"] for r in rows]
    if report.get("kind") == "max_context":
        return [("max context (tokens)", names, [r.get("max_seq") for r in rows])]
    return [("tokens/s", names, [r.get("tokens_per_s") for r in rows]),
            ("peak memory (GiB)", names, [r.get("peak_gib") for r in rows])]  # fmt: skip


def plot_report(report: dict[str, Any], path: Path) -> Path:
    """Write ``report``'s bar chart to ``path`` (the format from its suffix)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    charts = panels(report)
    fig, axes = plt.subplots(1, len(charts), figsize=(5 * len(charts), 4), squeeze=False)
    for ax, (title, names, values) in zip(axes[0], charts, strict=True):
        heights = [0.0 if v is None else v for v in values]
        bars = ax.bar(names, heights, color="tab:blue")
        labels = ["n/a" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.2f}"
                  for v in values]  # fmt: skip
        ax.bar_label(bars, labels=labels)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
    quant = report.get("quantization")
    what = (f"seq {report['seq']} x batch {report['batch']}" if "seq" in report
            else "batch 1")  # fmt: skip
    device = report.get("device_name") or report["device"]
    fig.suptitle(f"sloth bench: {report['shape']}, {what}{f', {quant}' if quant else ''}, {device}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
