"""Layer-wise reconstruction with PyTorch: a few hundred Adam steps per chain on all its factors.

After the least-squares correction of the last conv (:mod:`onnxfactor.calibration.correct`),
every factor of a chain -- the first 1x1, the core or depthwise convs, the last 1x1 and its bias
-- is trained to minimise

    mean (act(chain(x_hat)) - act(y))^2 / mean act(y)^2

on the layer's input tiles ``x_hat`` from the already compressed network, against the original
model's output ``y`` at the same positions, ``act`` being the activation that follows the Conv
(:mod:`onnxfactor.calibration.activation`; identity if none): a negative error that a Relu clips
costs nothing. Only torch's conv ops on the chain itself are used (no conversion of the model),
so this works on every model ONNX Runtime runs. The tiles of every fifth tile sample are held out:
the factors of the step with the lowest held-out loss are kept, and only if they beat the
chain as it came in.

torch is imported when a :class:`Reconstructor` is made (``[finetune]`` extra); without it the
error names the extra.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from onnxfactor.calibration.tiles import _conv_attrs
from onnxfactor.errors import UsageError
from onnxfactor.methods.base import ChainSpec, ConvGeometry

#: Tiles per Adam step (all of them when fewer).
BATCH_TILES = 128


def import_torch():
    """torch, or a one-line :class:`UsageError` naming the extra to install."""
    try:
        import torch
    except ImportError as e:
        raise UsageError(f"layer-wise reconstruction (--reconstruct) needs PyTorch ({e}): pip install 'onnxfactor[finetune]'") from None
    return torch


class Reconstructor:
    """``reconstructor(chain, geometry, windows, targets, holdout, bias, activation) -> (chain, info)``.

    ``config`` is the :class:`~onnxfactor.config.CalibrationConfig` (``reconstruct_steps``,
    ``reconstruct_lr``, ``seed``).
    """

    def __init__(self, config):
        self.torch = import_torch()
        self.steps = int(config.reconstruct_steps)
        self.lr = float(config.reconstruct_lr)
        self.seed = int(config.seed)

    def __call__(self, chain: ChainSpec, geometry: ConvGeometry, windows: np.ndarray, targets: np.ndarray,
                 holdout: np.ndarray, bias: np.ndarray | None, activation) -> tuple[ChainSpec, dict]:
        torch = self.torch
        start = time.perf_counter()
        torch.manual_seed(self.seed)
        conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[geometry.spatial_dims]
        weights = [torch.tensor(np.asarray(c.weight, dtype=np.float32), requires_grad=True) for c in chain.convs]
        b0 = chain.bias if chain.bias is not None else (bias if bias is not None else np.zeros(chain.convs[-1].weight.shape[0]))
        b = torch.tensor(np.asarray(b0, dtype=np.float32), requires_grad=True)
        attrs = [_conv_attrs(c, geometry) for c in chain.convs]
        act = (lambda t: activation.torch(t)) if activation is not None else (lambda t: t)
        x_all = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32))
        y_all = act(torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32)))
        fit_idx = np.flatnonzero(~holdout) if (~holdout).any() else np.arange(len(windows))
        held_idx = np.flatnonzero(holdout) if holdout.any() and (~holdout).any() else fit_idx

        def forward(x):
            h = x
            for w, c, (strides, dilations) in zip(weights, chain.convs, attrs):
                h = conv(h, w, None, stride=strides, dilation=dilations, groups=c.group)
            return act(h + b.reshape(1, -1, *([1] * geometry.spatial_dims)))

        def loss(idx) -> "torch.Tensor":
            y = y_all[idx]
            return ((forward(x_all[idx]) - y) ** 2).mean() / (y**2).mean().clamp_min(1e-12)

        optimizer = torch.optim.Adam([*weights, b], lr=self.lr)
        rng = np.random.default_rng(self.seed)
        with torch.no_grad():
            held_start = float(loss(held_idx))
        best, best_state = held_start, None
        for step in range(self.steps):
            batch = fit_idx if len(fit_idx) <= BATCH_TILES else rng.choice(fit_idx, BATCH_TILES, replace=False)
            optimizer.zero_grad()
            value = loss(batch)
            value.backward()
            optimizer.step()
            if step % 10 == 9 or step == self.steps - 1:
                with torch.no_grad():
                    held = float(loss(held_idx))
                if held < best:
                    best, best_state = held, ([w.detach().clone() for w in weights], b.detach().clone())
        info = {"steps": self.steps, "held_out_loss_before": held_start, "held_out_loss_after": best,
                "applied": best_state is not None, "seconds": round(time.perf_counter() - start, 3)}
        if best_state is None:
            return chain, info
        ws, bias_t = best_state
        convs = tuple(dataclasses.replace(c, weight=w.numpy().astype(np.float32)) for c, w in zip(chain.convs, ws))
        return dataclasses.replace(chain, convs=convs, bias=bias_t.numpy().astype(np.float32)), info
