"""Typed Python twins of every petctl verb; tests, notebooks and SLURM jobs call these directly."""
