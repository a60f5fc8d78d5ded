# Two entry points for a fresh machine: `make demo` and `make test`. Each creates .venv,
# installs the pinned requirements and builds the extension (CPU + CUDA for sm_80/sm_90).
PY      := .venv/bin/python
STAMP   := .venv/.fastres-installed
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h') setup.py pyproject.toml requirements.txt
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)

.PHONY: demo test install bench clean

$(STAMP): $(SOURCES)
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	MAX_JOBS=2 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m fastres demo

test: $(STAMP)
	$(PY) -m pytest tests -q
	$(PY) -m pytest bench -q --quick

bench: $(STAMP)
	mkdir -p results
	$(PY) -m pytest bench --benchmark-json=results/bench.json
	$(PY) -m bench.report results/bench.json --plot results/speedups.png

clean:
	rm -rf .venv build *.egg-info fastres/_C*.so fastres/_cpu_*.so
