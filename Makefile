# repq — build, test, benchmark.  `make help` lists the targets.
#
# Everything heavy is cached outside the repository under $(REPQ_CACHE) (default ~/.cache/repq):
# the llama.cpp sdist, the native build (keyed by sources and options), the reference model
# and the evaluation / calibration text.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
export REPQ_CACHE ?= $(HOME)/.cache/repq
PY := $(VENV)/bin/python
CACHE ?= $(or $(REPQ_CACHE),$(HOME)/.cache/repq)
JOBS ?= $(shell nproc)
MODEL_DIR := $(REPQ_CACHE)/models
DATA_DIR := $(REPQ_CACHE)/data
REF_F32 := $(MODEL_DIR)/smollm2-135m-f32.gguf
export LLAMA_CPP_LIB_PATH := $(CURDIR)/native/build/bin

.PHONY: help setup vendor native model data data-core demo demo-inputs demo-q4 test test-fast test-slow test-gpu bench bench-ldlq bench-distill-cpu lint fmt clean

help:
	@echo "make setup      venv + Python deps + vendored llama.cpp + native build (cached)"
	@echo "make demo       setup, fetch the reference model, quantize it with repq and compare with llama.cpp"
	@echo "make test       setup + model + data, then every test tier (what CI runs)"
	@echo "make test-fast  unit tests only (seconds)"
	@echo "make bench      benchmarks against llama.cpp's tools (results in benchmarks/results)"
	@echo "make bench-ldlq LDLQ vs llama.cpp quality (about an hour); make bench-distill-cpu: repq distill Q4_0 on CPU"
	@echo "make native     (re)build vendor/llama.cpp into native/build; REPQ_CUDA=1 for CUDA"
	@echo "make lint | fmt | clean"

# The package build, editable: the same path as `pip install .` (native/wheel/CMakeLists.txt runs
# scripts/native.sh, native/bindings.py makes llama-cpp-python's bindings without a llama.cpp of
# their own), so there is one way to build.  `native` runs first so that its progress shows; pip
# then finds the build cached.
$(VENV)/.stamp: pyproject.toml native/wheel/CMakeLists.txt native/bindings.py repq/_pins.py | native
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

vendor:
	bash scripts/vendor.sh

native: vendor
	JOBS=$(JOBS) bash scripts/native.sh

setup: native $(VENV)/.stamp

model: setup
	bash scripts/fetch_model.sh

data:
	bash scripts/fetch_data.sh

# the tests read only the tutorial and library text (no held-out domain)
data-core:
	bash scripts/fetch_data.sh --core

DEMO := $(REPQ_CACHE)/demo

# The main job on the built-in default: calibration data as repq recommends it (the model's own
# answers to repq calib's prompts, half library text: the set that held up best on held-out
# domains), Hessians from it, repq LDLQ at IQ3_S against llama.cpp's best files of the same bytes
# (IQ3_S and Q3_K_S with an imatrix from the same data), and a report of all three on the tutorial
# and on the held-out sysadmin text (about 20 minutes on 2 busy cores once the model and data are
# cached).
demo: demo-inputs
	$(VENV)/bin/repq quantize $(REF_F32) $(DEMO)/llama-imatrix-q3_k_s.gguf --fmt Q3_K_S --imatrix $(DEMO)/imatrix.gguf -q
	$(VENV)/bin/repq quantize $(REF_F32) $(DEMO)/llama-imatrix-iq3_s.gguf --fmt IQ3_S --imatrix $(DEMO)/imatrix.gguf -q
	$(VENV)/bin/repq quantize $(REF_F32) $(DEMO)/repq-ldlq-iq3_s.gguf --fmt IQ3_S --hessian $(DEMO)/hess
	$(VENV)/bin/repq report $(DEMO)/llama-imatrix-q3_k_s.gguf $(DEMO)/llama-imatrix-iq3_s.gguf $(DEMO)/repq-ldlq-iq3_s.gguf \
		--base $(REF_F32) --data $(DATA_DIR)/tutorial.txt --chunks 20 -o $(DEMO)/report.md --plot $(DEMO)/report.png
	$(VENV)/bin/repq report $(DEMO)/llama-imatrix-q3_k_s.gguf $(DEMO)/llama-imatrix-iq3_s.gguf $(DEMO)/repq-ldlq-iq3_s.gguf \
		--base $(REF_F32) --data $(DATA_DIR)/sysadmin.txt --chunks 20 -o $(DEMO)/report-sysadmin.md
	@echo "report: $(DEMO)/report.md (tutorial), $(DEMO)/report-sysadmin.md (held-out)  plot: $(DEMO)/report.png"

demo-inputs: model data
	mkdir -p $(DEMO)
	test -f $(DEMO)/calib.jsonl || $(VENV)/bin/repq calib $(REF_F32) -o $(DEMO)/calib.jsonl --tokens 17000 \
		--mix $(DATA_DIR)/library.txt:0.5
	test -f $(DEMO)/hess/hessians.json || $(VENV)/bin/repq hessian $(REF_F32) --data $(DEMO)/calib.jsonl --chunks 32 -o $(DEMO)/hess
	test -f $(DEMO)/imatrix.gguf || $(VENV)/bin/repq imatrix $(REF_F32) --data $(DEMO)/calib.jsonl --chunks 32 -o $(DEMO)/imatrix.gguf

# the Q4_0 pair of the same data (the CPU eval pilot and `bench_eval_speed.py --q4` read them)
demo-q4: demo-inputs
	test -f $(DEMO)/llama-imatrix-q4_0.gguf || $(VENV)/bin/repq quantize $(REF_F32) $(DEMO)/llama-imatrix-q4_0.gguf \
		--fmt Q4_0 --imatrix $(DEMO)/imatrix.gguf -q
	test -f $(DEMO)/repq-ldlq-q4_0.gguf || $(VENV)/bin/repq quantize $(REF_F32) $(DEMO)/repq-ldlq-q4_0.gguf \
		--fmt Q4_0 --hessian $(DEMO)/hess -q

test-fast: setup
	$(PY) -m pytest tests/unit -q

test-slow: setup model data-core
	$(PY) -m pytest tests -q -m slow --ignore=tests/gpu

test: setup model data-core
	$(PY) -m pytest tests -q --ignore=tests/gpu

# the CUDA paths against ggml and the CPU (tests/gpu; a GPU machine with the native build;
# benchmarks/gpu/test_gpu.sh runs it on the device machine)
test-gpu: setup
	$(PY) -m pytest tests/gpu -q

bench: setup model data
	$(PY) benchmarks/bench_quantize.py
	$(PY) benchmarks/bench_eval.py

# LDLQ vs llama-quantize quality (about an hour on 2 cores; resumable): llama.cpp's imatrix ladder
# (every ftype), then repq LDLQ against the same ftype and against the best ladder file of <= its
# size, on the tutorial text and the held-out domains (20 x 512 tokens each)
bench-ldlq: setup model data
	$(PY) benchmarks/ladder.py --calib-chunks 100 --eval-chunks 20 --threads 2 --work $(CACHE)/bench-ldlq-domains
	$(PY) benchmarks/bench_ldlq.py --ftypes IQ2_XS,IQ3_S,Q3_K_S,Q4_0 --variants ggml-imatrix,ldlq \
	  --calib-chunks 100 --eval-chunks 20 --threads 2 --work $(CACHE)/bench-ldlq-domains --tag domains

# repq distill on 2 CPU cores (Q4_0, ~18 min) and its KLD vs the F32 base (README's CPU row)
bench-distill-cpu: setup model data
	mkdir -p $(CACHE)/bench-distill
	$(VENV)/bin/repq distill $(CACHE)/models/smollm2-135m-f32.gguf $(CACHE)/bench-distill/q4_0.gguf --fmt Q4_0 \
	  --data $(CACHE)/data/library.txt --device cpu --steps-per-group 25 --batch 2 --seq-len 256 \
	  --hessian-chunks 32 --threads 2 --warmup 3 --json > $(CACHE)/bench-distill/q4_0.distill.json
	$(VENV)/bin/repq kld $(CACHE)/models/smollm2-135m-f32.gguf $(CACHE)/bench-distill/q4_0.gguf \
	  --data $(CACHE)/data/tutorial.txt --chunks 40 -t 2 --json > $(CACHE)/bench-distill/q4_0.kld.json

lint: setup
	$(VENV)/bin/ruff check repq tests benchmarks native

fmt: setup
	$(VENV)/bin/ruff check --fix repq tests benchmarks native


clean:
	rm -rf $(VENV) native/build .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
