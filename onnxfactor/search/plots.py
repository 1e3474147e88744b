"""The search's figures (``--plots DIR``; matplotlib, ``[plot]`` extra, imported only here).

* ``sensitivity.png`` -- each layer's output error on the calibration data (solid) and its
  weight reconstruction error (dashed) against the rank fraction, per method;
* ``accuracy_vs_rank.png`` -- held-out accuracy (or top-1 agreement) of the grid's global
  ``ratio`` settings against the fraction (the partial_tucker channel-fraction study), when the
  grid ran; otherwise of every candidate against its mean kept rank fraction;
* ``pareto.png`` -- accuracy against MAC compression and against measured speedup, every
  candidate, the Pareto front (non-dominated) marked and the winner circled;
* ``chosen_ranks.png`` -- the winner's ranks per layer against the full ranks.

:func:`make_figures` returns the figure objects (tests read their axes); :func:`write_plots` saves them.
"""

from __future__ import annotations

from pathlib import Path

from onnxfactor.errors import UsageError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plots needs matplotlib: pip install 'onnxfactor[plot]'") from None
    return plt


def _quality(c: dict) -> tuple[float | None, str]:
    if c.get("accuracy") is not None:
        return 100 * c["accuracy"], "held-out top-1 accuracy (%)"
    if c.get("task_metric") is not None:
        return c["task_metric"], "held-out task metric"
    return c.get("agreement"), "held-out top-1 agreement"


def pareto_mask(points: list[tuple[float, float]]) -> list[bool]:
    """True where no other point is at least as good on both axes (higher x, higher y) and better on one."""
    out = []
    for i, (x, y) in enumerate(points):
        out.append(not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i))
    return out


def make_figures(result: dict) -> dict:
    """``{file name: matplotlib Figure}`` of a search result (its JSON form)."""
    plt = _pyplot()
    figures = {}
    rows = result.get("sensitivity") or []
    if rows:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (layer, method) in sorted({(r["layer"], r["method"]) for r in rows}):
            pts = sorted((r["fraction"], r["output_error"], r["weight_error"]) for r in rows if r["layer"] == layer and r["method"] == method)
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{layer} ({method})")
            ax.plot([p[0] for p in pts], [p[2] for p in pts], linestyle="--", color=line.get_color())
        ax.set_xlabel("rank fraction")
        ax.set_ylabel("relative error (solid: output on calibration data, dashed: weight)")
        ax.set_title("per-layer sensitivity")
        ax.legend(fontsize=6)
        figures["sensitivity.png"] = fig
    candidates = [c for c in result.get("candidates", []) if _quality(c)[0] is not None]
    if candidates:
        label = _quality(candidates[0])[1]
        fig, ax = plt.subplots(figsize=(6, 4))
        grid = [c for c in candidates if c["spec"]["kind"] == "global" and c["spec"]["policy"] == "ratio"]
        if grid:
            for r in sorted({c["spec"].get("round_to", 1) for c in grid}):
                pts = sorted((c["spec"]["value"], _quality(c)[0]) for c in grid if c["spec"].get("round_to", 1) == r)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"round to {r}")
            ax.set_xlabel("rank fraction (global ratio setting)")
            ax.legend()
        else:
            pts = sorted((_mean_fraction(c), _quality(c)[0]) for c in candidates)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="none")
            ax.set_xlabel("mean decomposed-layer MAC fraction kept")
        ax.set_ylabel(label)
        ax.set_title("accuracy vs rank")
        figures["accuracy_vs_rank.png"] = fig

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        winner = result.get("winner") or {}
        for ax, (name, xlabel) in zip(axes, (("compression", "conv MAC compression (x)"), ("speedup", "measured speedup (x)"))):
            pts = [(_x(c, name), _quality(c)[0]) for c in candidates]
            keep = [(p, c) for p, c in zip(pts, candidates) if p[0] is not None]
            if not keep:
                continue
            mask = pareto_mask([p for p, _ in keep])
            ax.scatter([p[0] for p, _ in keep], [p[1] for p, _ in keep], s=18, color="0.6", label="candidates")
            front = sorted(p for (p, _), m in zip(keep, mask) if m)
            ax.plot([p[0] for p in front], [p[1] for p in front], color="C3", marker="o", label="Pareto front")
            won = [p for p, c in keep if c.get("key") is not None and c.get("key") == winner.get("key")]
            if won:
                ax.scatter([won[0][0]], [won[0][1]], s=120, facecolors="none", edgecolors="C0", linewidths=2, label="chosen")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.legend(fontsize=7)
        fig.suptitle("accuracy vs compression and vs speedup")
        figures["pareto.png"] = fig
    winner = result.get("winner")
    if winner:
        layers = [(n, l) for n, l in winner["layers"].items() if l.get("status") == "decomposed" and l.get("ranks")]
        if layers:
            fig, ax = plt.subplots(figsize=(7, 4))
            names = [n for n, _ in layers]
            keys = sorted({k for _, l in layers for k, v in l["ranks"].items() if v is not None})
            width = 0.8 / max(len(keys), 1)
            for i, k in enumerate(keys):
                ax.bar([j + i * width for j in range(len(names))], [l["ranks"].get(k) or 0 for _, l in layers], width, label=k)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))])
            ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
            ax.set_xlabel("layer")
            ax.set_ylabel("rank")
            ax.set_title("chosen ranks per layer")
            ax.legend()
            fig.tight_layout()
            figures["chosen_ranks.png"] = fig
    return figures


def _x(c: dict, name: str):
    if name == "speedup":
        return c.get("speedup")
    return c["macs_original"] / c["macs"] if c.get("macs") else None


def _mean_fraction(c: dict) -> float:
    return c["macs"] / c["macs_original"] if c.get("macs") and c.get("macs_original") else 1.0


def write_plots(result: dict, folder: Path) -> list[Path]:
    """Save :func:`make_figures` into ``folder`` (created); returns the paths."""
    plt = _pyplot()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in make_figures(result).items():
        path = folder / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
