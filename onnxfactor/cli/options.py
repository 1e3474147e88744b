"""Option aliases shared by the commands (typer ``Annotated`` types)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer


class RankPolicy(str, Enum):
    vbmf = "vbmf"
    weakened = "weakened"
    ratio = "ratio"
    energy = "energy"
    error = "error"
    file = "file"


def _method_enum():
    from onnxfactor.methods import METHOD_CHOICES  # the registry is the single source of the choices

    return Enum("MethodName", {name: name for name in METHOD_CHOICES}, type=str)


MethodName = _method_enum()


class Rank0Rule(str, Enum):
    keep = "keep"
    min = "min"


class ResizeMode(str, Enum):
    stretch = "stretch"
    letterbox = "letterbox"
    short_side_center_crop = "short-side+center-crop"


class ObjectiveName(str, Enum):
    latency = "latency"
    macs = "macs"
    params = "params"


class StrategyName(str, Enum):
    allocate = "allocate"
    grid = "grid"


class SensitivityName(str, Enum):
    layer = "layer"
    network = "network"


class ChannelOrderName(str, Enum):
    rgb = "rgb"
    bgr = "bgr"


class FitName(str, Enum):
    data = "data"
    weights = "weights"


class TrainName(str, Enum):
    factors = "factors"
    all = "all"


class DeviceName(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class LayoutName(str, Enum):
    nchw = "nchw"
    nhwc = "nhwc"


InputModel = Annotated[Path, typer.Argument(help="Input ONNX model (never modified).", show_default=False)]
InputShapes = Annotated[
    Optional[list[str]],
    typer.Option(
        "--input-shape",
        help="Fix a dynamic input shape, e.g. images=1x3x640x640 (repeatable). "
        "Default: dynamic axis 0 -> 1, other dynamic axes -> 224.",
        show_default=False,
    ),
]
Policy = Annotated[RankPolicy, typer.Option("--ranks", help="Rank policy (see README 'How ranks are chosen').")]
Weaken = Annotated[float, typer.Option(help="w of --ranks weakened: r = R - w (R - r_vbmf); 1 = VBMF, 0 = full rank.", min=0.0, max=1.0)]
Ratio = Annotated[float, typer.Option(help="Fraction of the full rank for --ranks ratio.", min=0.0, max=1.0)]
Energy = Annotated[float, typer.Option(help="Share of squared singular values kept by --ranks energy.", min=0.0, max=1.0)]
TargetError = Annotated[
    float,
    typer.Option(help="Relative reconstruction error ||W - W_chain|| / ||W|| per layer for --ranks error (cheapest ranks meeting it).", min=0.0, max=0.999),
]
RankFile = Annotated[Optional[Path], typer.Option(help="JSON ranks per node name, an entry may name its method: {\"conv\": {\"method\": \"cp3\", \"rank\": 9}} (implies --ranks file).", show_default=False)]
Rank0 = Annotated[Rank0Rule, typer.Option(help="When VBMF says a mode is noise (rank 0): keep it undecomposed, or use --min-rank.")]
MinRank = Annotated[int, typer.Option(help="Rank used by --rank0 min.", min=1)]
RoundTo = Annotated[int, typer.Option(help="Round ranks up to a multiple of this (e.g. 8 or 16); 1 = off.", min=1)]
MinReduction = Annotated[
    float, typer.Option(help="Decompose a layer only if its MACs and parameters both drop by this fraction.", min=-1.0, max=1.0)
]
InMinChannels = Annotated[
    int, typer.Option("--in-min-channels", help="Convs with at most this many input channels are decomposed on the output mode only.", min=0)
]
Hooi = Annotated[int, typer.Option("--hooi", help="HOOI refinement sweeps after the HOSVD (0 = HOSVD only).", min=0)]
Nodes = Annotated[Optional[list[str]], typer.Option("--node", help="Only decompose this Conv (or, with --include-linear, Gemm / MatMul) node (repeatable).", show_default=False)]
Exclude = Annotated[Optional[list[str]], typer.Option("--exclude", help="Never decompose this Conv (or Gemm / MatMul) node (repeatable).", show_default=False)]
IncludeLinear = Annotated[
    bool,
    typer.Option(
        "--include-linear",
        help="Also decompose fully connected layers (Gemm / MatMul with a constant 2-D weight) by truncated SVD into two "
        "layers, with the same rank policies, --min-reduction, --node / --exclude, data-aware fit and measured selection.",
    ),
]
FoldBatchnorm = Annotated[
    bool,
    typer.Option(
        "--fold-batchnorm",
        help="Fold each inference-mode BatchNormalization that follows a Conv into it before fitting (exact), so the factors "
        "fit the map the layer applies; off by default (measured: it helps some Paddle exports and hurts others).",
    ),
]
Data = Annotated[
    Optional[str],
    typer.Option(
        "--data", metavar="PATH",
        help="Validation inputs: an .npz keyed by input name (+ optional 'labels'), a folder of images (see --image-size), "
        "or a data-loader script file.py[:function] (default function load_data). Default: seeded random inputs.",
        show_default=False,
    ),
]
Metric = Annotated[
    Optional[str],
    typer.Option(
        "--metric", metavar="FILE.py[:FUNCTION]",
        help="A task metric judged on --data: FUNCTION(original_outputs, compressed_outputs) -> a score per sample "
        "(or per batch), 1.0 = the same answer (default function score). Reported, warned on below 0.9, and what "
        "search's --min-agreement applies to.",
        show_default=False,
    ),
]
Calibration = Annotated[
    Optional[str],
    typer.Option(
        "--calibration", metavar="PATH",
        help="Inputs the factors are fitted to: an .npz keyed by input name, a folder of images (see --image-size), "
        "or a data-loader script file.py[:function] (default function load_data). Must not share samples with --data "
        "(see --allow-overlap).",
        show_default=False,
    ),
]
CalibrationSamples = Annotated[
    Optional[int],
    typer.Option("--calibration-samples", metavar="N", help="Fit to at most this many samples of --calibration.", show_default=False, min=1),
]
ImageSize = Annotated[
    Optional[str],
    typer.Option(
        "--image-size", metavar="HxW",
        help="Image folders: resize images to this size (default: the model input's fixed height and width).", show_default=False,
    ),
]
Resize = Annotated[
    ResizeMode,
    typer.Option(
        "--resize",
        help="Image folders: stretch (ignore the aspect ratio), letterbox (fit inside, pad with 114) or "
        "short-side+center-crop (cover, crop the center). Bilinear interpolation.",
    ),
]
Scale = Annotated[
    float, typer.Option("--scale", help="Image folders: pixel values 0..255 are multiplied by this first (1/255 maps them to 0..1).")
]
Mean = Annotated[
    Optional[str],
    typer.Option("--mean", metavar="M[,M,M]", help="Image folders: subtracted per channel after --scale, e.g. 0.485,0.456,0.406.", show_default=False),
]
Std = Annotated[
    Optional[str],
    typer.Option("--std", metavar="S[,S,S]", help="Image folders: divides per channel after --mean, e.g. 0.229,0.224,0.225.", show_default=False),
]
ChannelOrder = Annotated[ChannelOrderName, typer.Option("--channel-order", help="Image folders: channel order of 3-channel inputs.")]
Layout = Annotated[
    Optional[LayoutName],
    typer.Option("--layout", help="Image folders: input layout. Default: inferred from the input's shape (1 or 3 channels).", show_default=False),
]
Fit = Annotated[
    FitName,
    typer.Option(
        "--fit",
        help="With --calibration: data (factors fitted to each layer's output on the calibration inputs) or weights "
        "(fitted to the weights only, as without calibration data).",
    ),
]
Correct = Annotated[
    bool,
    typer.Option(
        "--correct/--no-correct",
        help="With --calibration: refit each chain's last conv, in topological order, to the original output on inputs "
        "from the already compressed network (ridge least squares).",
    ),
]
Reconstruct = Annotated[
    int,
    typer.Option(
        "--reconstruct", metavar="STEPS",
        help="With --calibration: that many Adam steps per chain on all its factors after the correction, matching the "
        "original output after the layer's activation (PyTorch, [finetune] extra); 0 = off.", min=0,
    ),
]
CorrectionPasses = Annotated[
    int,
    typer.Option("--correction-passes", metavar="N", min=0,
                 help="With --calibration: at most N passes of the sequential correction, each correcting a group of consecutive "
                 "layers (0 = one pass per layer: slower, better on deep models; see README)."),
]
CalibrationMemory = Annotated[
    float,
    typer.Option("--calibration-memory", metavar="MB", help="Memory budget of the calibration statistics and correction (see README).", min=16.0),
]
Finetune = Annotated[
    bool, typer.Option("--finetune", help="After compressing, distil the original into the compressed model on the --calibration "
                       "data (no labels needed; PyTorch, [finetune] extra).")]
Iterative = Annotated[
    bool, typer.Option("--iterative", help="With --finetune: decompose --stage-size Convs at a time, fine-tune, re-estimate the next "
                       "stage's ranks on the updated weights and activations, repeat (--epochs / --steps per stage).")]
StageSize = Annotated[int, typer.Option("--stage-size", help="Iterative mode: Convs per stage, in graph order.", min=1)]
Epochs = Annotated[float, typer.Option("--epochs", help="Fine-tuning: passes over the data.", min=0.0)]
Steps = Annotated[Optional[int], typer.Option("--steps", help="Fine-tuning: optimiser steps (instead of --epochs).", min=1, show_default=False)]
Lr = Annotated[float, typer.Option("--lr", help="Fine-tuning: Adam's learning rate (cosine decay to 0).", min=0.0)]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Fine-tuning: samples per step.", min=1)]
Device = Annotated[
    Optional[DeviceName], typer.Option("--device", help="Fine-tuning device (default: cuda if torch sees it, else cpu).", show_default=False)]
Train = Annotated[
    TrainName, typer.Option("--train", help="Fine-tuning: factors (the decomposed chains' weights and biases) or all float weights.")]
Labels = Annotated[bool, typer.Option("--labels", help="Fine-tuning: add cross-entropy on the data's labels, when it has them.")]
Deterministic = Annotated[bool, typer.Option("--deterministic", help="Fine-tuning: ask torch for deterministic algorithms.")]
AllowOverlap = Annotated[
    bool,
    typer.Option("--allow-overlap", help="Allow --calibration and --data to share files or samples (accuracy on them is optimistic)."),
]
Seed = Annotated[int, typer.Option(help="Seed of the random validation inputs.")]
MaxSamples = Annotated[Optional[int], typer.Option(help="Validate on at most this many samples of --data.", show_default=False, min=1)]
Provider = Annotated[
    Optional[str], typer.Option(help="ONNX Runtime execution provider (cpu, cuda, ...). Default: CUDA if available, else CPU.", show_default=False)
]
Threads = Annotated[Optional[int], typer.Option(help="ONNX Runtime intra-op threads (default: ORT's choice).", show_default=False, min=1)]
LatencyRuns = Annotated[int, typer.Option(help="Interleaved timing runs per model in the validation report (0 = none; --measure times separately).", min=0)]
MaxRelError = Annotated[
    Optional[float],
    typer.Option(help="Fail with exit code 3 (and write no model) if any output's relative L2 error exceeds this.", show_default=False, min=0.0),
]
ReportPath = Annotated[Optional[Path], typer.Option("--report", help="Write every per-layer figure to this JSON file.", show_default=False)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the summary line.")]
Method = Annotated[
    MethodName,
    typer.Option(
        help="Decomposition: tucker2 (Tucker-2), cp3 (CP, depthwise kxk), cp4 (CP, one depthwise conv per axis), "
        "tucker3 (spatial Tucker), auto (per layer the fewest MACs at no more reconstruction error than Tucker-2 at the --ranks ranks)."
    ),
]
Measure = Annotated[
    bool,
    typer.Option(
        "--measure/--no-measure",
        help="Time every decomposed layer and the whole model in ONNX Runtime (--provider, --threads); keep only layers "
        "that are faster and never write a slower model. --no-measure decides by MACs alone.",
    ),
]
SpeedMargin = Annotated[
    float, typer.Option(help="A decomposed layer must run at least 1 + this times as fast as the original Conv.", min=0.0)
]
RankSearch = Annotated[
    bool, typer.Option("--rank-search/--no-rank-search", help="Also time ranks rounded up to multiples of 8 and 16; keep the fastest.")
]
TimingCache = Annotated[
    Optional[Path],
    typer.Option("--timing-cache", metavar="FILE", help="Reuse and extend the layer and model timings in this JSON file "
                 "(keyed by structure, provider, threads and machine): a repeated run makes the same choices.", show_default=False),
]
AllowSlower = Annotated[
    bool, typer.Option("--allow-slower", help="Write the model even if it measures slower end to end (no rollback).")
]
TargetSpeedup = Annotated[
    Optional[float],
    typer.Option(help="Latency budget: choose layers and VBMF weakening to run this many times as fast, at the least error.",
                 show_default=False, min=1.0),
]
MaxLatencyMs = Annotated[
    Optional[float],
    typer.Option("--max-latency-ms", help="Latency budget in milliseconds per run of the --input-shape batch (instead of --target-speedup).",
                 show_default=False, min=0.0),
]
