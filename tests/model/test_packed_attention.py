"""Packing without contamination: each document of a packed window gets the logits and loss it gets
alone (fp32), for the GPT-3 and the Llama architecture (learned positions and RoPE), in one process
and over two tensor-parallel ranks."""

import pytest

from tests.helpers.ranks import run_ranks
from tests.helpers.workloads import LLAMA, packed_vs_alone


@pytest.mark.parametrize("arch", [[], LLAMA], ids=["gpt3", "llama"])
@pytest.mark.parametrize("world, layout", [(1, []), (2, ["parallel.tensor=2"]), (1, ["train.packed_attention=flex"])],
                         ids=["single", "tp2", "flex"])
def test_packed_documents_equal_each_alone(arch, world, layout):
    for rank, result in enumerate(run_ranks(world, packed_vs_alone, arch + layout)):
        assert result["logit_diff"] <= 1e-5, f"rank {rank}"
        assert result["loss_diff"] <= 1e-5 and result["loss"] > 1, f"rank {rank}"
