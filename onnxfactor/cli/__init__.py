"""The ``onnxfactor`` command line (typer + rich).

Compression is many small BLAS calls; on shared or busy cores several BLAS threads fight each
other (measured here: 100 s with 2 threads vs 3 s with 1). Unless the user set them, the CLI
pins the BLAS pools to one thread before numpy is imported. ONNX Runtime's threads are separate
(``--threads``).
"""

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
