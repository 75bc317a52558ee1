"""Starting ranks: torchrun on one machine (and, later, Ray and SLURM entries)."""
