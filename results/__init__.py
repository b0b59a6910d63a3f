"""Read hpc_layerpar metrics files and write the tables and plots of a paper (see report.py)."""
