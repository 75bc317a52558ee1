"""The engine's forward_only: logits, per-token log-probs and hidden states of a micro-batch, the same on every
layout, the pipeline's included, as on one process."""

import pytest
import torch

from tests.helpers.ranks import run_ranks
from tests.helpers.workloads import forward_outputs


@pytest.fixture(scope="module")
def one_process():
    (result,) = run_ranks(1, forward_outputs, [])
    return result


def test_the_outputs_agree_with_each_other(one_process):
    logits, logprobs, hidden = one_process["logits"], one_process["logprobs"], one_process["hidden"]
    s, b, v = logits.shape
    assert logprobs.shape == (b, s) and hidden.shape == (s, b, 64)
    assert torch.isfinite(hidden).all() and (logprobs <= 0).all()
    # the log-prob of each label is its log-softmax over the (real) vocabulary's logits
    tokens = torch.randint(0, 50, (b, s + 1), generator=torch.Generator().manual_seed(0))
    expected = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, 1:].t()[..., None])[..., 0].t()
    assert (logprobs - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("world, layout", [(2, ["parallel.pipeline=2"]), (2, ["parallel.tensor=2",
                                                                              "parallel.sequence_parallel=true"]),
                                           (4, ["parallel.tensor=2", "parallel.pipeline=2"])], ids=["pp2", "tp2-sp", "tp2xpp2"])
def test_every_layout_hands_on_what_one_process_does(world, layout, one_process):
    found = [r for r in run_ranks(world, forward_outputs, layout) if r is not None]  # the ranks of the last stage
    assert found
    for result in found:
        for key in ("logits", "logprobs", "hidden"):
            assert (result[key] - one_process[key]).abs().max().item() < 1e-5, key
