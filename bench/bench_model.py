"""Forward + backward throughput of dense, BTX-style and BAM models (megatron-core GPTModel).

    python bench/bench_model.py                 # GPU: the reference shape; CPU: a tiny shape
    python bench/bench_model.py --tiny          # tiny shape anywhere
    python bench/bench_model.py --variants dense,bam-shared-kv --iters 20

Variants (all parallel blocks, ``--experts`` experts, FFN top-``--topk``):
  dense           dense attention + dense SwiGLU FFN (the seed)
  btx             dense attention + FFN experts (BTX: attention merged)
  bam-shared-kv   soft MoA with shared K/V + FFN experts
  bam-kv-experts  soft MoA with per-expert K/V + FFN experts

Reports ms per step, tokens/s, model TFLOP/s (formula in ``bam_megatron/flops.py``) and peak
memory, as a markdown table. Single process; bf16 on GPU, fp32 on CPU. The optimizer step is
not included.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

VARIANTS = ("dense", "btx", "bam-shared-kv", "bam-kv-experts")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--tiny", action="store_true", help="small shape (default on CPU)")
    p.add_argument("--num-layers", type=int, default=24)
    p.add_argument("--hidden-size", type=int, default=1536)
    p.add_argument("--num-attention-heads", type=int, default=12)
    p.add_argument("--num-query-groups", type=int, default=None)
    p.add_argument("--ffn-hidden-size", type=int, default=4096)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--topk", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--recompute", choices=["none", "full", "selective"], default="none")
    args = p.parse_args(argv)
    if args.tiny or not torch.cuda.is_available():
        args.num_layers, args.hidden_size, args.num_attention_heads = 2, 128, 4
        args.ffn_hidden_size, args.seq_length, args.micro_batch_size = 256, 128, 2
        args.vocab_size, args.iters, args.warmup = 1024, min(args.iters, 3), 1
    for v in args.variants.split(","):
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    return args


def build(variant: str, args, gpu: bool):
    from megatron.core.transformer import TransformerConfig

    from bam_megatron.model.build import build_bam_model
    from bam_megatron.model.config import BAMConfig

    moe = {}
    if variant != "dense":
        moe = dict(
            num_moe_experts=args.experts,
            moe_router_topk=args.topk,
            moe_router_pre_softmax=True,
            moe_token_dispatcher_type="alltoall",
        )
    recompute = {}
    if args.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif args.recompute == "selective":
        recompute = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    dtype = torch.bfloat16 if gpu else torch.float32
    cfg = TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        ffn_hidden_size=args.ffn_hidden_size,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=gpu,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=not gpu,
        **moe,
        **recompute,
    )
    bam = BAMConfig(
        attn_experts=args.experts if variant.startswith("bam") else 1,
        kv_sharing=variant == "bam-shared-kv",
    )
    model = build_bam_model(cfg, bam, vocab_size=args.vocab_size, max_sequence_length=args.seq_length)
    return model, cfg, bam


def run_variant(variant: str, args, device):
    from bam_megatron.model.flops import flops_per_token

    gpu = device.type == "cuda"
    model, cfg, bam = build(variant, args, gpu)
    model.to(device)
    b, s = args.micro_batch_size, args.seq_length
    tokens = torch.randint(0, args.vocab_size, (b, s), device=device)
    position_ids = torch.arange(s, device=device).unsqueeze(0).expand(b, s)

    def step():
        loss = model(tokens, position_ids, None, labels=tokens).float().mean()
        loss.backward()

    for _ in range(args.warmup):
        step()
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    if gpu:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.iters
    fpt = flops_per_token(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        head_dim=cfg.kv_channels,
        ffn_hidden_size=cfg.ffn_hidden_size,
        seq_length=s,
        vocab_size=args.vocab_size,
        attn_experts=bam.attn_experts,
        kv_sharing=bam.kv_sharing,
        ffn_experts=cfg.num_moe_experts or 0,
        ffn_topk=cfg.moe_router_topk if cfg.num_moe_experts else 1,
    )
    params = sum(p.numel() for p in model.parameters())
    tokens_per_s = b * s / seconds
    row = dict(
        variant=variant,
        params_m=params / 1e6,
        ms=seconds * 1e3,
        tokens_per_s=tokens_per_s,
        tflops=fpt * tokens_per_s / 1e12,
        peak_gib=torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan"),
    )
    model = None  # freed before the next variant
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    return row


def main(argv=None):
    args = parse_args(argv)
    from bam_megatron.parallel.distributed import destroy_distributed, init_distributed

    info = init_distributed(seed=1234)
    try:
        device = info.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(
            f"# {name}: layers {args.num_layers}, d {args.hidden_size}, heads {args.num_attention_heads}, "
            f"ffn {args.ffn_hidden_size}, seq {args.seq_length}, micro-batch {args.micro_batch_size}, "
            f"vocab {args.vocab_size}, experts {args.experts}, top-{args.topk}, recompute {args.recompute}"
        )
        print("| variant | params (M) | step (ms) | tokens/s | model TFLOP/s | peak mem (GiB) |")
        print("|---|---|---|---|---|---|")
        rows = []
        for variant in args.variants.split(","):
            r = run_variant(variant, args, device)
            rows.append(r)
            print(
                f"| {r['variant']} | {r['params_m']:.0f} | {r['ms']:.1f} | {r['tokens_per_s']:.0f} | "
                f"{r['tflops']:.1f} | {r['peak_gib']:.1f} |",
                flush=True,
            )
        by = {r["variant"]: r for r in rows}
        if "dense" in by and "bam-shared-kv" in by:
            ratio = by["bam-shared-kv"]["tflops"] / by["dense"]["tflops"]
            print(f"\nBAM shared-KV / dense model TFLOP/s: {ratio:.2f}")
        return rows
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
