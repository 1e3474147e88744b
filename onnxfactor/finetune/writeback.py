"""Trained values go back into the compressed ONNX model by initializer name, nothing else changes.

No re-export: node names, opset, IR version, metadata, graph structure and every initializer that
was not trained stay exactly as they were (tested byte for byte). Each trained tensor keeps its
name, dtype (fp16 weights are trained in float32 and written back in fp16) and shape.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def write_back(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> list[str]:
    """Overwrite the main-graph initializers named in ``values`` in place; returns the names written.

    Raises ValueError for a name that is not an initializer or a shape that does not match.
    """
    index = {t.name: t for t in model.graph.initializer}
    missing = sorted(set(values) - set(index))
    if missing:
        raise ValueError(f"not initializers of the model: {', '.join(missing[:5])}")
    written = []
    for name, array in values.items():
        tensor = index[name]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        array = np.asarray(array)
        if tuple(array.shape) != tuple(tensor.dims):
            raise ValueError(f"initializer {name!r} has shape {list(tensor.dims)}, the trained value {list(array.shape)}")
        tensor.CopyFrom(numpy_helper.from_array(array.astype(dtype), name))
        written.append(name)
    return written
