"""Reinforcement learning from rewards: the rewards a completion is scored by (rewards.py, reward_model.py) and the
batch source that samples, scores and hands the completions to a policy-gradient objective (source.py,
objectives/policy.py)."""


def check(cfg) -> None:
    """What a run's rewards need, checked before any rank starts (train/preflight.py): every rl.reward term found (a
    module that cannot be imported is a ConfigError), and rl.reward_model a reward head of data.tokenizer."""
    from scalelm.data.files import sha256_file
    from scalelm.rl import reward_model
    from scalelm.rl.rewards import Rewards

    Rewards(cfg.rl)
    if cfg.rl.reward_model:
        reward_model.check(cfg, sha256_file(cfg.data.tokenizer))
