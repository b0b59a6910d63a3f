"""`python -m hpc_layerpar` (under `python -m mpi4py` for MPI jobs)."""
import sys

from .cli import main

code = main()
if code:
    from .comm import finalize_and_exit

    finalize_and_exit(code)
sys.exit(0)
