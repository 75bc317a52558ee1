"""Each objective checks its own part of the config (its section, the head and targets it needs) when a run picks
it, with errors that name the field, the value and the fix; the registry refuses a name it does not know."""

import pytest

from scalelm import objectives
from scalelm.config import load_config
from scalelm.errors import ConfigError


@pytest.mark.parametrize("override, message", [
    (["finetune.objective=dpo", "finetune.dpo.beta=0"], "finetune.dpo.beta=0.0 must be positive"),
    (["finetune.objective=dpo", "finetune.dpo.beta=-1"], "finetune.dpo.beta=-1.0 must be positive"),
    (["finetune.objective=dpo", "finetune.dpo.loss=robust", "finetune.dpo.label_smoothing=0.5"],
     "finetune.dpo.label_smoothing=0.5 must be in [0, 0.5)"),
    (["finetune.objective=dpo", "finetune.dpo.label_smoothing=0.1"], "goes with finetune.dpo.loss=robust, not sigmoid"),
    (["finetune.objective=dpo", "finetune.dpo.sft_weight=-1"], "finetune.dpo.sft_weight=-1.0 must be 0 (off) or positive"),
    (["finetune.objective=dpo", "finetune.train_on=all"], "finetune.train_on=all would count the prompt"),
    (["finetune.objective=classify"], "finetune.objective=classify needs finetune.head=classification"),
    (["finetune.head=classification", "finetune.num_labels=3"], "trains with finetune.objective=classify (labelled texts) or"),
    (["finetune.objective=dpx"], "finetune.objective='dpx' is no objective: did you mean dpo?"),
    (["finetune.objective=next_token"], "finetune.objective=next_token is a pretrain objective: set train.objective=next_token"),
    (["model.causal=false"], "finetune.objective=sft predicts each next token, and model.causal=false"),
])
def test_errors_name_field_value_and_fix(override, message):
    with pytest.raises(ConfigError) as info:
        objectives.check(load_config(None, override), "finetune")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_pretraining_checks_its_own_field():
    with pytest.raises(ConfigError, match="train.objective=dpo is a finetune objective: set finetune.objective=dpo"):
        objectives.check(load_config(None, ["train.objective=dpo"]), "pretrain")
    with pytest.raises(ConfigError, match="train.objective=next_token predicts each next token"):
        objectives.check(load_config(None, ["model.causal=false"]), "pretrain")
    # the finetuning section is not the pretraining run's business
    assert objectives.check(load_config(None, ["finetune.objective=classify"]), "pretrain").name == "next_token"


def test_what_each_objective_declares():
    cfg = load_config(None, ["finetune.head=classification", "finetune.num_labels=3", "finetune.objective=classify"])
    classify = objectives.objective_for(cfg, "finetune")
    assert (classify.data, classify.head, classify.unit, classify.num_labels()) == ("labels", "classification", "texts", 3)
    assert [cls.name for cls in objectives.trainers("pairs")] == ["dpo", "reward"]
    assert [cls.name for cls in objectives.trainers("text")] == ["next_token"]
