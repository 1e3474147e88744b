"""Load and normalise ONNX models; save them atomically.

Loading turns the three ways real files store Conv weights into one: an initializer that is not a
graph input.

* IR < 4 files list every initializer as a graph input too. There such an input is a weight, so it
  is dropped from ``graph.input`` (:func:`restore_conventions` lists it again at save time). From
  IR 4 on an input with an initializer is an overridable default, not a constant, and stays.
* ``Constant`` nodes (PaddleOCR exports, PyTorch exports of If branches) become initializers.
* ``ConstantOfShape`` fed by a constant shape (the ONNX "light" test models) becomes an
  initializer filled with its ``value``.

Folding is done in the main graph and in the subgraphs of If/Loop/Scan, each folded tensor landing
in the initializer list of the graph that held the node. Nothing else changes: node order, names,
metadata, opset imports, IR version and functions are kept; initializers left unused are the
rewrite stage's to clean up.

Saving writes to a temporary file next to the target (:func:`write_temporary`), where the caller checks
it, then renames it over the target (``os.replace``), so a failed run never leaves a partial or
unchecked model behind. The file is written one tensor at a time (:func:`_serialise`), never as one
serialised copy of the whole model.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import EncodeError
from onnx import AttributeProto, GraphProto, ModelProto, TensorProto, helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

try:
    from google.protobuf.unknown_fields import UnknownFieldSet
except ImportError:  # protobuf < 4.22
    UnknownFieldSet = None

from onnxfactor.errors import InputModelError, InternalError, OutputError

log = logging.getLogger(__name__)

# A ConstantOfShape whose output would not fit in one protobuf message (2 GiB) is left for the runtime.
_MAX_FOLDED_BYTES = 2**31 - 1
# Protobuf messages (and so ONNX files without external data) cannot exceed 2 GiB.
_MAX_PROTO_BYTES = 2**31 - 1
_DEFAULT_DOMAINS = ("", "ai.onnx")
# Where a TensorProto keeps its values when not in raw_data (string_data is never made external).
_TYPED_DATA_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")
# Types stored several elements to a byte: their raw data cannot be built by repeating one element.
_PACKED_TYPES = frozenset(
    getattr(TensorProto, name)
    for name in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
    if hasattr(TensorProto, name)
)
_NOT_ONNX_HINT = "is this an ONNX file?"


@dataclass
class LoadedModel:
    """A model ready for analysis: a normalised copy plus what is needed to save it like the source.

    ``model`` is never the caller's object. ``ir_version`` is the source's IR version, which decides
    :func:`restore_conventions` at save time. ``folded`` has one line per Constant/ConstantOfShape
    turned into an initializer, e.g. ``"Constant 'x' -> initializer"``.
    """

    model: ModelProto
    path: Path | None
    ir_version: int
    external_data: bool
    folded: list[str] = field(default_factory=list)
    #: one line per other normalisation, e.g. a graph output given the shape it was missing
    normalised: list[str] = field(default_factory=list)


def load_model(source: str | os.PathLike | ModelProto) -> LoadedModel:
    """Load an ONNX file (with its external data) or copy a ModelProto, check it, and normalise it.

    Raises :class:`InputModelError` when the file is missing, unreadable, not ONNX, truncated, has
    missing external data, or fails ``onnx.checker.check_model`` (basic check).
    """
    if isinstance(source, ModelProto):
        model = ModelProto()
        model.CopyFrom(source)
        path, external, label = None, False, "input model"
        _check_is_model(model, label)
        normalised = _declare_output_shapes(model)
        _check_input(model, label)
    else:
        path = Path(source)
        model, external, serialised = _read_model_file(path)
        label = f"input model {path}"
        del serialised
        _check_is_model(model, label)
        normalised = _declare_output_shapes(model)
        _check_input(model, label)

    ir_version = model.ir_version
    folded: list[str] = []
    _normalise_graph(
        model.graph,
        outer={},
        drop_weight_inputs=ir_version < 4,
        fold_here=True,
        fold_subgraphs=ir_version >= 4,
        scope="",
        folded=folded,
    )
    if folded:
        log.debug("%s: folded %d constants into initializers", label, len(folded))
    return LoadedModel(model=model, path=path, ir_version=ir_version, external_data=external, folded=folded, normalised=normalised)


def _declare_output_shapes(model: ModelProto) -> list[str]:
    """Give every tensor graph output without a shape the one shape inference (or, failing that, one
    ONNX Runtime run on random inputs) finds; returns a line per output changed.

    ONNX Runtime runs such models, but ``onnx.checker`` rejects them ("Field 'shape' of 'type' is
    required but missing") and so would refuse the written model. Unknown dims become ``dim_param``
    names (``<output>_dim<i>``). An output whose rank neither can tell is left as it is.
    """
    missing = [o for o in model.graph.output
               if o.type.WhichOneof("value") == "tensor_type" and not o.type.tensor_type.HasField("shape")]
    if not missing:
        return []
    from onnxfactor.analysis import infer_shapes, record_shapes

    shapes = infer_shapes(model, {})
    unknown = [o.name for o in missing if shapes.get(o.name) is None]
    if unknown:
        from onnxfactor.validation.inputs import resolve_input_shapes

        try:
            shapes.update(record_shapes(model, model.ir_version, resolve_input_shapes(model, {}), unknown))
        except Exception:  # noqa: BLE001 - e.g. an input of unknown rank: leave the output to the checker
            pass
    lines = []
    for output in missing:
        shape = shapes.get(output.name)
        if shape is None:
            continue
        dims = output.type.tensor_type.shape.dim
        for i, d in enumerate(shape):
            if isinstance(d, int) and d > 0 and output.name not in unknown:
                dims.add().dim_value = d
            else:  # a dim of one recorded run is no fixed dim of the model
                dims.add().dim_param = f"{output.name}_dim{i}"
        source = "shape inference" if output.name not in unknown else "one ONNX Runtime run (rank only)"
        lines.append(f"graph output {output.name!r} had no shape: declared {_shape_text(output)} from {source}")
    return lines


def _shape_text(value) -> str:
    dims = [str(d.dim_value) if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]
    return "[" + ", ".join(dims) + "]"


def restore_conventions(model: ModelProto, ir_version: int) -> ModelProto:
    """Undo the IR < 4 normalisation before saving: list every main-graph initializer as a graph input.

    IR < 4 requires each initializer to appear in ``graph.input``; :func:`load_model` removed those
    entries. The input gets the initializer's element type and shape. Modifies ``model`` in place
    and returns it; a no-op for ``ir_version >= 4``.
    """
    if ir_version >= 4:
        return model
    graph = model.graph
    listed = {value.name for value in graph.input}
    for init in graph.initializer:
        if init.name not in listed:
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
            listed.add(init.name)
    return model


def save_model_atomic(
    model: ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool = False,
    check: Callable[[Path], None] | None = None,
    size_threshold: int = 1024,
) -> Path:
    """Write ``model`` to ``path`` through a temporary file in the same directory, then rename it.

    ``check(tmp_path)`` runs on the written temporary model before the rename; if it raises, the
    temporary files are deleted and the exception propagates, leaving an existing target untouched.
    See :func:`write_temporary` (which this wraps) for external data and errors. Returns the final path.
    """
    with write_temporary(model, path, external_data=external_data, size_threshold=size_threshold) as written:
        if check is not None:
            check(written.path)
        return written.commit()


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file: same resolved path, or hard links / other spellings of one file."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(target: str | os.PathLike, what: str, *, protected: dict[str, str | os.PathLike] | None = None) -> None:
    """Raise :class:`OutputError` when ``target`` cannot or must not be written; cheap, so run it first.

    ``what`` names the file in the message ("output", "report"). ``protected`` maps a label to a path
    that ``target`` must not be (in any spelling, or as a hard link), e.g. ``{"input model": path}``.
    Checks that ``target`` is not a directory and that its directory exists, is a directory and is
    writable (``os.access``; root passes it whatever the permissions).
    """
    target = Path(target)
    for label, path in (protected or {}).items():
        if path is not None and _same_file(target, Path(path)):
            raise OutputError(f"{what} path {target} is the {label}; choose another {what} file")
    if target.is_dir():
        raise OutputError(f"{what} path {target} is a directory; give a file name")
    parent = target.absolute().parent
    if not parent.is_dir():
        if parent.exists():
            raise OutputError(f"{what} directory {parent} is not a directory (it is a file); choose another {what} path")
        raise OutputError(f"{what} directory does not exist: {parent}; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write the {what} to {parent}: permission denied")


def write_temporary(
    model: ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool = False,
    size_threshold: int = 1024,
) -> TemporaryModel:
    """Write ``model`` next to ``path`` under a temporary name; :meth:`TemporaryModel.commit` moves it into place.

    Use it as a context manager: whatever was not committed is deleted on exit, so a failed check
    leaves an existing target untouched and no file behind. Between writing and committing the
    caller may drop ``model`` (the written file does not need it), so that checks reading the file
    do not add their memory to the model's::

        with write_temporary(model, "out.onnx") as written:
            del model
            check(written.path)
            written.commit()

    With ``external_data=True``, or when the model is too large for one protobuf (2 GiB), tensors of at
    least ``size_threshold`` bytes go to ``<file name>.data`` next to the model (all in one file); the
    data file is moved into place first and the model file last. ``model`` itself is left unchanged.
    Keep ``size_threshold`` above the size of shape tensors: ONNX Runtime's shape inference cannot
    read a Reshape's shape from external data.

    Raises :class:`OutputError` when the target is a directory, its directory is missing or not
    writable, or writing fails.
    """
    target = Path(path)
    check_output_path(target, "output")

    mode = _file_mode(target)
    plan = None if external_data else _serialise(model)
    if plan is not None:
        return _write_inline(plan, target, mode)
    if not external_data:
        log.info("model is larger than 2 GiB: saving %s with external data", target)
    return _write_external_temporary(model, target, size_threshold, mode)


class TemporaryModel:
    """A model file written next to its target under a temporary name, not yet in place.

    ``path`` is the model file to check; ``data_path`` its external data file (None when inline).
    :meth:`commit` renames them (the data file first) over the target; :meth:`discard` (or leaving
    the ``with`` block) deletes whatever was not committed.
    """

    def __init__(self, path: Path, target: Path, *, data_path: Path | None = None, staging_dir: Path | None = None):
        self.path = path
        self.target = target
        self.data_path = data_path
        self._staging_dir = staging_dir
        self._committed = False

    def commit(self) -> Path:
        """Move the written file(s) over the target; returns the target."""
        with _output_errors(self.target):
            if self.data_path is not None:
                # Data first, model last: the model file appearing is what marks the output complete.
                os.replace(self.data_path, self.target.parent / self.data_path.name)
            os.replace(self.path, self.target)
        self._committed = True
        self.discard()
        return self.target

    def discard(self) -> None:
        """Delete the temporary file(s) that were not committed; safe to call more than once."""
        if self._staging_dir is not None:
            shutil.rmtree(self._staging_dir, ignore_errors=True)
        elif not self._committed:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> TemporaryModel:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


# --------------------------------------------------------------------------------------------------
# Loading


def _read_model_file(path: Path) -> tuple[ModelProto, bool, bytes]:
    """Parse ``path`` and load its external data: the model, whether it used external data, the file's bytes."""
    if not path.exists():
        raise InputModelError(f"input model not found: {path}")
    if path.is_dir():
        raise InputModelError(f"input model {path} is a directory, not an ONNX file")
    try:
        data = path.read_bytes()
    except PermissionError:
        raise InputModelError(f"cannot read input model {path}: permission denied") from None
    except OSError as e:
        raise InputModelError(f"cannot read input model {path}: {e.strerror or e}") from None
    if not data:
        raise InputModelError(f"input model {path} is empty (0 bytes); {_NOT_ONNX_HINT}")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:  # DecodeError, RuntimeWarning-as-error, ...: all mean "not a ModelProto"
        reason = _first_line(e) or type(e).__name__
        raise InputModelError(
            f"input model {path} is not a valid ONNX protobuf ({reason}); "
            "is this an ONNX file, and was it copied completely?"
        ) from None

    external = [t for t in _model_tensors(model) if uses_external_data(t)]
    if external:
        base_dir = path.parent
        for location in sorted({ExternalDataInfo(t).location for t in external}):
            if not (base_dir / location).is_file():
                raise InputModelError(
                    f"external data file of input model {path} not found: {base_dir / location}; "
                    "keep the .data file next to the .onnx file"
                )
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(base_dir))
        except (OSError, ValueError, onnx.checker.ValidationError) as e:
            raise InputModelError(f"cannot load external data of input model {path}: {_first_line(e)}") from None
    return model, bool(external), data


def _check_is_model(model: ModelProto, label: str) -> None:
    """Reject what parsed as protobuf but is not a model: garbage often decodes to an empty message."""
    if not model.opset_import or not model.HasField("graph") or model.ir_version <= 0:
        raise InputModelError(f"{label} has no graph, opset import or IR version; {_NOT_ONNX_HINT}")
    if not model.graph.node:
        raise InputModelError(f"{label} has an empty graph (no nodes); {_NOT_ONNX_HINT}")


#: Main-graph initializers above this many bytes are checked here and stand in the checker's copy
#: as 1-element placeholders (see _check_input).
_CHECK_INLINE_BYTES = 1 << 16


def _check_input(model: ModelProto, label: str) -> None:
    """Run the basic ONNX checker on the model's structure, and check its weights' sizes here.

    The checker works on a C++ copy of the model: given the real model it would hold a third copy
    of every weight (file bytes, Python model, C++ model) and set the peak memory of the whole run.
    The basic check does not relate initializer shapes to nodes, so each large main-graph
    initializer is replaced in the checker's copy by a 1-element tensor of the same name and type,
    after its data size has been checked against its declared shape here (the checker's rule).
    """
    skeleton = ModelProto()
    _copy_fields(model, skeleton, skip="graph")
    _copy_fields(model.graph, skeleton.graph, skip="initializer")
    for tensor in model.graph.initializer:
        if tensor.data_type not in _SIZE_CHECKED_TYPES or not _holds_large_data(tensor):
            skeleton.graph.initializer.append(tensor)
            continue
        _check_tensor_size(tensor, label)
        placeholder = skeleton.graph.initializer.add()
        placeholder.name = tensor.name
        placeholder.data_type = tensor.data_type
        placeholder.dims.append(1)
        placeholder.raw_data = bytes(_SIZE_CHECKED_TYPES[tensor.data_type])
    try:
        onnx.checker.check_model(skeleton)
    except (onnx.checker.ValidationError, ValueError) as e:
        raise InputModelError(f"{label} fails onnx.checker: {_first_line(e)}") from None


#: element sizes of the types whose data size _check_tensor_size verifies
_SIZE_CHECKED_TYPES = {
    TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2, TensorProto.DOUBLE: 8,
    TensorProto.INT8: 1, TensorProto.UINT8: 1, TensorProto.INT16: 2, TensorProto.UINT16: 2,
    TensorProto.INT32: 4, TensorProto.UINT32: 4, TensorProto.INT64: 8, TensorProto.UINT64: 8, TensorProto.BOOL: 1,
}


def _copy_fields(src, dst, *, skip: str = "", numbers: Callable[[int], bool] = lambda number: True) -> None:
    """Copy every set field of protobuf message ``src`` into ``dst`` except the field ``skip``.

    ``numbers`` restricts the copy to the fields whose field number it accepts. Fields are
    visited through the descriptor, not ``ListFields()``, which would read (copy) ``skip`` too:
    a tensor's ``raw_data`` is then copied whole just to be left out.
    """
    for descriptor in src.DESCRIPTOR.fields:
        if descriptor.name == skip or not numbers(descriptor.number):
            continue
        # protobuf >= 6 has ``is_repeated``; older versions only ``label``
        repeated = descriptor.is_repeated if hasattr(descriptor, "is_repeated") else descriptor.label == descriptor.LABEL_REPEATED
        if repeated:
            values = getattr(src, descriptor.name)
            if values:
                getattr(dst, descriptor.name).extend(values)
        elif not src.HasField(descriptor.name):
            continue
        elif descriptor.message_type is not None:
            getattr(dst, descriptor.name).CopyFrom(getattr(src, descriptor.name))
        else:
            setattr(dst, descriptor.name, getattr(src, descriptor.name))


def _holds_large_data(tensor: TensorProto) -> bool:
    """Whether a tensor of a size-checked type declares or holds more than ``_CHECK_INLINE_BYTES`` here.

    Not ``ByteSize()``: upb computes it by serialising the tensor (twice the tensor's size, and
    as slow). The stored data is measured only for tensors that declare a small shape, where it is
    small unless the file is damaged. Tensors in external data are small here.
    """
    if tensor.data_location == TensorProto.EXTERNAL:
        return False
    if math.prod(tensor.dims) * _SIZE_CHECKED_TYPES[tensor.data_type] > _CHECK_INLINE_BYTES:
        return True
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data) > _CHECK_INLINE_BYTES
    return max(len(getattr(tensor, name)) for name in _TYPED_DATA_FIELDS) * 8 > _CHECK_INLINE_BYTES  # <= 8 bytes a value


def _check_tensor_size(tensor: TensorProto, label: str) -> None:
    """The checker's data-size rule for one large tensor: its data must fill its declared shape."""
    count = math.prod(tensor.dims)
    if tensor.HasField("raw_data"):
        have, expected = len(tensor.raw_data), count * _SIZE_CHECKED_TYPES[tensor.data_type]
    else:
        fields = (tensor.float_data, tensor.int32_data, tensor.int64_data, tensor.double_data, tensor.uint64_data)
        have, expected = max(len(f) for f in fields), count
    if have != expected:
        raise InputModelError(
            f"{label} fails onnx.checker: initializer {tensor.name!r} holds {have} values/bytes but its shape "
            f"{list(tensor.dims)} needs {expected}; was the file copied completely?"
        )


def _normalise_graph(
    graph: GraphProto,
    *,
    outer: dict[str, TensorProto],
    drop_weight_inputs: bool,
    fold_here: bool,
    fold_subgraphs: bool,
    scope: str,
    folded: list[str],
) -> None:
    """Normalise ``graph`` in place, then its subgraphs.

    ``outer`` maps the constant tensors visible from enclosing graphs (a ConstantOfShape may read its
    shape from there). Subgraphs of IR < 4 models are not folded: IR < 4 would require their new
    initializers to be subgraph inputs, which If/Loop/Scan bodies cannot take.
    """
    if drop_weight_inputs:
        init_names = {init.name for init in graph.initializer}
        weights = [value for value in graph.input if value.name in init_names]
        for value in weights:
            graph.input.remove(value)

    input_names = {value.name for value in graph.input}
    # An initializer that is also an input can be overridden at run time (IR >= 4): not a constant.
    constants = dict(outer)
    constants.update((init.name, init) for init in graph.initializer if init.name not in input_names)

    if fold_here:
        output_names = {value.name for value in graph.output}
        taken = {init.name for init in graph.initializer} | input_names
        drop: set[int] = set()
        for index, node in enumerate(graph.node):
            if node.domain not in _DEFAULT_DOMAINS or len(node.output) != 1:
                continue
            name = node.output[0]
            if not name or name in output_names or name in taken:
                continue
            if node.op_type == "Constant":
                source = _constant_tensor(node)
                what = "Constant"
            elif node.op_type == "ConstantOfShape" and len(node.input) == 1 and node.input[0] in constants:
                source = _constant_of_shape_tensor(node, constants[node.input[0]])
                what = "ConstantOfShape"
            else:
                continue
            if source is None:
                continue
            # Build the initializer in place: appending a finished TensorProto would copy it once more,
            # which for the 240 MB of AlexNet's weights costs more than everything else together.
            init = graph.initializer.add()
            if isinstance(source, TensorProto):
                init.CopyFrom(source)
            else:
                init.data_type, dims, raw = source
                init.dims.extend(dims)
                init.raw_data = raw
            init.name = name
            constants[name] = init
            taken.add(name)
            drop.add(index)
            folded.append(f"{what} {name!r}{scope} -> initializer")
        if drop:
            kept = [node for index, node in enumerate(graph.node) if index not in drop]
            del graph.node[:]
            graph.node.extend(kept)

    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                subgraphs = [attr.g]
            elif attr.type == AttributeProto.GRAPHS:
                subgraphs = list(attr.graphs)
            else:
                continue
            for sub in subgraphs:
                _normalise_graph(
                    sub,
                    outer=constants,
                    drop_weight_inputs=False,
                    fold_here=fold_subgraphs,
                    fold_subgraphs=fold_subgraphs,
                    scope=f" (in {node.op_type} {node.name!r}.{attr.name})",
                    folded=folded,
                )


def _constant_tensor(node: onnx.NodeProto) -> TensorProto | None:
    """The tensor of a Constant node (not copied), or None for forms left as nodes (sparse, strings)."""
    for attr in node.attribute:
        if attr.ref_attr_name:
            return None
        if attr.name == "value" and attr.type == AttributeProto.TENSOR:
            return attr.t  # copied as it is by the caller: no numpy round trip for big weights
        if attr.name == "value_float":
            return numpy_helper.from_array(np.array(attr.f, dtype=np.float32))
        if attr.name == "value_floats":
            return numpy_helper.from_array(np.array(attr.floats, dtype=np.float32))
        if attr.name == "value_int":
            return numpy_helper.from_array(np.array(attr.i, dtype=np.int64))
        if attr.name == "value_ints":
            return numpy_helper.from_array(np.array(attr.ints, dtype=np.int64))
    return None


def _constant_of_shape_tensor(
    node: onnx.NodeProto, shape_tensor: TensorProto
) -> TensorProto | tuple[int, tuple[int, ...], bytes] | None:
    """ConstantOfShape's output for a constant shape, as ``(data_type, dims, raw_data)`` or a TensorProto.

    None when it cannot be folded (bad shape, string value) or would not fit in a protobuf.
    """
    try:
        shape = numpy_helper.to_array(shape_tensor)
        if shape.ndim != 1 or shape.dtype != np.int64 or (shape < 0).any():
            return None
        value = np.zeros(1, dtype=np.float32)  # the operator's default
        for attr in node.attribute:
            if attr.name == "value" and attr.type == AttributeProto.TENSOR:
                value = numpy_helper.to_array(attr.t).reshape(-1)
        if value.size != 1 or value.dtype.kind in "OSU":
            return None
        dims = tuple(int(d) for d in shape)
        count = math.prod(dims)
        if count * value.dtype.itemsize > _MAX_FOLDED_BYTES:
            return None
        element = numpy_helper.from_array(value.reshape(()))
        if element.data_type in _PACKED_TYPES or not element.HasField("raw_data"):
            return numpy_helper.from_array(np.full(dims, value[0], dtype=value.dtype))
        # Repeating the element's bytes is one allocation, where np.full + from_array make three.
        return element.data_type, dims, element.raw_data * count
    except (ValueError, TypeError, KeyError, OverflowError):
        return None


def _model_tensors(model: ModelProto) -> Iterator[TensorProto]:
    """Every initializer and tensor attribute of the main graph and its subgraphs (as onnx's external data does)."""
    yield from _graph_tensors(model.graph)


def _graph_tensors(graph: GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == AttributeProto.GRAPH:
                yield from _graph_tensors(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graph_tensors(sub)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0].strip() if text else ""


# --------------------------------------------------------------------------------------------------
# Saving


#: Field numbers of the messages _serialise cuts apart (onnx.proto).
_GRAPH_FIELD = ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER_FIELD = GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_RAW_DATA_FIELD = TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number


@dataclass
class _TensorBytes:
    """Bytes of one tensor in a serialisation plan, taken from the tensor only when written.

    Its ``raw_data``, or with ``whole`` the serialised tensor (values in typed fields, unknown fields).
    """

    tensor: TensorProto
    length: int
    whole: bool = False

    def read(self) -> bytes:
        data = self.tensor.SerializeToString() if self.whole else self.tensor.raw_data
        if len(data) != self.length:
            if self.whole:
                raise InternalError(f"tensor {self.tensor.name!r} changed while the model was being written")
            raise OutputError(
                f"cannot write tensor {self.tensor.name!r}: it holds {len(data)} bytes but its shape "
                f"{list(self.tensor.dims)} needs {self.length}"
            )
        return data


@dataclass
class _Serialisation:
    """The bytes of ``model.SerializeToString()`` as pieces: serialised parts and tensors' bytes.

    ``size`` is the total length; :meth:`write_to` writes the pieces in order.
    """

    pieces: list[bytes | _TensorBytes]
    size: int

    def write_to(self, file) -> None:
        for piece in self.pieces:
            # One tensor's bytes are alive at a time.
            file.write(piece.read() if isinstance(piece, _TensorBytes) else piece)


def _serialise(model: ModelProto) -> _Serialisation | None:
    """Plan writing ``model`` as its exact ``SerializeToString()`` bytes, holding one tensor's bytes at a time.

    upb serialises a message into a buffer of its own and copies that into a bytes object: twice
    the model's size on top of the model (VGG-19: 1 GB more than its 575 MB). Protobuf writes the
    fields of a message in field-number order, with each embedded message as tag, length, content.
    So the model is cut into: its fields before ``graph``, the graph's tag and length, the graph's
    fields before ``initializer``, each initializer (its fields before ``raw_data``, the raw bytes,
    the rest), the graph's remaining fields and the model's. Only the tensors are large: each is read
    (``raw_data``, or the tensor serialised when its values are in typed fields) while writing.
    A model or graph with unknown fields (a field copy would lose them) is serialised at once.

    Returns None when the model is too large for one protobuf (2 GiB).
    """
    graph = model.graph
    if _has_unknown_fields(model) or _has_unknown_fields(graph):
        data = _serialise_at_once(model)
        return None if data is None else _Serialisation([data], len(data))
    model_head, model_tail = _split_around(model, _GRAPH_FIELD)
    graph_head, graph_tail = _split_around(graph, _INITIALIZER_FIELD)
    entries: list[bytes | _TensorBytes] = []
    for tensor in graph.initializer:
        if tensor.HasField("raw_data") and not _has_unknown_fields(tensor):
            head, tail = _split_around(tensor, _RAW_DATA_FIELD)
            raw = _TensorBytes(tensor, _raw_data_length(tensor))
            content = [head, _tag(_RAW_DATA_FIELD), _varint(raw.length), raw, tail]
        else:
            content = [_TensorBytes(tensor, len(tensor.SerializeToString()), whole=True)]
        entries += [_tag(_INITIALIZER_FIELD), _varint(_length(content)), *content]
    graph_pieces = [graph_head, *entries, graph_tail]
    pieces = [model_head, _tag(_GRAPH_FIELD), _varint(_length(graph_pieces)), *graph_pieces, model_tail]
    size = _length(pieces)
    if size > _MAX_PROTO_BYTES:
        return None
    return _Serialisation([piece for piece in pieces if not isinstance(piece, bytes) or piece], size)  # no empty writes


def _raw_data_length(tensor: TensorProto) -> int:
    """The length of ``tensor.raw_data``: from its shape when that is large, else measured.

    Measuring is a copy of the data (upb has no other way to it), as slow as writing it. A large
    tensor whose data does not fill its shape fails when written (:meth:`_TensorBytes.read`):
    :func:`load_model` rejects such tensors, so only a model built elsewhere can have one.
    """
    itemsize = _SIZE_CHECKED_TYPES.get(tensor.data_type)
    if itemsize is not None:
        declared = math.prod(tensor.dims) * itemsize
        if declared > _CHECK_INLINE_BYTES:
            return declared
    return len(tensor.raw_data)


def _serialise_at_once(model: ModelProto) -> bytes | None:
    """``model.SerializeToString()``, or None when the model is too large for one protobuf (2 GiB)."""
    try:
        return model.SerializeToString()
    except (EncodeError, ValueError):  # upb raises EncodeError, older backends ValueError
        return None


def _split_around(message, number: int) -> tuple[bytes, bytes]:
    """The serialised fields of ``message`` numbered below ``number``, and those above it."""
    head, tail = type(message)(), type(message)()
    _copy_fields(message, head, numbers=lambda n: n < number)
    _copy_fields(message, tail, numbers=lambda n: n > number)
    return head.SerializeToString(), tail.SerializeToString()


def _has_unknown_fields(message) -> bool:
    """Whether ``message`` holds fields this onnx version does not know (kept by protobuf, lost by a field copy)."""
    if UnknownFieldSet is None:  # protobuf < 4.22 cannot tell: assume there are
        return True
    return len(UnknownFieldSet(message)) > 0


def _tag(number: int) -> bytes:
    """The tag of a length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length(pieces: list[bytes | _TensorBytes]) -> int:
    return sum(piece.length if isinstance(piece, _TensorBytes) else len(piece) for piece in pieces)


def _file_mode(target: Path) -> int:
    """Permissions for the new file: the old target's, else what ``open()`` would give (0666 & ~umask).

    mkstemp creates files 0600, which would make every output private to its writer.
    """
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


@contextmanager
def _output_errors(target: Path) -> Iterator[None]:
    """Turn an OS error while writing (disk full, read-only file system) into an OutputError."""
    try:
        yield
    except OSError as e:
        raise OutputError(f"cannot write {target}: {e.strerror or e}") from e


def _write_inline(plan: _Serialisation, target: Path, mode: int) -> TemporaryModel:
    with _output_errors(target):
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    written = TemporaryModel(Path(tmp_name), target)
    try:
        with _output_errors(target):
            with os.fdopen(fd, "wb") as f:
                plan.write_to(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(written.path, mode)
    except BaseException:
        written.discard()
        raise
    return written


def _write_external_temporary(model: ModelProto, target: Path, size_threshold: int, mode: int) -> TemporaryModel:
    """Save with tensors in ``<name>.data``, staged in a temporary directory next to the target."""
    location = target.name + ".data"
    with _output_errors(target):
        tmp_dir = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    written = TemporaryModel(tmp_dir / target.name, target, data_path=tmp_dir / location, staging_dir=tmp_dir)
    try:
        with _output_errors(target):
            _write_external(model, written.path, written.data_path, location, size_threshold)
            for path in (written.path, written.data_path):
                os.chmod(path, mode)
    except BaseException:
        written.discard()
        raise
    return written


def _write_external(model: ModelProto, model_path: Path, data_path: Path, location: str, size_threshold: int) -> None:
    """Write ``model`` to ``model_path`` with its large tensors in ``data_path``, leaving ``model`` unchanged.

    ``onnx.save_model(save_as_external_data=True)`` would strip the data out of the caller's model,
    skips tensors stored in typed fields (``float_data``: PaddlePaddle exports) and refuses a location
    that exists relative to the current directory. Here each large tensor is streamed to the data file
    and cleared, the model is serialised, and the tensors are put back: ``raw_data`` ones are read back
    from the file, so memory stays near one model plus one tensor even for models over 2 GiB.
    """
    # Per moved tensor: (tensor, offset, length, had data_location) to read back, or (tensor, copy).
    restore: list[tuple[TensorProto, int, int, bool] | tuple[TensorProto, TensorProto]] = []
    try:
        with open(data_path, "wb") as data_file:
            for tensor in _model_tensors(model):
                if uses_external_data(tensor) or tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
                    continue
                typed = not tensor.HasField("raw_data")
                # External data is always raw little-endian bytes, whatever field held the values.
                raw = numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data if typed else tensor.raw_data
                if len(raw) < size_threshold:
                    continue
                if typed:
                    original = TensorProto()
                    original.CopyFrom(tensor)
                    restore.append((tensor, original))
                else:
                    restore.append((tensor, data_file.tell(), len(raw), tensor.HasField("data_location")))
                offset = data_file.tell()
                data_file.write(raw)
                for name in _TYPED_DATA_FIELDS:
                    tensor.ClearField(name)
                tensor.ClearField("raw_data")
                _point_to_file(tensor, location, offset, len(raw))
                del raw
            data_file.flush()
            os.fsync(data_file.fileno())
        with open(model_path, "wb") as model_file:
            model_file.write(model.SerializeToString())
            model_file.flush()
            os.fsync(model_file.fileno())
    finally:
        _put_back(restore, data_path)


def _put_back(restore: list, data_path: Path) -> None:
    """Undo :func:`_write_external` on the caller's model: the values return to the fields they came from."""
    if not restore:
        return
    with open(data_path, "rb") as data_file:
        for entry in restore:
            if len(entry) == 2:
                tensor, original = entry
                tensor.CopyFrom(original)
                continue
            tensor, offset, length, had_location = entry
            if not uses_external_data(tensor):  # the write of this tensor failed before it was moved
                continue
            data_file.seek(offset)
            tensor.raw_data = data_file.read(length)
            del tensor.external_data[:]
            if had_location:
                tensor.data_location = TensorProto.DEFAULT
            else:
                tensor.ClearField("data_location")


def _point_to_file(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    """Mark ``tensor`` as stored at ``offset`` in ``location`` (the ONNX external data fields)."""
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)


def model_file_bytes(path: Path, external_data: bool) -> int:
    """Size of a model file plus, for external-data models, the data files it references."""
    if not external_data:
        return path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    locations = set()
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).exists())


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Once the compressed model is written and dropped, the model (the largest object of the run)
    has been freed, but glibc keeps its pages, so the checks and ONNX Runtime sessions that follow
    would raise the peak RSS by their own size on top of it (see tools/bench_compress.py).
    """
    import gc

    gc.collect()  # the graphsurgeon graph is full of reference cycles and pins the original protobuf
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
