"""GPU-only numerical checks of the fast paths (run on a GPU machine; CI has none).

    python bench/check_gpu.py

1. compiled RoPE (``bam_megatron.model.rope``) == megatron-core's RoPE, forward and backward;
2. ``GroupedGemmExperts`` (grouped GEMM) == ``SequentialMLP`` (per-expert loop), bf16;
3. the fused MoA on GPU (bf16, SDPA flash/cuDNN) == the same module on CPU (fp32).
Exits non-zero on the first mismatch.
"""

from __future__ import annotations

import sys

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def close(name, a, b, atol, rtol):
    err = (a.float() - b.float()).abs().max().item()
    ok = torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol)
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max abs err {err:.2e}")
    if not ok:
        sys.exit(1)


def check_rope(cfg, dev, s, b, freqs):
    """Both bf16 RoPE paths against an fp32 reference: the fused kernel must be at least as
    accurate as megatron-core's."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    from bam_megatron.model.rope import apply_rope

    t = torch.randn(s, b, 16, 32, device=dev, dtype=torch.bfloat16, requires_grad=True)
    t2 = t.detach().clone().requires_grad_()
    t32 = t.detach().float().requires_grad_()
    ours, ref = apply_rope(t, freqs, cfg), apply_rotary_pos_emb(t2, freqs, config=cfg)
    exact = apply_rotary_pos_emb(t32, freqs, config=cfg)
    g = torch.randn_like(ours)
    for out in (ours, ref, exact):
        out.backward(g.to(out.dtype))
    for name, got, mega, exact_val in (("forward", ours, ref, exact), ("backward", t.grad, t2.grad, t32.grad)):
        err_ours = (got.float() - exact_val).abs().max().item()
        err_megatron = (mega.float() - exact_val).abs().max().item()
        ok = err_ours <= 1.5 * err_megatron + 1e-3
        print(f"{'ok  ' if ok else 'FAIL'} rope {name}: max err vs fp32 {err_ours:.2e} (megatron bf16: {err_megatron:.2e})")
        if not ok:
            sys.exit(1)


def main():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP

    from bam_megatron.model.config import BAMConfig
    from bam_megatron.model.experts import GroupedGemmExperts
    from bam_megatron.model.moa import MixtureOfAttention
    from bam_megatron.parallel.distributed import destroy_distributed, init_distributed

    info = init_distributed(seed=3)
    dev = info.device
    assert dev.type == "cuda", "run this on a GPU machine"
    cfg = TransformerConfig(
        num_layers=1, hidden_size=256, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=512,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, bf16=True,
        params_dtype=torch.bfloat16, hidden_dropout=0.0, attention_dropout=0.0,
        num_moe_experts=4, moe_router_topk=1, moe_router_pre_softmax=True, normalization="RMSNorm",
    )
    s, b = 256, 2
    freqs = RotaryEmbedding(kv_channels=32, rotary_percent=1.0)(s).to(dev)

    check_rope(cfg, dev, s, b, freqs)

    # 2. grouped experts vs loop (same weights)
    sub = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    loop = SequentialMLP(4, cfg, sub, pg_collection=pgs).to(dev)
    grouped = GroupedGemmExperts(4, cfg, sub, pg_collection=pgs).to(dev)
    grouped.load_state_dict(loop.state_dict())
    counts = torch.tensor([300, 0, 123, 89])
    x = torch.randn(int(counts.sum()), 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    probs = torch.rand(x.shape[0], device=dev)
    out_g, _ = grouped(x, counts, probs)
    out_l, _ = loop(x2, counts, probs)
    go = torch.randn_like(out_g)
    out_g.backward(go)
    out_l.backward(go)
    close("grouped experts forward", out_g, out_l, 2e-2, 2e-2)
    close("grouped experts input grad", x.grad, x2.grad, 2e-2, 2e-2)
    for (n, pg), (_, pl) in zip(grouped.named_parameters(), loop.named_parameters()):
        close(f"grouped experts grad {n}", pg.grad, pl.grad, 5e-2, 5e-2)

    # 3. MoA GPU bf16 vs CPU fp32
    cfg32 = TransformerConfig(
        **{**cfg.__dict__, "bf16": False, "params_dtype": torch.float32, "use_cpu_initialization": True}
    )
    for kv_sharing in (False, True):
        moa_cpu = MixtureOfAttention(cfg32, BAMConfig(attn_experts=4, kv_sharing=kv_sharing), 1)
        moa_gpu = MixtureOfAttention(cfg, BAMConfig(attn_experts=4, kv_sharing=kv_sharing), 1)
        with torch.no_grad():
            for pc, pg in zip(moa_cpu.parameters(), moa_gpu.parameters()):
                pc.copy_(pg.float().cpu())
        h = torch.randn(s, b, 256)
        out_c, _ = moa_cpu(h, None, rotary_pos_emb=freqs.cpu())
        out_g, _ = moa_gpu(h.to(dev, torch.bfloat16), None, rotary_pos_emb=freqs)
        close(f"MoA kv_sharing={kv_sharing} GPU bf16 vs CPU fp32", out_g.cpu(), out_c, 3e-2, 5e-2)
    destroy_distributed()
    print("all GPU checks passed")


if __name__ == "__main__":
    main()
