"""The run's config: one typed tree (sections.py, finetune.py), loaded from YAML with dotted overrides (load.py),
its derived values and rules checked section by section (validate.py)."""

from scalelm.config.finetune import DPOConfig, FinetuneConfig, LoRAConfig  # noqa: F401
from scalelm.config.load import SAME_WEIGHTS_ANYWAY, from_dict, load_config, model_differences, to_dict  # noqa: F401
from scalelm.config.rl import RLConfig  # noqa: F401
from scalelm.config.sections import (  # noqa: F401
    CheckpointConfig,
    Config,
    DataConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
)
from scalelm.config.validate import validate  # noqa: F401
