"""Sampling from the model an engine holds, on the layout it trains on, with no copy of its weights: decode.py (the
KV-cache decoder over a rank's layers), sampling.py (how a token is picked, and its two log-probs), rollouts.py
(`generate`, the call RL's rollouts, `scalelm generate` and benchmark generation make)."""
