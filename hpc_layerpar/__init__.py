"""hpc_layerpar: layer-parallel training of residual networks with MPI (penalty / AL / SPH)."""
__version__ = "0.1.0"
