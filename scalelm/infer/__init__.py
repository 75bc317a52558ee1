"""Using a trained model: sampling text from it (generate.py) and measuring its perplexity (evaluate.py)."""
