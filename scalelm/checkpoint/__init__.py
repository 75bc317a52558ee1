"""Checkpoints: the files on disk (store), the collective save and resume, one-file consolidation."""
