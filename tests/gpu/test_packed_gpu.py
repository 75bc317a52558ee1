"""Packed documents on a GPU: flex attention's compiled block-sparse kernel against SDPA with the boolean
mask, forward and backward, and SFT training steps with each. Skipped without a CUDA GPU."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_flex_kernel_matches_the_masked_sdpa(dtype):
    from scalelm.model.attention import _flex, document_mask

    g = torch.Generator(device="cuda").manual_seed(0)
    docs = torch.repeat_interleave(torch.arange(8, device="cuda"), 256)[None].expand(2, -1).contiguous()  # (2, 2048)
    q = torch.randn(2, 8, 2048, 64, device="cuda", dtype=dtype, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 2048, 64, device="cuda", dtype=dtype, generator=g, requires_grad=True) for _ in range(2))
    allowed = ~document_mask(docs)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    fused = _flex(True)(q, k, v, block_mask=document_mask(docs, "flex"), enable_gqa=True)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(fused, plain, atol=tolerance, rtol=tolerance)
    grads = [torch.autograd.grad(out.float().square().sum(), (q, k, v)) for out in (plain, fused)]
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=5 * tolerance, rtol=5 * tolerance)


def test_sft_steps_with_flex_follow_the_plain_path():
    from tests.helpers.ranks import run_ranks
    from tests.helpers.workloads import train_steps

    common = ["train.global_batch_size=8", "train.micro_batch_size=4", "train.precision=bf16", "optim.lr=1e-3"]
    (plain,) = run_ranks(1, train_steps, common, 4, 0, True, True)
    (flex,) = run_ranks(1, train_steps, common + ["train.packed_attention=flex"], 4, 0, True, True)
    assert flex["losses"] == pytest.approx(plain["losses"], abs=2e-2)
