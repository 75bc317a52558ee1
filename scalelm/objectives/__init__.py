"""What a run minimises, one module per objective, each registered under the name the config gives it
(train.objective, finetune.objective): objectives/base.py says what an objective declares, registry.py how one is
found. Adding one is a module here, its import below, and its tests."""

from scalelm.objectives import classify, dpo, next_token, policy, reward  # noqa: F401  (each registers itself)
from scalelm.objectives.base import EvalContext, Objective, Output, Stage  # noqa: F401
from scalelm.objectives.registry import check, for_evaluation, objective_for, trainers  # noqa: F401
