"""Where candidates are evaluated: in this process, a local process pool, or Ray tasks; with a disk cache.

``jobs`` workers each run ONNX Runtime with ``cores // jobs`` threads (at least 1), so the pool
never oversubscribes the machine. The pool uses the ``spawn`` start method (ONNX Runtime and
torch do not survive ``fork`` reliably). With ``ray_address`` (``auto``, ``ray://host:port`` or
``local`` to start a private local instance) each evaluation is a Ray task with ``num_cpus=1``;
Ray is imported only then (``[ray]`` extra). Results come back in the order of the specs, so the
three executors return the same list for the same specs (latency figures aside: they are measured).

The cache (``--cache DIR``) stores one JSON file per candidate, named by
:func:`onnxfactor.search.evaluate.spec_key` (the spec plus the model's, data's and options'
content hashes): an interrupted search resumes, and a rerun with other constraints reuses every
candidate already measured.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from onnxfactor.errors import UsageError
from onnxfactor.search.evaluate import Context, evaluate, spec_key


def default_jobs() -> int:
    """What the cores allow (``os.sched_getaffinity``), at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


class Cache:
    """One JSON file per evaluated candidate (or nothing, without a folder)."""

    def __init__(self, folder: Path | None):
        self.folder = Path(folder) if folder is not None else None
        self.hits = 0
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> dict | None:
        if self.folder is None:
            return None
        path = self.folder / f"{key}.json"
        if not path.is_file():
            return None
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # a torn write of an interrupted run: evaluate again
        self.hits += 1
        return result

    def put(self, key: str, result: dict) -> None:
        if self.folder is None:
            return
        tmp = self.folder / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(result, default=str))
        os.replace(tmp, self.folder / f"{key}.json")


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--ray-address needs Ray: pip install 'onnxfactor[ray]'") from None
    return ray


class Executor:
    """Evaluates lists of specs (``run``), serially, in a pool (``jobs > 1``) or on Ray."""

    def __init__(self, ctx: Context, *, jobs: int = 1, ray_address: str | None = None, cache: Cache | None = None):
        if jobs < 1:
            raise UsageError(f"--jobs must be >= 1, got {jobs}")
        self.ctx, self.jobs, self.ray_address = ctx, jobs, ray_address
        self.cache = cache or Cache(None)
        self._pool = self._ray = self._remote = None
        self.evaluated = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _worker_context(self) -> Context:
        import dataclasses

        threads = self.ctx.threads if self.ctx.threads is not None else max(1, default_jobs() // max(self.jobs, 1))
        return dataclasses.replace(self.ctx, threads=threads)

    def run(self, specs: list[dict]) -> list[dict]:
        """Results in the order of ``specs`` (cached ones are not evaluated again)."""
        keys = [spec_key(s, self.ctx) for s in specs]
        results: list[dict | None] = [self.cache.get(k) for k in keys]
        todo = [i for i, r in enumerate(results) if r is None]
        if todo:
            fresh = self._evaluate([specs[i] for i in todo])
            for i, r in zip(todo, fresh):
                r["key"] = keys[i]
                self.cache.put(keys[i], r)
                results[i] = r
            self.evaluated += len(todo)
        for i, r in enumerate(results):
            r.setdefault("key", keys[i])
            r["cached"] = i not in todo
        return results

    def _evaluate(self, specs: list[dict]) -> list[dict]:
        ctx = self._worker_context()
        if self.ray_address is not None:
            return self._evaluate_ray(specs, ctx)
        if self.jobs == 1 or len(specs) == 1:
            return [evaluate(s, ctx) for s in specs]
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(max_workers=self.jobs, mp_context=multiprocessing.get_context("spawn"))
        return list(self._pool.map(evaluate, specs, [ctx] * len(specs)))

    def _evaluate_ray(self, specs: list[dict], ctx: Context) -> list[dict]:
        ray = _import_ray()
        if not ray.is_initialized():
            if self.ray_address == "local":
                ray.init(num_cpus=self.jobs, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=self.ray_address, log_to_driver=False)
        if self._remote is None:
            self._remote = ray.remote(num_cpus=1)(evaluate)
        return ray.get([self._remote.remote(s, ctx) for s in specs])
