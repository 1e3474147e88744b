"""Where the FLOP model and the hardware disagree: per-layer MAC cut against measured speedup.

Needs matplotlib (``pip install 'onnxfactor[plot]'``), imported only here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from onnxfactor.errors import UsageError


def layer_points(report: dict) -> list[dict]:
    """The layers of a compress report (its JSON form) that were timed: name, MAC ratio, speedup, status."""
    points = []
    for layer in report.get("layers", []):
        latency = layer.get("latency") or {}
        if "speedup" not in latency:
            continue
        macs_before = layer.get("macs_before")
        macs_after = layer.get("macs_after")
        if not macs_before or not macs_after:
            continue
        points.append({
            "name": layer["name"],
            "macs_ratio": macs_before / macs_after,
            "speedup": latency["speedup"],
            "status": layer["status"],
        })
    return points


def plot_layer_speed(report_path: str | os.PathLike, out_path: str | os.PathLike) -> int:
    """Scatter each timed layer's MAC ratio (x) against its measured speedup (y) into ``out_path``.

    The diagonal is "speed follows MACs"; points below it are layers where the hardware gains less
    than the FLOP count promises; below 1 the chain is slower. Returns the number of points.
    Raises :class:`UsageError` when the report has no per-layer timings (compress without
    ``--measure``) or matplotlib is missing.
    """
    try:
        report = json.loads(Path(report_path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read the report {report_path}: {e}") from None
    points = layer_points(report)
    if not points:
        raise UsageError(f"the report {report_path} has no per-layer timings: write it with compress --measure --report")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("plotting needs matplotlib: pip install 'onnxfactor[plot]'") from None

    fig, ax = plt.subplots(figsize=(7, 5))
    top = max(max(p["macs_ratio"] for p in points), max(p["speedup"] for p in points)) * 1.1
    ax.plot([0, top], [0, top], color="grey", linewidth=1, linestyle="--", label="speedup = MAC cut")
    ax.axhline(1.0, color="black", linewidth=0.8)
    for status, color in (("decomposed", "tab:green"), ("kept", "tab:red")):
        chosen = [p for p in points if p["status"] == status]
        if chosen:
            ax.scatter([p["macs_ratio"] for p in chosen], [p["speedup"] for p in chosen], color=color, s=22,
                       label=f"{status} ({len(chosen)})")
    ax.set_xlabel("MACs before / after (per layer)")
    ax.set_ylabel("measured speedup (ONNX Runtime, per layer)")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_title(Path(report.get("input_path") or str(report_path)).name)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return len(points)
