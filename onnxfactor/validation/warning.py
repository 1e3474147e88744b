"""The warning a user gets when the compressed model is far from the original (the safe default)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from onnxfactor.validation.compare import ValidationResult


def accuracy_warning(vr: ValidationResult, *, random_inputs: bool, calibrated: bool, reconstructing: bool) -> str | None:
    """The safe default: a measured result far from the original (:meth:`ValidationResult.far_from_original`),
    with the options that trade compression for accuracy and are not already in use."""
    far = vr.far_from_original()
    if far is None:
        return None
    fixes = ["a weaker rank policy (--ranks weakened --weaken 0.3, --ranks error --target-error 0.1)"]
    if not calibrated:
        fixes.append("calibration data (--calibration DATA: data-aware factors and correction)")
    if not reconstructing:
        fixes.append("layer-wise reconstruction (--reconstruct 300, with --calibration)")
    where = "on random inputs" if random_inputs else f"on {vr.input_source}"
    return f"the compressed model is far from the original {where}: {far}; trade compression for accuracy with " + ", ".join(fixes)
