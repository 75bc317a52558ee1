"""Every fused GPU path agrees with its plain fallback. Skipped without a CUDA GPU."""

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gqa", [False, True])
def test_sdpa_fused_kernels_match_the_math_kernel(dtype, gqa):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, 256, 64, device="cuda", dtype=dtype, generator=g)
    k, v = (torch.randn(2, 2 if gqa else 8, 256, 64, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    with sdpa_kernel(SDPBackend.MATH):
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=gqa)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        except RuntimeError:
            continue  # this backend does not take these shapes on this GPU; the others still must agree
        torch.testing.assert_close(out.float(), reference, atol=2e-2, rtol=2e-2, msg=str(backend))


def test_megatron_fused_swiglu_matches_plain():
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    x = torch.randn(128, 4, 1024, device="cuda", requires_grad=True)
    gate, up = x.chunk(2, dim=-1)
    fused, plain = bias_swiglu_impl(x, None), F.silu(gate) * up
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    (fused_grad,), (plain_grad,) = (torch.autograd.grad(y.sum(), x) for y in (fused, plain))
    torch.testing.assert_close(fused_grad, plain_grad, atol=1e-5, rtol=1e-5)


def test_fused_adamw_matches_the_for_loop_implementation():
    torch.manual_seed(0)
    params = [torch.randn(256, 256, device="cuda") for _ in range(3)]
    grads = [torch.randn_like(p) for p in params]
    results = []
    for kind in ({"fused": True}, {"foreach": False}):
        copies = [p.clone().requires_grad_() for p in params]
        opt = torch.optim.AdamW(copies, lr=1e-3, weight_decay=0.1, **kind)
        for _ in range(3):
            for p, g in zip(copies, grads):
                p.grad = g.clone()
            opt.step()
        results.append(copies)
    for fused, plain in zip(*results):
        torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-5)


def test_transformer_engine_layer_matches_the_local_layer():
    pytest.importorskip("transformer_engine")
    # With TE installed, scalelm's layer spec picks it on a GPU: one layer from each spec, the same
    # weights, the same input, the same output.
    from megatron.core.transformer.spec_utils import build_module

    from scalelm.config import load_config
    from scalelm.model.spec import layer_spec, transformer_config
    from scalelm.parallel.topology import destroy_distributed, init_distributed

    cfg = load_config(None, ["model.hidden_size=256", "model.num_heads=4", "model.num_layers=1"])
    init_distributed(cfg.parallel, seed=0)
    try:
        tc = transformer_config(cfg.model, cfg.parallel, on_gpu=True)
        te = build_module(layer_spec(on_gpu=True), config=tc, layer_number=1).cuda()
        local = build_module(layer_spec(on_gpu=False), config=tc, layer_number=1).cuda()
        te_state = te.state_dict()
        mapping = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                   "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
                   "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
                   "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias"}
        local.load_state_dict({k: te_state[mapping.get(k, k)] for k in local.state_dict()}, strict=True)
        x = torch.randn(64, 2, 256, device="cuda")
        torch.testing.assert_close(te(x)[0], local(x)[0], atol=1e-4, rtol=1e-4)
    finally:
        destroy_distributed()
