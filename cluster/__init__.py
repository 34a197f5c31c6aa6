"""Ray cluster configs for the sweep (gpu.yaml, constraints.txt) and their checks (`python -m cluster.validate`)."""
