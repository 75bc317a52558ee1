"""Reinforcement learning from rewards: the rewards a completion is scored by (rewards.py) and the batch source that
samples, scores and hands the completions to a policy-gradient objective (source.py, objectives/policy.py)."""
