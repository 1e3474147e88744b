"""Load and analyse: the model normalised, its dynamic dims fixed, its Conv (and Gemm / MatMul) sites found.

The first stage of :mod:`onnxfactor.pipeline` (and of the iterative fine-tuning, which runs the
pipeline stage by stage): everything later stages need to know about the input model, computed
once. Nothing here changes the model beyond the loader's normalisation (and the batch-norm fold
when asked for).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from onnxfactor import io as model_io
from onnxfactor.analysis import ConvSite, SkippedNode, find_conv_sites, infer_shapes, name_unnamed_nodes, record_shapes
from onnxfactor.batchnorm import batchnorm_note, fold_batch_norms
from onnxfactor.config import CompressConfig
from onnxfactor.data.shapes import with_data_shapes
from onnxfactor.errors import NothingToCompress, UsageError
from onnxfactor.linear import LinearSite, find_linear_sites
from onnxfactor.ranks.policies import load_rank_file
from onnxfactor.speed import Candidate


@dataclass
class Prepared:
    """The loaded model and what the analysis found in it (:func:`prepare`)."""

    loaded: model_io.LoadedModel
    graph: gs.Graph
    sites: list[ConvSite]
    skipped: list[SkippedNode]
    input_shapes: dict
    shapes: dict
    run_error: Exception | None = None  # the model does not run at input_shapes (validation.dims)
    linear_sites: list[LinearSite] = dataclasses.field(default_factory=list)  # include_linear: Gemm / MatMul sites
    linear: list[Candidate] = dataclasses.field(default_factory=list)  # their chains, applied by every pipeline._build


def prepare(source, input_shapes: dict | None, include_linear: bool = False, data=(), fold_batchnorm: bool = False) -> Prepared:
    """Load and analyse ``source``; ``data`` (``(data, images, role)`` triples) may fix its dynamic dims
    (:func:`onnxfactor.data.shapes.with_data_shapes`); ``fold_batchnorm``: :mod:`onnxfactor.batchnorm`."""
    from onnxfactor.validation.dims import fit_dynamic_dims
    from onnxfactor.validation.inputs import resolve_input_shapes

    loaded = model_io.load_model(source)
    if fold_batchnorm:
        loaded.normalised.extend(batchnorm_note(fold_batch_norms(loaded.model)))
    input_shapes, note = with_data_shapes(loaded.model, input_shapes, data)
    loaded.normalised.extend([note] if note else [])
    resolved = resolve_input_shapes(loaded.model, input_shapes or {})
    runnable_model = runnable(loaded)
    run_error = None
    try:
        resolved, notes = fit_dynamic_dims(runnable_model, resolved, input_shapes)
        loaded.normalised.extend(notes)
    except UsageError as e:  # raised where a run at these shapes is needed
        run_error = e
    shapes = infer_shapes(loaded.model, resolved)
    graph = gs.import_onnx(loaded.model)
    name_unnamed_nodes(graph)
    sites, skipped = find_conv_sites(graph, shapes)
    linear, linear_skipped = find_linear_sites(graph, shapes) if include_linear else ([], [])
    skipped += linear_skipped
    unknown = [s for s in sites if s.graph_path == "" and (s.in_spatial is None or s.out_spatial is None)]
    unknown += [s for s in linear if s.graph_path == "" and not s.shapes_known]
    if unknown:
        names = [t for s in unknown for t in (s.node.inputs[0].name, s.node.outputs[0].name)]
        recorded = record_shapes(loaded.model, loaded.ir_version, resolved, names)
        for site in unknown:
            site.input_shape = recorded.get(site.node.inputs[0].name, site.input_shape)
            site.output_shape = recorded.get(site.node.outputs[0].name, site.output_shape)
    if not sites and not linear and not skipped:
        what = "Conv, Gemm or MatMul" if include_linear else "Conv"
        raise NothingToCompress(f"the model has no {what} node: nothing to compress")
    if not sites and not linear:
        listed = "; ".join(f"{s.graph_path}{s.name} ({s.op_type}): {s.reason}" for s in skipped[:3])
        more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        raise NothingToCompress(f"no Conv of the model can be decomposed, {len(skipped)} conv-like nodes are not candidates: {listed}{more}")
    return Prepared(loaded, graph, sites, skipped, resolved, shapes, run_error, linear)


def model_opset(prep: Prepared) -> int | None:
    """The model's default-domain opset (the micro models of the timings use it)."""
    return next((o.version for o in prep.loaded.model.opset_import if o.domain in ("", "ai.onnx")), None)


def load_explicit(config: CompressConfig, sites: list[ConvSite], linear: list[LinearSite] = ()) -> dict | None:
    if config.ranks.policy != "file":
        return None
    if config.ranks.rank_file is None:
        raise UsageError("rank policy 'file' needs a rank file (--rank-file ranks.json)")
    known = {s.name: (s.geometry.is_pointwise, s.out_per_group, s.in_per_group) for s in sites}
    known.update({s.name: (True, s.out_features, s.in_features) for s in linear})  # a matrix: {"rank": R}
    return load_rank_file(config.ranks.rank_file, known, method=config.method)


def runnable(loaded: model_io.LoadedModel) -> onnx.ModelProto:
    """The normalised model as ONNX Runtime runs it (IR < 4: initializers listed as inputs again)."""
    return loaded.model if loaded.ir_version >= 4 else model_io.restore_conventions(copy_model(loaded.model), loaded.ir_version)


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
