"""Using a trained model from the command line: sampling text from it (generate.py, on scalelm/generation; or
transformers, generate_hf.py) and measuring its figures (evaluate.py)."""
