"""Conversion between scalelm checkpoints and the formats models are served and finetuned in:
Hugging Face folders (both directions) and GGUF. Files alone: no process group, CPU only."""
