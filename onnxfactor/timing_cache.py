"""A timing cache (``--timing-cache FILE``, TensorRT's convention): measured selection, reproducible.

Timings on a shared machine are noisy, so two runs of the measured selection can keep different
layers and write different models. :class:`CachedTimer` wraps a :class:`~onnxfactor.latency.Timer`
and stores every pair it times in a JSON file, keyed by

* the *structure* of both models -- every node's op type, domain and attributes, the shapes and
  dtypes of its constant inputs and of the graph's inputs -- but not the weights' values, which
  do not change the time (so a Conv and its chain are found again whatever the ranks' factors);
* the shapes and dtypes of the feeds;
* the execution providers and the thread count;
* a machine fingerprint: CPU model, core count, architecture, ONNX Runtime version.

A run with a warm cache makes the same choices without timing anything, so it writes a
byte-identical model (everything else in the pipeline is deterministic). Entries of another
machine or provider never match. The file is rewritten atomically after every new measurement.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import onnx

from onnxfactor.errors import UsageError
from onnxfactor.latency import PairTiming
from onnxfactor.validation.compare import LatencyStats

VERSION = 1


def machine_fingerprint() -> str:
    """CPU model, logical cores, architecture and ONNX Runtime version, as one string."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except ImportError:
        ort = "none"
    return f"{cpu}|{os.cpu_count()}|{platform.machine()}|ort {ort}"


def _graph_fingerprint(graph: onnx.GraphProto, digest) -> None:
    constants = {t.name: (tuple(t.dims), t.data_type) for t in graph.initializer}
    for value in graph.input:
        digest.update(f"in:{value.type.SerializeToString().hex()};".encode())
    for node in graph.node:
        digest.update(f"{node.domain}:{node.op_type}(".encode())
        for name in node.input:
            digest.update(repr(constants.get(name, "x" if name else "")).encode())
        for attr in sorted(node.attribute, key=lambda a: a.name):
            if attr.type == onnx.AttributeProto.GRAPH:
                _graph_fingerprint(attr.g, digest)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _graph_fingerprint(sub, digest)
            else:
                digest.update(attr.SerializeToString())
        digest.update(f"){len(node.output)};".encode())


def model_fingerprint(model: onnx.ModelProto) -> str:
    """SHA-256 of a model's structure (see the module docstring), without its weights' values."""
    digest = hashlib.sha256()
    for opset in model.opset_import:
        digest.update(f"{opset.domain}={opset.version};".encode())
    _graph_fingerprint(model.graph, digest)
    return digest.hexdigest()


def _stats(d: dict) -> LatencyStats:
    return LatencyStats(median_ms=d["median_ms"], p10_ms=d["p10_ms"], p90_ms=d["p90_ms"], runs=d["runs"])


class CachedTimer:
    """A :class:`~onnxfactor.latency.Timer` that answers from ``path`` when it can and times with ``inner`` otherwise.

    ``context`` (providers, threads) is part of every key. ``hits`` / ``misses`` count the answers.
    """

    def __init__(self, inner, path: str | os.PathLike, *, context: str = ""):
        self.inner = inner
        self.path = Path(path)
        self.context = f"{context}|{machine_fingerprint()}"
        self.hits = self.misses = 0
        self.entries: dict[str, dict] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise UsageError(f"timing cache {self.path} is not readable JSON ({e}); delete it or choose another --timing-cache") from None
            if not isinstance(data, dict) or data.get("version") != VERSION:
                raise UsageError(f"timing cache {self.path} is not an onnxfactor timing cache (version {VERSION}); "
                                 f"delete it or choose another --timing-cache")
            self.entries = data.get("entries", {})
        elif not self.path.parent.is_dir():
            raise UsageError(f"timing cache directory does not exist: {self.path.parent} (--timing-cache)")

    def key(self, a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> str:
        shapes = ";".join(f"{k}:{v.dtype}:{v.shape}" for k, v in sorted(feeds.items()))
        text = f"{model_fingerprint(a)}|{model_fingerprint(b)}|{shapes}|{self.context}"
        return hashlib.sha256(text.encode()).hexdigest()

    def time_pair(self, a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> PairTiming:
        key = self.key(a, b, feeds)
        entry = self.entries.get(key)
        if entry is not None:
            self.hits += 1
            return PairTiming(_stats(entry["a"]), _stats(entry["b"]), entry["converged"])
        self.misses += 1
        pair = self.inner.time_pair(a, b, feeds)
        self.entries[key] = {"a": pair.a.__dict__, "b": pair.b.__dict__, "converged": pair.converged}
        self._save()
        return pair

    def _save(self) -> None:
        data = json.dumps({"version": VERSION, "machine": machine_fingerprint(), "entries": self.entries}, indent=0)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(data)
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "hits": self.hits, "misses": self.misses}


def cached_timer(inner, path: str | os.PathLike | None, providers: list[str], threads: int | None):
    """``inner`` answering from the timing cache ``path`` when given (else ``inner`` itself), keyed by
    ``providers`` and ``threads``: ``compress --timing-cache`` and ``search --timing-cache`` share entries."""
    return inner if path is None else CachedTimer(inner, path, context=f"{providers}|threads={threads}")
