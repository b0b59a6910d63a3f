"""Fetch or convert datasets into hpc_layerpar's HDF5 format (see the README's data section)."""
