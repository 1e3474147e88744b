"""``python -m onnxfactor``: the same CLI as the ``onnxfactor`` console script.

Importing ``onnxfactor.cli`` first pins the BLAS thread pools (see ``onnxfactor/cli/__init__.py``)
before anything imports numpy; ``onnxfactor/__init__.py`` imports nothing heavy, so this holds.
"""

from onnxfactor.cli.app import main

if __name__ == "__main__":
    main()
