"""Inference cost of dense, BTX and BAM models: KV cache, prefill, decode, 16-token latency.

    python bench/bench_generate.py                  # CPU: a tiny shape; GPU: the paper's small shape
    python bench/bench_generate.py --tiny           # tiny shape anywhere
    python bench/bench_generate.py --prompt-length 512 --repeats 5 --json out.json

Variants (parallel blocks, ``--experts`` experts, FFN top-``--topk``, random weights):
  dense           dense attention + dense SwiGLU FFN (the seed)
  btx             dense attention + FFN experts (BTX: attention merged)
  bam-shared-kv   soft MoA, K/V shared by the attention experts + FFN experts
  bam-kv-experts  soft MoA, K/V per attention expert + FFN experts

For each: KV-cache bytes per token (measured from the allocated cache, all layers, exact),
prefill tokens/s (batch ``--prefill-batch`` × ``--prompt-length``), decode tokens/s at batch 1
and 16 (one new token per sequence per step, from the cache), and the wall time to generate 16
new tokens after one prompt (batch 1, prefill included) — the paper's latency measurement —
each with its ratio to BTX. Best of ``--repeats`` runs after one warm-up (the least disturbed
run: on a shared machine a median still carries other jobs' noise). Generation is
``bam_megatron.inference.generate`` (greedy, no early stop). One process; bf16 on GPU, fp32 on
CPU.

Paper anchor (16 new tokens): BTX 4.81 s, BAM KV experts 6.17 s (1.28x), BAM shared KV 5.96 s
(1.24x).
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
import torch.nn.functional as F

VARIANTS = ("dense", "btx", "bam-shared-kv", "bam-kv-experts")
PAPER_RATIO = {"btx": 1.0, "bam-kv-experts": 6.17 / 4.81, "bam-shared-kv": 5.96 / 4.81}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--tiny", action="store_true", help="small shape (default on CPU)")
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--num-query-groups", type=int, default=None)
    p.add_argument("--ffn-hidden-size", type=int, default=4096)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--prompt-length", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prefill-batch", type=int, default=16)
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--topk", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None, help="Also write the rows to this JSON file.")
    args = p.parse_args(argv)
    if args.tiny or not torch.cuda.is_available():
        args.num_layers, args.hidden_size, args.num_attention_heads = 4, 256, 4
        args.ffn_hidden_size, args.vocab_size, args.prompt_length = 704, 4096, 128
        args.repeats = min(args.repeats, 5)
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
        moe = dict(num_moe_experts=args.experts, moe_router_topk=args.topk, moe_router_pre_softmax=True,
                   moe_token_dispatcher_type="alltoall")
    dtype = torch.bfloat16 if gpu else torch.float32
    cfg = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups, ffn_hidden_size=args.ffn_hidden_size, normalization="RMSNorm",
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, bf16=gpu, params_dtype=dtype, pipeline_dtype=dtype, use_cpu_initialization=not gpu,
        **moe,
    )
    bam = BAMConfig(attn_experts=args.experts if variant.startswith("bam") else 1, kv_sharing=variant == "bam-shared-kv")
    context = args.prompt_length + args.new_tokens
    model = build_bam_model(cfg, bam, vocab_size=args.vocab_size, max_sequence_length=context, inference=True)
    return model.eval(), cfg, bam


def _generate(model, args, batch: int, new_tokens: int):
    """One greedy generation of ``new_tokens`` after ``batch`` random prompts: (seconds, stats)."""
    from bam_megatron.inference.generate import GenerationStats, generate
    from bam_megatron.inference.sampling import SamplingParams
    from bam_megatron.parallel.device import get_device, synchronize

    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, args.vocab_size, (batch, args.prompt_length), generator=g).tolist()
    stats = GenerationStats()
    synchronize(get_device())
    start = time.perf_counter()
    generate(model, prompts, max_new_tokens=new_tokens, sampling=SamplingParams(greedy=True),
             max_sequence_length=args.prompt_length + args.new_tokens, batch_size=batch, stats=stats)
    synchronize(get_device())
    return time.perf_counter() - start, stats


def _best(runs, key, fastest=max):
    """The best run: the highest rate or (``fastest=min``) the shortest time."""
    return fastest(key(r) for r in runs)


def run_variant(variant: str, args):
    from bam_megatron.inference.cache import cache_bytes_per_token, expected_bytes_per_token, new_context
    from bam_megatron.parallel.device import get_device

    model, cfg, bam = build(variant, args, get_device().type == "cuda")
    model.to(get_device())
    context = new_context(1, args.prompt_length)
    with torch.no_grad():
        tokens = torch.zeros(1, 4, dtype=torch.long, device=get_device())
        model(tokens, torch.arange(4, device=get_device()).unsqueeze(0), None, inference_context=context,
              runtime_gather_output=True)
    per_token = cache_bytes_per_token(context)
    assert per_token == expected_bytes_per_token(cfg, bam, cfg.params_dtype.itemsize, cfg.num_layers)
    row = dict(variant=variant, params_m=sum(p.numel() for p in model.parameters()) / 1e6, kv_bytes_per_token=per_token)
    for name, batch, new in [("latency", 1, args.new_tokens), ("prefill", args.prefill_batch, 1)] + [
        (f"decode_b{b}", b, args.new_tokens) for b in args.decode_batches
    ]:
        _generate(model, args, batch, new)  # warm-up
        runs = [_generate(model, args, batch, new) for _ in range(args.repeats)]
        if name == "latency":
            row["latency_s"] = _best(runs, lambda r: r[0], fastest=min)
        elif name == "prefill":
            row["prefill_tokens_per_s"] = _best(runs, lambda r: r[1].prefill_tokens / r[1].prefill_seconds)
        else:
            row[f"{name}_tokens_per_s"] = _best(runs, lambda r: r[1].decode_tokens / r[1].decode_seconds)
    model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def print_table(rows, args):
    by = {r["variant"]: r for r in rows}
    base = by.get("btx")
    decode_cols = [f"decode_b{b}_tokens_per_s" for b in args.decode_batches]
    head = ["variant", "params (M)", "KV bytes/token", "prefill tok/s"] + [f"decode tok/s b{b}" for b in args.decode_batches]
    head += [f"{args.new_tokens} new tokens (s)", "latency / BTX", "paper"]
    print("| " + " | ".join(head) + " |")
    print("|---" * len(head) + "|")
    for r in rows:
        ratio = r["latency_s"] / base["latency_s"] if base else float("nan")
        r["latency_ratio_to_btx"] = ratio
        if base:
            r["kv_ratio_to_btx"] = r["kv_bytes_per_token"] / base["kv_bytes_per_token"]
            for c in decode_cols + ["prefill_tokens_per_s"]:
                r[c.replace("tokens_per_s", "ratio_to_btx")] = r[c] / base[c]
        paper = PAPER_RATIO.get(r["variant"])
        cells = [r["variant"], f"{r['params_m']:.1f}", f"{r['kv_bytes_per_token']:,.0f}", f"{r['prefill_tokens_per_s']:,.0f}"]
        cells += [f"{r[c]:,.1f}" for c in decode_cols]
        cells += [f"{r['latency_s']:.3f}", f"{ratio:.2f}x", f"{paper:.2f}x" if paper else "-"]
        print("| " + " | ".join(cells) + " |", flush=True)


def main(argv=None):
    args = parse_args(argv)
    from bam_megatron.parallel.distributed import destroy_distributed, init_distributed

    info = init_distributed(seed=1234)
    try:
        name = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
        print(f"# {name}: layers {args.num_layers}, d {args.hidden_size}, heads {args.num_attention_heads} "
              f"(KV groups {args.num_query_groups or args.num_attention_heads}), ffn {args.ffn_hidden_size}, "
              f"vocab {args.vocab_size}, experts {args.experts}, FFN top-{args.topk}, prompt {args.prompt_length}, "
              f"{args.new_tokens} new tokens, prefill batch {args.prefill_batch}, best of {args.repeats}")
        rows = []
        for variant in args.variants.split(","):
            rows.append(run_variant(variant, args))
            print(f"[bench] {variant} done", flush=True)
        print_table(rows, args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "device": name, "rows": rows}, f, indent=1)
        return rows
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
