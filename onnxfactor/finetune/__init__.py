"""Fine-tuning through PyTorch: label-free distillation from the original model, written back by name.

* :mod:`~onnxfactor.finetune.graph` -- the ONNX graph run with torch ops (the converter) and its
  check against ONNX Runtime;
* :mod:`~onnxfactor.finetune.distill` -- the distillation loop (KL / MSE on outputs, feature MSE at
  every decomposed layer, cross-entropy when labels are given);
* :mod:`~onnxfactor.finetune.writeback` -- trained values back into the ONNX model by initializer name;
* :mod:`~onnxfactor.finetune.stage` -- the stage the pipeline and the ``finetune`` command call.

torch is imported only inside these functions (``[finetune]`` extra).
"""
