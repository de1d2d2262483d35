# The two README commands: `make quickstart` and `make test`. Everything they need is
# installed here, into .venv, on a fresh machine with Python 3.10+.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch unless an NVIDIA driver is present (pip's default torch is a
# multi-GB CUDA build). Set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu where
# the default index does not serve a CPU wheel.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
STAMP := $(VENV)/.installed
EXTENSIONS := $(VENV)/.extensions
C_SOURCES := $(wildcard data_prep/_*.c data_prep/_*.h)
# DeepSpeed JIT-builds its C++ ops (the CPU Adam of the offload configs) into
# ~/.cache/torch_extensions, which every checkout shares and rebuilds (minutes) when another
# one used it: one cache per venv instead.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions

.PHONY: setup bytecode quickstart test test-fast bench-prep bench-train clean

setup: $(STAMP) $(EXTENSIONS)

$(STAMP): pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: torch comes from the default index"; \
	else \
		echo "no NVIDIA GPU: installing CPU $(TORCH_SPEC)"; \
		$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)); \
	fi
	@# uv resolves and installs the ~150 other packages in ~10 s where pip takes ~2 min; pip
	@# stays the fallback (an index that only pip is configured for, say). --compile-bytecode:
	@# pip writes the .pyc files at install and uv does not; without them every process compiles
	@# the modules it imports, each time where PYTHONDONTWRITEBYTECODE is set (importing torch,
	@# DeepSpeed, transformers and MLflow took 9-10 s instead of 5: every torchrun rank pays it).
	$(PY) -m pip install -q uv
	$(VENV)/bin/uv pip install --python $(PY) -q --compile-bytecode -e '.[test]' || \
		{ echo "uv could not install the project: installing it with pip"; $(PY) -m pip install -q -e '.[test]'; }
	touch $(STAMP)

# The editable install above builds the C extensions next to their sources; a source edited
# since is rebuilt in place (seconds) rather than by a new venv.
$(EXTENSIONS): $(STAMP) $(C_SOURCES)
	$(PY) setup.py -q build_ext --inplace
	touch $(EXTENSIONS)

# The project's own .pyc files, for the same reason as --compile-bytecode above (a second;
# modules edited since are compiled again, here or by Python as it imports them).
bytecode: setup
	$(PY) -m compileall -q data_prep trainer launcher finetune

quickstart: bytecode
	$(VENV)/bin/t5ja quickstart

# Two pytest-xdist workers: many tests wait on processes, servers and the scheduler, so two
# streams keep both cores busy. --dist loadfile: a test file runs on one worker, so the Slurm
# cluster (tests/test_slurm.py; it can be up only once on a machine) is never up twice.
# (xdist_group markers would be finer, but xdist 3.8 does not apply them under pytest 9.)
# --no-loadscope-reorder: files go out in collection order, longest first (tests/conftest.py),
# not xdist's default of most tests first, which left the few long resume tests for the end.
TEST_WORKERS ?= 2
test: bytecode
	$(PY) -m pytest -ra --durations=15 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# Pure-logic tests only (seconds): no torchrun, no DeepSpeed engine.
test-fast: setup
	$(PY) -m pytest -ra -m "not multiproc and not service"

# Data-prep throughput vs Hugging Face datasets and the raw SentencePiece ceiling (minutes).
BENCH_ARGS ?=
bench-prep: setup
	$(PY) bench/data_prep.py --rss-check $(BENCH_ARGS)

# Trainer tokens/s vs a bare DeepSpeed loop; checkpoint save rate vs the disk (~15 minutes).
bench-train: setup
	$(PY) bench/train.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
