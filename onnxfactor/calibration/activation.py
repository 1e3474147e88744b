"""The elementwise activation that follows a Conv, in numpy and in torch.

The layer-wise reconstruction (:mod:`onnxfactor.calibration.reconstruct`) matches a chain's
output *after* its activation, since that is what the next layer sees: a negative error that a
Relu clips away costs nothing. Recognised: ``Relu``, ``LeakyRelu``, ``Clip`` (constant bounds),
``Sigmoid``, ``HardSigmoid``, ``Tanh``, ``HardSwish`` as the Conv output's only consumer, and the
SiLU pattern of YOLO exports, ``Mul(y, Sigmoid(y))`` (the output's only two consumers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

_ELEMENTWISE = ("Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "Tanh", "HardSwish")


@dataclass(frozen=True)
class Activation:
    """An activation ``op`` with its parameters (``alpha``, ``beta``, ``min``, ``max``)."""

    op: str
    params: dict = field(default_factory=dict)

    def numpy(self, y: np.ndarray) -> np.ndarray:
        p = self.params
        if self.op == "Relu":
            return np.maximum(y, 0)
        if self.op == "LeakyRelu":
            return np.where(y >= 0, y, p.get("alpha", 0.01) * y)
        if self.op == "Clip":
            return np.clip(y, p.get("min", -np.inf), p.get("max", np.inf))
        if self.op == "Sigmoid":
            return 1.0 / (1.0 + np.exp(-y))
        if self.op == "HardSigmoid":
            return np.clip(p.get("alpha", 0.2) * y + p.get("beta", 0.5), 0, 1)
        if self.op == "Tanh":
            return np.tanh(y)
        if self.op == "HardSwish":
            return y * np.clip(y / 6 + 0.5, 0, 1)
        if self.op == "SiLU":
            return y / (1.0 + np.exp(-y))
        raise ValueError(f"unknown activation {self.op!r}")

    def torch(self, y):
        import torch

        p = self.params
        if self.op == "Relu":
            return torch.relu(y)
        if self.op == "LeakyRelu":
            return torch.nn.functional.leaky_relu(y, p.get("alpha", 0.01))
        if self.op == "Clip":
            return torch.clamp(y, p.get("min"), p.get("max"))
        if self.op == "Sigmoid":
            return torch.sigmoid(y)
        if self.op == "HardSigmoid":
            return torch.clamp(p.get("alpha", 0.2) * y + p.get("beta", 0.5), 0, 1)
        if self.op == "Tanh":
            return torch.tanh(y)
        if self.op == "HardSwish":
            return y * torch.clamp(y / 6 + 0.5, 0, 1)
        if self.op == "SiLU":
            return torch.nn.functional.silu(y)
        raise ValueError(f"unknown activation {self.op!r}")


def _scalar(tensor) -> float | None:
    if tensor is None or not tensor.name:
        return None
    if not isinstance(tensor, gs.Constant):
        raise _NotConstant
    lazy = tensor._values
    values = lazy.load() if isinstance(lazy, gs.ir.tensor.LazyValues) else np.asarray(tensor.values)
    return float(np.asarray(values).reshape(-1)[0])


class _NotConstant(Exception):
    pass


def following_activation(node: gs.Node, graph: gs.Graph) -> Activation | None:
    """The activation applied to ``node``'s output, or None (several consumers, a graph output, other ops)."""
    out = node.outputs[0]
    if any(o is out for o in graph.outputs):
        return None
    consumers = list(out.outputs)
    default = [c for c in consumers if (c.domain or "") in ("", "ai.onnx")]
    if len(default) != len(consumers):
        return None
    if len(consumers) == 1 and consumers[0].op in _ELEMENTWISE and consumers[0].inputs[0] is out:
        c = consumers[0]
        params = {k: float(v) for k, v in c.attrs.items() if k in ("alpha", "beta", "min", "max")}
        if c.op == "Clip":
            try:
                for index, key in ((1, "min"), (2, "max")):
                    value = _scalar(c.inputs[index]) if len(c.inputs) > index else None
                    if value is not None:
                        params[key] = value
            except _NotConstant:
                return None
        return Activation(c.op, params)
    if len(consumers) == 2:
        ops = {c.op: c for c in consumers}
        if set(ops) == {"Sigmoid", "Mul"}:
            sig, mul = ops["Sigmoid"], ops["Mul"]
            if sig.outputs[0] in mul.inputs and out in mul.inputs and len(sig.outputs[0].outputs) == 1:
                return Activation("SiLU")
    return None
