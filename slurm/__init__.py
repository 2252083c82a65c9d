"""Slurm array-job sweeps for GB200 clusters."""
