"""SLURM job generation for hpc_layerpar (site file + template + sweep generator)."""
