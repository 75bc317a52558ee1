"""The GPT decoder as a list of layers built from megatron-core modules (see gpt.py)."""
