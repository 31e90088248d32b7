# The README's two commands. Each target creates .venv on first use, installs the project
# into it, and reinstalls only when setup.cfg or pyproject.toml change (a stamp file).
# pip byte-compiles the installed modules (~17,000) on one core: it is told not to, and
# compileall does it on every core (skipping, as pip does, what this Python cannot compile),
# leaving out the ~6,000 no process here imports (packages' own tests, transformers' other
# models, TFDS's dataset catalogue): were one imported, Python would compile it then.
NEVER_IMPORTED := /tests?/|/transformers/models/(?!auto/|resnet/|mobilevit/|efficientnet/|encoder_decoder/)[^/]+/|/tensorflow_datasets/(?!core/|proto/|rlds/)[^/]+/
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-all test-kill mutation bench device-check throughput format clean

# The main job: a whole experiment on the embedded data set (sources, GRASP, baselines,
# metrics, plots, summary) with the default `digits` config.
run: $(STAMP)
	$(BIN)/python -m experiments.main

# Every benchmark in one run (merge kernel, GRASP stage, throughput against PyTorch,
# memory against K, the embedded job), written to benchmarks/results/<date>-<machine>.md
# (benchmarks/README.md); about 1 h on 2 CPU cores.
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# On a machine with a GPU or TPU: the accelerator tests, merge kernel, GRASP stage and
# the main job, written to benchmarks/results/<date>-device-check-<device>.md (~15 min).
device-check: $(STAMP)
	$(BIN)/python benchmarks/device_check.py

# Training/eval images per second of the model zoo, JAX vs PyTorch (docs/models.md).
throughput: $(STAMP)
	$(BIN)/python benchmarks/throughput.py

# Lint, format check, then the test suite without the `slow` full-size versions (what
# .ci/run calls); `make test-all` runs those too. Tests run in one worker process per
# core (at most 4, each with its own JAX runtime), a file's tests in the same worker so
# that its module fixtures run once: much of a test's time is single-threaded XLA
# compilation, which one process cannot spread over the cores. Files go to the workers
# longest first (tests/conftest.py).
PYTEST_WORKERS := -n auto --maxprocesses=4 --dist loadfile --no-loadscope-reorder
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_WORKERS)

test-all: $(STAMP)
	$(BIN)/python -m pytest

# The crash-safety test at all ten kill points, one by one (CI runs a chain of three
# kills in one work folder instead), ~12 min.
test-kill: $(STAMP)
	$(BIN)/python -m pytest tests/test_kill.py

# Mutation testing of the code behind the reported numbers (tests/MUTATION.md); not in
# CI, a few hours on 2 cores. Settings: [mutmut] in setup.cfg. Mutants that leave a
# jitted program unchanged reuse its compilation from JAX's persistent cache.
# The small experiment's trained sources are made once, by the unmutated code, and kept
# for every mutant's test session (tests/conftest.py, `small_sources`).
MUTATION_JAX_CACHE := $(CURDIR)/.jax-mutation-cache
MUTATION_SOURCES := $(CURDIR)/.mutation-sources
mutation: $(STAMP)
	$(BIN)/python -m pip install --quiet 'mutmut==3.8.1'
	rm -rf mutants $(MUTATION_JAX_CACHE) $(MUTATION_SOURCES)
	GRASP_TESTS_KEPT_SOURCES=$(MUTATION_SOURCES) \
	  $(BIN)/python -m pytest -q tests/test_baselines.py -k settings_are
	GRASP_TESTS_KEPT_SOURCES=$(MUTATION_SOURCES) \
	JAX_COMPILATION_CACHE_DIR=$(MUTATION_JAX_CACHE) \
	JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
	JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0 \
	  $(BIN)/mutmut run
	$(BIN)/mutmut results
	$(BIN)/python -m tests.mutation_report

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# ml_dtypes 0.7.0 takes 0.7 s to import here (registering its NumPy ufunc loops, one
# linear search each), paid by every process that imports JAX; 0.6.0 takes 3 ms and
# satisfies jax (>= 0.5). The environment these commands make asks for it; the library
# itself does not bound it.
FAST_IMPORTS := 'ml_dtypes>=0.5,<0.7'
$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "grasp-jax needs Python >= 3.11 (jax 0.10 does); set PYTHON=python3.11 or newer"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -e '.[test,torch]' $(FAST_IMPORTS)
	$(BIN)/python -c 'import compileall, re, sys; compileall.compile_dir(sys.prefix, quiet=2, workers=0, rx=re.compile(sys.argv[1]))' '$(NEVER_IMPORTED)'
	touch $(STAMP)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache .hypothesis mutants .jax-mutation-cache .jax-cache \
	  .mutation-sources
