"""`python -m hpc_layerpar` (under `python -m mpi4py` for MPI jobs)."""
import sys

from .cli import main

sys.exit(main())
