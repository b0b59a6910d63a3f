# make demo  - set up .venv if needed, prepare the digits dataset, run the main job:
#              SPH layer-parallel training on 2 ranks beside serial back-propagation
# make test  - set up .venv if needed, lint (ruff), run the whole suite (plain pytest, then MPI at 1, 2, 3, 4 ranks)
# make bench - the benchmarks (see benchmarks/README.md)
# make test-gpu - on a GPU machine: the equality tests on the GPU (HPL_TEST_DEVICE=cuda), 1 and 2 ranks
#
# On a cluster with your own Python/MPI/CUDA torch, skip the venv:
#   make test PYTHON=$(which python) MPIEXEC=mpirun
# (that Python needs this package installed: pip install -e '.[test,demo]').

SHELL := /bin/bash
VENV ?= .venv
# CPU wheel on CPU machines; an unpinned torch pulls several GB of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
TEST_TIMEOUT ?= 900
MPI_SIZES ?= 1 2 3 4

ifeq ($(origin PYTHON),undefined)
PYTHON := $(VENV)/bin/python
MPIEXEC ?= $(VENV)/bin/mpiexec
SETUP := $(VENV)/.installed
else
MPIEXEC ?= mpiexec
SETUP :=
endif

DEMO_DIR := runs/demo-$(shell date +%Y%m%d-%H%M%S)
export OMP_NUM_THREADS ?= 1

.PHONY: demo test lint test-serial test-mpi test-gpu bench setup clean

setup: $(SETUP)

$(VENV)/.installed: setup.py setup.cfg
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip >/dev/null
	$(VENV)/bin/pip install "$(TORCH_SPEC)" mpich
	$(VENV)/bin/pip install -e '.[test,demo]'
	touch $@

data/digits.h5: | $(SETUP)
	$(PYTHON) -m data_prep digits --out $@

demo: $(SETUP) data/digits.h5
	@echo "== serial back-propagation, 1 rank"
	$(MPIEXEC) -n 1 $(PYTHON) -m mpi4py -m hpc_layerpar train --preset digits-resnet-serial \
	    --set run.out_dir=$(DEMO_DIR) --set run.name=serial-1rank --set run.threads=1
	@echo "== SPH layer-parallel training (penalty:24,serial:6: parallel first, then the serial correction), 2 ranks"
	$(MPIEXEC) -n 2 $(PYTHON) -m mpi4py -m hpc_layerpar train --preset digits-resnet-penalty \
	    --set run.out_dir=$(DEMO_DIR) --set run.name=sph-penalty-2ranks --set run.threads=1
	@echo "== comparison"
	$(PYTHON) -m hpc_layerpar summary $(DEMO_DIR)/*.h5

test: $(SETUP)
	$(MAKE) --no-print-directory lint test-serial test-mpi PYTHON=$(PYTHON) MPIEXEC=$(MPIEXEC)

lint:
	$(PYTHON) -m ruff check .

test-serial:
	timeout $(TEST_TIMEOUT) $(PYTHON) -m pytest -q

test-mpi:
	@for n in $(MPI_SIZES); do \
	  echo "== MPI tests under $(MPIEXEC) -n $$n"; \
	  timeout $(TEST_TIMEOUT) $(MPIEXEC) -n $$n $(PYTHON) -m mpi4py tests/mpi_pytest.py -q -m mpi || exit 1; \
	done

GPU_TESTS := tests/test_graphs.py tests/test_serial.py tests/test_pipeline.py tests/test_comm.py tests/test_checkpoint.py
test-gpu: $(SETUP)
	HPL_TEST_DEVICE=cuda timeout $(TEST_TIMEOUT) $(PYTHON) -m pytest -q $(GPU_TESTS)
	HPL_TEST_DEVICE=cuda timeout $(TEST_TIMEOUT) $(MPIEXEC) -n 2 $(PYTHON) -m mpi4py tests/mpi_pytest.py -q -m mpi \
	    $(GPU_TESTS)

bench: $(SETUP)
	$(PYTHON) benchmarks/run.py

clean:
	rm -rf build *.egg-info .pytest_cache
