"""Activation statistics of every candidate Conv on the calibration data, streamed batch by batch.

One ONNX Runtime pass over the calibration data, on a copy of the original model whose Conv
inputs and outputs are extra graph outputs (:class:`~onnxfactor.calibration.probe.Probe`). Per
Conv, never holding all activations:

* **moments** (float64, per group): the input-channel second moment ``E[x x^T]`` and mean, and the
  response's (the Conv output's) second moment and mean, over every pixel of every sample;
* **tiles**: a bounded random sample of input windows with the original output block each
  produces (:mod:`onnxfactor.calibration.tiles`), for measured output errors and the
  reconstruction. They are drawn, uniformly over (sample, position), from the
  ``correction_samples`` samples spread evenly over the data (bottom-k sampling with random
  priorities, so the draw needs no sample count in advance), whose feeds are kept: the sequential
  correction re-runs just them through the compressed network (and cuts the same windows).

ONNX Runtime computes the next run while the moments of the current one are added (a worker
thread; both release the GIL), so on two cores the pass takes about the longer of the two instead
of their sum; the order of the additions, and so every figure, is that of the sequential pass.

Memory (``CalibrationConfig.memory_mb`` = B): two runs' exposed activations (the one being added
and the next) plus working copies stay below B / 4 (runs are split into fewer samples when the
model's batch axis is dynamic; a single sample larger than that is still one run),
tiles below B / 4 over all layers, the cached correction samples below B / 4; the moments need
``8 * (C_in^2 + C_out^2) / g`` bytes per Conv on top, independent of the number of samples
(``CalibrationData.memory`` reports all of it). The correction then keeps the cut tensors of the
compressed and the original network on the cached samples, below B / 4 each
(:mod:`onnxfactor.calibration.correct`; its report's ``cuts``).

Convs inside ``If``/``Loop``/``Scan`` bodies cannot be exposed as graph outputs; they keep the
weight-only fit (``CalibrationData.notes`` says so).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxfactor.analysis import ConvSite
from onnxfactor.calibration.activation import Activation, following_activation
from onnxfactor.calibration.probe import Probe, run_ahead
from onnxfactor.calibration.tiles import TileGeometry
from onnxfactor.config import CalibrationConfig
from onnxfactor.errors import UsageError
from onnxfactor.methods.base import ConvGeometry

_MB = 1 << 20


#: Pixels per run entering the second-moment products (a random subset beyond): early layers of
#: detectors have 100k+ pixels per image, where a subset estimates a C x C moment just as well.
MAX_GRAM_COLUMNS = 1 << 13
#: Pixels per layer entering the products over the whole calibration set when its size is known:
#: each run takes its share of :data:`GRAM_BUDGET`, at least :data:`MIN_GRAM_COLUMNS` and at most
#: :data:`MAX_GRAM_COLUMNS` (a C x C moment needs a bounded number of pixels, not 8192 per image:
#: 256 PP-OCRv4 det inputs at 992 x 736, one per run, spent half the statistics' time on products).
GRAM_BUDGET = 1 << 18
MIN_GRAM_COLUMNS = 1 << 10


def gram_columns(run_samples: int, total_samples: int | None, seen: int = 0) -> int:
    """Pixels of a run of ``run_samples`` that enter the products (see :data:`GRAM_BUDGET`). When the
    total is unknown (an iterable of feed dicts), the share of the samples so far, ``seen`` + this run:
    the first runs take :data:`MAX_GRAM_COLUMNS`, later ones fewer (the products are weighted by the
    pixels each column stands for, so unequal shares do not bias the moment)."""
    total = total_samples or seen + run_samples
    return int(min(MAX_GRAM_COLUMNS, max(MIN_GRAM_COLUMNS, GRAM_BUDGET * run_samples // max(total, 1))))


@dataclass
class Moments:
    """Streaming sums of channel vectors and of their outer products, per group, in float64.

    Means use every pixel; the outer products at most ``columns`` (:func:`gram_columns`) random
    pixels of each run (``gram_count`` of them in all), each weighted by the run's pixels per column
    (``gram_weight`` sums the pixels they stand for: an unbiased estimate whatever each run's share),
    multiplied in float32 (a relative error of about 1e-6 for one run's sum) and accumulated over
    runs in float64.
    """

    group: int
    sum: np.ndarray
    grams: list[np.ndarray]
    count: int = 0
    gram_count: int = 0
    gram_weight: float = 0.0

    @classmethod
    def empty(cls, channels: int, group: int) -> "Moments":
        c = channels // group
        return cls(group, np.zeros(channels), [np.zeros((c, c)) for _ in range(group)])

    def add(self, x: np.ndarray, rng: np.random.Generator | None = None, columns: int = MAX_GRAM_COLUMNS) -> None:
        """Add every pixel of ``x`` (``N x C x *spatial``); ``rng`` picks the gram's subset of ``columns`` pixels."""
        n, c = x.shape[:2]
        flat = np.asarray(x).reshape(n, c, -1)
        pixels = flat.shape[2]
        self.sum += flat.sum(axis=(0, 2)).astype(np.float64)  # one run in its dtype, accumulated in float64
        self.count += n * pixels
        if n * pixels > columns:
            rng = rng or np.random.default_rng(0)
            pick = rng.integers(0, n * pixels, columns)  # with replacement: no permutation of 100k+ pixels
            pick.sort()  # neighbouring reads (1.2-1.8x faster gathers); the sum does not depend on the order
            rows = np.take(flat[0], pick, axis=1).T if n == 1 else flat[pick // pixels, :, pick % pixels]  # (k, C)
        else:
            rows = flat.transpose(0, 2, 1).reshape(-1, c)
        rows = rows.astype(np.float32, copy=False)
        weight = n * pixels / rows.shape[0]  # pixels each column stands for (1 without a subset)
        cg = c // self.group
        for g in range(self.group):  # float32 product of one run, accumulated in float64
            block = rows[:, g * cg : (g + 1) * cg]
            self.grams[g] += weight * (block.T @ block).astype(np.float64)
        self.gram_count += rows.shape[0]
        self.gram_weight += n * pixels

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    def second(self, g: int) -> np.ndarray:
        """``E[x x^T]`` of group ``g``'s channels."""
        return self.grams[g] / max(self.gram_weight, 1.0)

    def covariance(self, g: int) -> np.ndarray:
        """``E[(x - mu)(x - mu)^T]`` of group ``g``'s channels."""
        cg = self.grams[g].shape[0]
        mu = self.mean[g * cg : (g + 1) * cg]
        return self.second(g) - np.outer(mu, mu)

    @property
    def nbytes(self) -> int:
        return int(self.sum.nbytes + sum(g.nbytes for g in self.grams))


class TileReservoir:
    """A bottom-k sample of tiles of one Conv: the ``capacity`` candidates with the lowest random priority."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.tile: TileGeometry | None = None
        self.priority = np.empty(0)
        self.samples = np.empty(0, dtype=np.int64)
        self.origins: np.ndarray | None = None
        self.windows: np.ndarray | None = None   # (k, C_in, *window) float32: the original input
        self.targets: np.ndarray | None = None   # (k, C_out, *extent) float32: the original output
        self.skipped_shapes = 0

    def offer(self, rng: np.random.Generator, geometry: ConvGeometry, x: np.ndarray, y: np.ndarray,
              rows: np.ndarray, sample_ids: np.ndarray) -> None:
        """Offer ``capacity`` random tiles of each of ``rows`` (rows of ``x``/``y``; global ids ``sample_ids``)."""
        if len(rows) == 0:
            return
        in_dims = tuple(int(d) for d in x.shape[2:])
        if self.tile is None:
            self.tile = TileGeometry.of(geometry, in_dims)
        tile = self.tile if in_dims == self.tile.in_dims else TileGeometry.of(geometry, in_dims, self.tile.extent)
        if not tile.fits:  # an input too small for this layer's tiles
            self.skipped_shapes += 1
            return
        # Each row offers ``capacity`` candidates with uniform priorities; only those below the
        # current k-th priority can enter, so draw just them: Binomial(capacity, threshold) many,
        # uniform below the threshold (the same distribution, without generating the rest).
        threshold = float(self.priority.max()) if len(self.priority) >= self.capacity else 1.0
        counts = rng.binomial(self.capacity, threshold, size=len(rows))
        total = int(counts.sum())
        if total == 0:
            return
        priority = rng.random(total) * threshold
        origins = rng.integers(0, np.asarray(tile.origins()), size=(total, len(tile.origins())))
        row_of = np.repeat(rows, counts)
        pick = np.arange(total)
        if total > self.capacity:
            pick = np.argpartition(priority, self.capacity - 1)[: self.capacity]
        windows = tile.cut_inputs(x, row_of[pick], origins[pick])
        targets = tile.cut_outputs(y, row_of[pick], origins[pick])
        ids = np.asarray(sample_ids, dtype=np.int64)[np.searchsorted(rows, row_of[pick])]  # rows are sorted
        self._merge(priority[pick], ids, origins[pick], windows, targets)

    def _merge(self, priority, samples, origins, windows, targets) -> None:
        """Keep the ``capacity`` lowest priorities of the kept and the new tiles; new tiles are
        written into the slots they evict (no copy of the reservoir)."""
        if self.windows is None:
            self.windows = np.zeros((0, *windows.shape[1:]), dtype=np.float32)
            self.targets = np.zeros((0, *targets.shape[1:]), dtype=np.float32)
            self.origins = np.zeros((0, origins.shape[1]), dtype=origins.dtype)
        room = self.capacity - len(self.priority)
        if room > 0:  # filling up: append what fits, merge the rest below
            take = np.argsort(priority, kind="stable")[:room]
            rest = np.setdiff1d(np.arange(len(priority)), take)
            self.priority = np.concatenate([self.priority, priority[take]])
            self.samples = np.concatenate([self.samples, samples[take]])
            self.origins = np.concatenate([self.origins, origins[take]])
            self.windows = np.concatenate([self.windows, windows[take].astype(np.float32)])
            self.targets = np.concatenate([self.targets, targets[take].astype(np.float32)])
            priority, samples, origins, windows, targets = priority[rest], samples[rest], origins[rest], windows[rest], targets[rest]
            if len(priority) == 0:
                return
        combined = np.concatenate([self.priority, priority])
        keep = np.argpartition(combined, self.capacity - 1)[: self.capacity]
        entering = keep[keep >= self.capacity] - self.capacity
        evicted = np.setdiff1d(np.arange(self.capacity), keep[keep < self.capacity])
        self.priority[evicted] = priority[entering]
        self.samples[evicted] = samples[entering]
        self.origins[evicted] = origins[entering]
        self.windows[evicted] = windows[entering]
        self.targets[evicted] = targets[entering]

    @property
    def count(self) -> int:
        return len(self.priority)

    @property
    def nbytes(self) -> int:
        return 0 if self.windows is None else int(self.windows.nbytes + self.targets.nbytes)


@dataclass
class LayerStatistics:
    """What the calibration data says about one Conv (see the module docstring)."""

    name: str
    input_name: str
    output_name: str
    geometry: ConvGeometry
    bias: np.ndarray | None
    inputs: Moments
    outputs: Moments
    tiles: TileReservoir
    activation: Activation | None

    @property
    def response_mean(self) -> np.ndarray:
        """Mean of the Conv's output without its bias: ``E[W * x]``."""
        mu = self.outputs.mean
        return mu - self.bias if self.bias is not None else mu

    @property
    def nbytes(self) -> int:
        return self.inputs.nbytes + self.outputs.nbytes + self.tiles.nbytes


@dataclass
class CachedChunk:
    """Feeds of one run kept for the correction passes, with the global ids of its samples."""

    feeds: dict[str, np.ndarray]
    samples: np.ndarray


@dataclass
class CalibrationData:
    """Per-Conv statistics of one pass over the calibration data, plus the cached tile samples."""

    layers: dict[str, LayerStatistics]
    cache: list[CachedChunk]
    samples: int
    source: str
    seconds: float
    memory: dict
    notes: dict[str, str] = field(default_factory=dict)       # sites without statistics, and why
    tile_notes: dict[str, str] = field(default_factory=dict)  # sites with fewer tiles, and why
    #: collected on the model with its batch norms folded (CompressConfig.fold_batchnorm): a Conv's
    #: response is then the one after its batch norm, so reuse needs the same setting
    fold_batchnorm: bool = False

    def reusable(self, fold_batchnorm: bool) -> "CalibrationData":
        """``self``, if it was collected with the same batch-norm folding; else a usage error."""
        if self.fold_batchnorm != fold_batchnorm:
            from onnxfactor.errors import UsageError

            raise UsageError("these calibration statistics were collected with the batch norms "
                             f"{'folded' if self.fold_batchnorm else 'kept'}: calibrate and compress with the same "
                             "fold_batchnorm (--fold-batchnorm)")
        return self

    def locate(self, sample_ids: np.ndarray) -> list[tuple[int, int]]:
        """``(chunk, row)`` in :attr:`cache` of each global sample id."""
        where = {int(s): (c, r) for c, chunk in enumerate(self.cache) for r, s in enumerate(chunk.samples.tolist())}
        return [where[int(s)] for s in sample_ids]

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "samples": self.samples,
            "layers": len(self.layers),
            "correction_samples": int(sum(len(c.samples) for c in self.cache)),
            "seconds": round(self.seconds, 3),
            "memory": self.memory,
            "notes": dict(self.notes),
            "tile_notes": dict(self.tile_notes),
        }


def _bias(site: ConvSite) -> np.ndarray | None:
    import onnx_graphsurgeon as gs

    if len(site.node.inputs) < 3 or not site.node.inputs[2].name:
        return None
    b = site.node.inputs[2]
    if not isinstance(b, gs.Constant):
        return None
    lazy = b._values
    values = lazy.load() if isinstance(lazy, gs.ir.tensor.LazyValues) else np.asarray(b.values)
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _splittable(model: onnx.ModelProto) -> bool:
    """Whether runs can be split into fewer samples: every real input's axis 0 is dynamic."""
    from onnxfactor.validation.inputs import _declared_dims, real_inputs

    for value in real_inputs(model):
        dims = _declared_dims(value)
        if dims and dims[0] is not None:
            return False
    return True


def _split(feeds: dict, per_sample: frozenset, start: int, size: int, rows: int):
    """Yield ``(feeds, start, size)`` runs of at most ``rows`` samples (slices of the per-sample feeds)."""
    for a in range(0, size, rows):
        b = min(a + rows, size)
        if a == 0 and b == size:
            yield feeds, start, size
            return
        yield {k: (v[a:b] if k in per_sample else v) for k, v in feeds.items()}, start + a, b - a


def _tile_ids(total: int | None, count: int) -> np.ndarray:
    """Global ids of the tile samples: ``count`` spread evenly over ``total`` samples (the first ones if unknown)."""
    if total is None:
        return np.arange(count, dtype=np.int64)
    if total <= count:
        return np.arange(total, dtype=np.int64)
    return np.unique(np.round(np.linspace(0, total - 1, count)).astype(np.int64))


def collect_statistics(
    model: onnx.ModelProto,
    sites: list[ConvSite],
    source,
    config: CalibrationConfig,
    *,
    providers: list[str],
    progress=None,
    overlap: bool = True,
) -> CalibrationData:
    """One pass of ``source`` (a :class:`onnxfactor.data.FeedSource`) through ``model``: statistics of ``sites``.

    ``model`` must be runnable as is (IR < 4 conventions restored). Sites inside subgraphs get no
    statistics (a note says why). ``progress(done_samples, total | None, label)`` after each run.
    ``overlap=False`` runs ONNX Runtime and the moments in turn (same figures, tested), with the
    session's threads spinning as for any session run back to back.
    """
    start = time.perf_counter()
    budget = config.memory_mb * _MB
    main = [s for s in sites if s.graph_path == ""]
    notes = {s.name: "inside a control-flow subgraph: its tensors cannot be exposed, weight-only fit" for s in sites if s.graph_path}
    layers: dict[str, LayerStatistics] = {}
    capacity = _tile_capacity(main, config.tiles, budget / 4)
    for site in main:
        g = site.geometry.group
        layers[site.name] = LayerStatistics(
            name=site.name,
            input_name=site.node.inputs[0].name,
            output_name=site.node.outputs[0].name,
            geometry=site.geometry,
            bias=_bias(site),
            inputs=Moments.empty(site.in_per_group * g, g),
            outputs=Moments.empty(site.weight_shape[0], g),
            tiles=TileReservoir(capacity),
            activation=following_activation(site.node, site.graph),
        )
    if not layers:
        return CalibrationData({}, [], 0, source.describe, 0.0, {}, notes)
    names = [n for st in layers.values() for n in (st.input_name, st.output_name)]
    probe = Probe(model, names, providers, spinning=not overlap)
    splittable = _splittable(model)
    rows_per_run = None  # samples per run when the batch axis is dynamic: measured on a first run of one
    tile_ids = None
    cache: list[CachedChunk] = []
    cache_bytes = 0
    seen = 0
    peak_run_bytes = 0
    rngs = {name: np.random.default_rng([config.seed, i]) for i, name in enumerate(layers)}

    def runs():
        """``(batch, feeds, first, size)`` per run; a batch's split is decided when it is reached."""
        nonlocal tile_ids
        for batch in source.batches():
            if tile_ids is None:
                per_sample = sum(v.nbytes for k, v in batch.feeds.items() if k in batch.per_sample) / max(batch.size, 1)
                count = config.correction_samples
                if per_sample > 0:
                    count = max(1, min(count, int(budget / 4 // per_sample)))
                tile_ids = _tile_ids(source.samples, count)
            limit = (rows_per_run or 1) if splittable else batch.size
            for feeds, first, size in _split(batch.feeds, batch.per_sample, batch.start, batch.size, limit):
                yield batch, feeds, first, size

    def run(item):
        nonlocal peak_run_bytes, rows_per_run
        _, feeds, _, size = item
        acts = probe.run(feeds)
        run_bytes = sum(a.nbytes for a in acts.values())
        peak_run_bytes = max(peak_run_bytes, run_bytes)
        if splittable and rows_per_run is None:  # two runs' activations plus working copies within budget / 4
            rows_per_run = max(1, int(budget / 4 // max(4 * run_bytes / size, 1)))
        return acts

    # ONNX Runtime computes the next run while this one's moments are added
    for (batch, feeds, first, size), acts in run_ahead(run, runs(), overlap):
        ids = np.arange(first, first + size, dtype=np.int64)
        tile_rows = np.flatnonzero(np.isin(ids, tile_ids))
        columns = gram_columns(size, source.samples, seen)
        for st in layers.values():
            x, y = acts[st.input_name], acts[st.output_name]
            st.inputs.add(x, rngs[st.name], columns)
            st.outputs.add(y, rngs[st.name], columns)
            if len(tile_rows):
                st.tiles.offer(rngs[st.name], st.geometry, x, y, tile_rows, ids[tile_rows])
        del acts
        if len(tile_rows):
            keep = tile_rows if splittable else np.arange(size)
            kept = {k: (np.ascontiguousarray(v[keep]) if splittable and k in batch.per_sample else v) for k, v in feeds.items()}
            cache.append(CachedChunk(kept, ids[keep]))
            cache_bytes += sum(v.nbytes for v in kept.values())
        seen += size
        if progress is not None:
            progress(seen, source.samples, "calibration statistics")
    if seen == 0:
        raise UsageError(f"the calibration data {source.describe} holds no samples (--calibration)")
    _cap_tiles(layers, budget / 4)
    memory = {
        "moments_mb": round(sum(st.inputs.nbytes + st.outputs.nbytes for st in layers.values()) / _MB, 2),
        "tiles_mb": round(sum(st.tiles.nbytes for st in layers.values()) / _MB, 2),
        "cache_mb": round(cache_bytes / _MB, 2),
        "run_mb": round(peak_run_bytes / _MB, 2),
        "budget_mb": config.memory_mb,
    }
    tile_notes = {st.name: f"no tiles from {st.tiles.skipped_shapes} runs whose output is smaller than a tile"
                  for st in layers.values() if st.tiles.skipped_shapes}
    return CalibrationData(layers, cache, seen, source.describe, time.perf_counter() - start, memory, notes, tile_notes)


def _tile_capacity(sites: list[ConvSite], tiles: int, budget: float) -> int:
    """Tiles per layer: ``tiles``, or fewer so that every layer's tiles together fit in ``budget``
    bytes (input window and output block in float32, at the analysed shapes)."""
    total = 0
    for site in sites:
        if not site.input_shape or not all(isinstance(d, int) and d > 0 for d in site.input_shape[2:]):
            continue
        tile = TileGeometry.of(site.geometry, tuple(site.input_shape[2:]))
        total += 4 * (site.in_per_group * site.geometry.group * math.prod(tile.window) + site.weight_shape[0] * tile.positions)
    if total == 0:
        return tiles
    return int(max(16, min(tiles, budget // total)))


def _cap_tiles(layers: dict[str, LayerStatistics], budget: float) -> None:
    """Keep the tiles of all layers within ``budget`` bytes: every layer's reservoir is cut to the
    same share of its tiles (the lowest priorities stay: still a uniform sample)."""
    total = sum(st.tiles.nbytes for st in layers.values())
    if total <= budget or total == 0:
        return
    share = budget / total
    for st in layers.values():
        t = st.tiles
        keep = max(1, int(math.floor(t.count * share)))
        if keep < t.count:
            order = np.sort(np.argsort(t.priority, kind="stable")[:keep])
            t.priority, t.samples, t.origins = t.priority[order], t.samples[order], t.origins[order]
            t.windows, t.targets = t.windows[order], t.targets[order]
