"""Rich rendering of reports. The only module that prints."""

from __future__ import annotations

import contextlib

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def _num(n) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _ratio(r) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _ranks(ranks: dict | None) -> str:
    if not ranks:
        return "-"
    return ", ".join(f"{k}={'-' if v is None else v}" for k, v in ranks.items())


class Renderer:
    """Prints progress, tables and summaries to the terminal (stdout)."""

    def __init__(self, quiet: bool = False):
        self.console = Console(highlight=False, soft_wrap=False)
        if not self.console.is_terminal:  # logs and pipes: do not fold tables to 80 columns
            self.console.width = max(self.console.width, 160)
        self.quiet = quiet

    @contextlib.contextmanager
    def progress(self, label: str):
        """A progress bar over layers on stderr; yields the ``progress(done, total, name)`` callback.

        Shown only on a terminal: elsewhere (logs, pipes) a transient bar would leave a blank line
        in front of the one-line error message.
        """
        columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[layer]}"), TimeElapsedColumn())
        console = Console(stderr=True)
        with Progress(*columns, console=console, transient=True, disable=self.quiet or not console.is_terminal) as bar:
            task = bar.add_task(label, total=None, layer="")

            def update(done: int, total: int, name: str) -> None:
                bar.update(task, completed=done, total=total, layer=escape(name))

            yield update

    def layer_table(self, report, title: str) -> Table:
        table = Table(title=title, title_justify="left", show_lines=False)
        timed = any(layer.latency and "speedup" in layer.latency for layer in report.layers)
        columns = [("layer", "left"), ("weight", "left"), ("status", "left"), ("VBMF", "right"), ("ranks", "left"),
                   ("params", "right"), ("MACs", "right"), ("rel. err", "right")]
        calibrated = any(layer.output_error is not None for layer in report.layers)
        if calibrated:  # the data-aware figures: output error on the calibration data, then in the network
            columns += [("fit", "left"), ("out. err", "right"), ("corrected", "right")]
        columns += [("measured", "right")] if timed else []
        for col, justify in columns + [("reason", "left")]:
            table.add_column(col, justify=justify, overflow="fold")
        for layer in report.layers:
            measured = []
            if timed:
                lat = layer.latency or {}
                measured = [f"{lat['original_ms']:.3g}->{lat['chain_ms']:.3g} ms {lat['speedup']:.2f}x" if "speedup" in lat else "-"]
            data = []
            if calibrated:
                corr = layer.correction or {}
                corrected = "-"
                if "error_after" in corr:
                    corrected = f"{corr['error_before']:.3f}->{corr['error_after']:.3f}" + ("" if corr.get("applied") else " (kept)")
                data = [layer.fit or "-", "-" if layer.output_error is None else f"{layer.output_error:.3f}", corrected]
            vbmf = ", ".join(f"{m['mode']}={m['vbmf_rank']}/{m['full_rank']}" for m in layer.modes) or "-"
            table.add_row(
                escape(layer.name),
                "x".join(str(d) for d in layer.weight_shape) + (f" g{layer.group}" if layer.group > 1 else ""),
                layer.status,
                vbmf,
                _ranks(layer.ranks),
                _ratio(layer.params_ratio),
                _ratio(layer.macs_ratio),
                "-" if layer.rel_reconstruction_error is None else f"{layer.rel_reconstruction_error:.3f}",
                *data,
                *measured,
                escape(layer.reason or ""),
            )
        return table

    def _skipped(self, report) -> None:
        if report.skipped:
            table = Table(title="Not candidates", title_justify="left")
            for col in ("node", "op", "reason"):
                table.add_column(col, overflow="fold")
            for s in report.skipped:
                table.add_row(escape(s["graph_path"] + s["name"]), s["op_type"], escape(s["reason"]))
            self.console.print(table)

    def _totals(self, report) -> None:
        t = report.totals
        self.console.print(
            f"conv params {_num(t.conv_params_before)} -> {_num(t.conv_params_after)}, "
            f"conv MACs {_num(t.conv_macs_before)} -> {_num(t.conv_macs_after)} ({_ratio(t.conv_macs_ratio)} fewer)"
            + ("" if t.macs_known else " [partial: unknown shapes]")
            + f", model params {_num(t.model_params_before)} -> {_num(t.model_params_after)} ({_ratio(t.model_params_ratio)} smaller)"
        )
        if t.linear_params_before:
            self.console.print(
                f"fully connected params {_num(t.linear_params_before)} -> {_num(t.linear_params_after)}, "
                f"MACs {_num(t.linear_macs_before)} -> {_num(t.linear_macs_after)} ({_ratio(t.linear_macs_ratio)} fewer)"
                + ("" if t.linear_macs_known else " [partial: unknown shapes]")
            )
        if t.model_bytes_before and t.model_bytes_after:
            self.console.print(f"file size {_num(t.model_bytes_before)}B -> {_num(t.model_bytes_after)}B")

    def validation(self, v: dict | None) -> None:
        if not v:
            return
        table = Table(title=f"Validation on {escape(v['input_source'])} ({', '.join(v['providers'])})", title_justify="left")
        for col in ("output", "max abs", "rel L2", "cosine", "top-1 agree"):
            table.add_column(col, justify="right" if col != "output" else "left")
        for o in v["outputs"]:
            top1 = "-" if o.get("top1_agreement") is None else f"{o['top1_agreement']:.4f}"
            table.add_row(escape(o["name"]), f"{o['max_abs']:.4g}", f"{o['rel_l2']:.4g}", f"{o['cosine']:.6f}", top1)
        self.console.print(table)
        if v.get("accuracy_original") is not None:
            self.console.print(f"accuracy {v['accuracy_original']:.4f} -> {v['accuracy_compressed']:.4f}")
        if v.get("task_metric") is not None:
            self.console.print(f"task metric {escape(v['task_metric_name'])}: {v['task_metric']:.4f}")
        lo, lc = v.get("latency_original"), v.get("latency_compressed")
        if lo and lc:
            at = " ".join(f"{n}={'x'.join(map(str, d))}" for n, d in (v.get("latency_shapes") or {}).items())
            self.console.print(
                f"latency{' at ' + escape(at) if at else ''} (median of {lo['runs']} interleaved runs) {lo['median_ms']:.3f} ms -> {lc['median_ms']:.3f} ms "
                f"(speedup {lo['median_ms'] / lc['median_ms']:.2f}x)"
            )

    def speed(self, speed: dict | None) -> None:
        """The end-to-end measurements of the latency-aware selection (guard rounds or budget)."""
        if not speed or not speed.get("rounds"):
            return
        for r in speed["rounds"]:
            self.console.print(
                f"end to end with {r['layers']} decomposed layers: {r['original_ms']:.3g} ms -> {r['compressed_ms']:.3g} ms "
                f"({r['speedup']:.2f}x as fast)"
            )
        if "budget" in speed:
            self.console.print(f"latency budget {speed['budget']}: {'met' if speed['budget_met'] else 'NOT met'}")

    def calibration(self, calibration: dict | None) -> None:
        """One line on the calibration data and what the stage spent."""
        if not calibration:
            return
        corr = calibration.get("correction") or {}
        line = (f"calibration: {escape(calibration['source'])}, fit {calibration['fit']}, statistics {calibration['seconds']:.1f} s "
                f"({calibration['memory'].get('moments_mb', 0) + calibration['memory'].get('tiles_mb', 0) + calibration['memory'].get('cache_mb', 0):.0f} MB)")
        if corr.get("layers"):
            line += f"; correction of {corr['layers']} layers in {corr['stages']} passes on {corr['samples']} samples, {corr.get('seconds', 0):.1f} s"
            e2e = corr.get("end_to_end")
            if e2e:
                undone = len(e2e.get("reverted_layers", []))
                line += (f", held-out output error {e2e['held_out_error_before']:.3g} -> {e2e['held_out_error_after']:.3g}"
                         + ("" if not undone else " (worse: not applied)" if not e2e["applied"]
                            else f" ({undone} of {corr['layers']} layers undone)"))
        self.console.print(line)

    def finetune(self, finetune: dict | None) -> None:
        """One line on the fine-tuning (or why it fell back)."""
        if not finetune:
            return
        if finetune.get("iterative"):
            from onnxfactor.finetune.iterative import stage_summary

            for stage in finetune["stages"]:
                self.console.print(f"stage {stage['stage']}/{len(finetune['stages'])} ({escape(', '.join(stage['nodes']))}): "
                                   f"{escape(stage_summary(stage))}, {stage['seconds']:.1f} s")
            return
        if "steps" not in finetune:
            self.console.print(f"[yellow]fine-tuning:[/] {escape(finetune.get('fallback') or finetune.get('skipped', ''))}")
            return
        epochs = finetune.get("per_epoch") or []
        per = f", {epochs[0]['seconds']:.1f} s/epoch" if epochs else ""
        self.console.print(
            f"fine-tuned {finetune['trained_initializers']} tensors ({finetune['parameters']} parameters, {finetune['train']}) on "
            f"{escape(finetune['data'])}: {finetune['steps']} steps ({finetune['epochs']:.2f} epochs) on {finetune['device']}, "
            f"loss {finetune['loss_first']:.4g} -> {finetune['loss_last']:.4g}, {finetune['seconds']:.1f} s{per}, "
            f"peak RSS {finetune['peak_rss_mb']:.0f} MB")
        before, after = finetune.get("held_out_loss_before"), finetune.get("held_out_loss_after")
        if before is not None and after is not None:
            kept = "kept" if finetune.get("applied", True) else "[yellow]not applied: the starting weights are written[/]"
            self.console.print(f"fine-tuning held-out loss (first batch, not trained on) {before:.4g} -> {after:.4g}: {kept}")

    def compress_report(self, report) -> None:
        if not self.quiet:
            self.console.print(self.layer_table(report, "Layers"))
            self._skipped(report)
            self.calibration(report.calibration)
            self.finetune(report.finetune)
            self.speed(report.speed)
            self.validation(report.validation)
            for w in report.warnings:
                self.console.print(f"[yellow]warning:[/] {escape(w)}")
        if report.accuracy_warning:  # also with --quiet: the one thing a user must not miss
            self.console.print(f"[bold red]WARNING:[/] {escape(report.accuracy_warning)}")
        self._totals(report)
        v = report.validation
        if v and v.get("input_source", "").startswith("random"):
            self.console.print("validated on random inputs: output errors only, not task accuracy (give real inputs with --data)")
        self.console.print(
            f"decomposed {len(report.decomposed)} of {len(report.layers)} "
            f"{'Conv and fully connected' if any(l.is_linear for l in report.layers) else 'Conv'} layers, kept {len(report.kept)}, "
            f"not candidates {len(report.skipped)}; wrote {escape(str(report.output_path))} "
            f"in {report.timings.get('total', 0):.2f} s (+{report.timings.get('check', 0) + report.timings.get('validate', 0):.2f} s checks)"
        )

    def analyze_report(self, report) -> None:
        self.console.print(self.layer_table(report, "Analysis (nothing written)"))
        self._skipped(report)
        self.calibration(report.calibration)
        self._totals(report)
        sigma = [f"{escape(l.name)}: " + ", ".join(f"{m['mode']} sigma2={m['sigma2']:.3g}" for m in l.modes) for l in report.layers if l.modes]
        if sigma:
            self.console.print("VBMF noise variance: " + "; ".join(sigma[:8]) + (" ..." if len(sigma) > 8 else ""))
