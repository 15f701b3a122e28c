"""The Mix phase: build one BAM mixture-of-experts checkpoint from N dense checkpoints.

    python tools/upcycle_bam.py --attention-experts full --output ckpt/bam \\
        ckpt/seed ckpt/code ckpt/law ckpt/math

Seeds come in expert order (the seed first, then the domain experts): expert i's attention (all
of Q, K, V, O with ``full``; Q and O with ``shared-kv``) and FFN are copied from seed i;
embeddings, norms and the output layer (and K/V with ``shared-kv``, the attention with
``merged``, i.e. BTX) are averaged, uniformly or with ``--weights``; routers start fresh.

Nexus (``--router nexus --domain-embeddings FILE``): seed 0's FFN becomes an always-on shared
expert, seeds 1..N-1 the routed FFN experts, and the FFN router computes its logits from the
routed experts' domain embeddings (``tools/domain_embeddings.py``) through a learned projection.

Inputs: checkpoints of ``pretrain_bam.py`` or Megatron-LM GPT torch_dist checkpoints (local or
Transformer-Engine layer names), each a checkpoint root or one ``iter_*`` directory. The output
is one torch_dist checkpoint in Megatron-LM's layout (``<output>/iter_0000000`` + tracker) that
``pretrain_bam.py --load <output> --use-checkpoint-args`` reads at any TP / PP / EP layout.

The seeds are streamed layer by layer (memory: about one layer of one seed, the write buffer
``--part-size-mb`` and the largest averaged tensor), the output is written under
``<output>.tmp-*`` and renamed when complete. Bad input stops the run before anything is
written, with one line naming the problem.
"""

from __future__ import annotations

import argparse
from typing import List, Optional

from bam_megatron.checkpoint.opener.options import add_open_args
from bam_megatron.cli.console import stderr_progress, user_error
from bam_megatron.library_messages import quiet_libraries

# Kept here (not imported from upcycle.mapping) so that --help answers before torch is imported.
MODES = ("full", "shared-kv", "merged")
ROUTER_INITS = ("random", "zero")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="upcycle_bam.py",
        description="Mix N dense checkpoints (seed first, then domain experts) into one BAM "
        "mixture-of-experts checkpoint.",
        allow_abbrev=False,
    )
    p.add_argument("seeds", nargs="+", metavar="CHECKPOINT", help="Dense checkpoints in expert order (root with tracker, or iter_* directory).")
    p.add_argument("--output", "-o", required=True, help="Checkpoint directory to create.")
    p.add_argument("--attention-experts", choices=MODES, default="full",
                   help="full: BAM with KV experts (Q,K,V,O per expert); shared-kv: BAM with Q,O per "
                   "expert and K,V averaged; merged: BTX (attention averaged, FFN experts only). Default full.")
    p.add_argument("--weights", nargs="+", type=float, default=None, metavar="W",
                   help="One weight per seed for the averaged tensors (normalised to sum to 1; default uniform). "
                   "Give it after the checkpoints, or end its list with --.")
    p.add_argument("--expert-names", nargs="+", default=None, metavar="NAME",
                   help="One name per seed, in order (recorded in the checkpoint; routing heatmaps label experts with them). "
                   "Default: the seeds' directory names. Give it after the checkpoints, or end its list with --.")
    p.add_argument("--router-init", choices=ROUTER_INITS, default="random", help="Router weights: random normal or zero.")
    p.add_argument("--router-std", type=float, default=None, help="Std of random routers (default: the seeds' --init-method-std).")
    p.add_argument("--seed", type=int, default=1234, help="Random seed of the router init.")
    p.add_argument("--moe-router-topk", type=int, default=1, help="FFN experts per token recorded for training (default 1, BAM).")
    p.add_argument("--moe-router-pre-softmax", action=argparse.BooleanOptionalAction, default=True,
                   help="Softmax over all experts before top-k (BAM, default); --no-moe-router-pre-softmax: softmax over the chosen k (BTX).")
    g = p.add_argument_group("FFN router (Nexus: Gritsch et al. 2024)")
    g.add_argument("--router", choices=["linear", "nexus"], default="linear",
                   help="linear: megatron-core's router (default); nexus: expert embeddings projected from domain embeddings.")
    g.add_argument("--shared-expert", action=argparse.BooleanOptionalAction, default=None,
                   help="Seed 0's FFN as an always-on shared expert, seeds 1..N-1 the routed FFN experts (default: on with --router nexus, off otherwise).")
    g.add_argument("--domain-embeddings", default=None, metavar="FILE", help="Nexus: the domain embeddings of the routed experts (tools/domain_embeddings.py).")
    g.add_argument("--domains", default=None, metavar="NAME,NAME,...",
                   help="Nexus: which domains of --domain-embeddings, in expert order, comma-separated (default: all, in the file's order).")
    g.add_argument("--nexus-projection-size", type=int, default=None, help="Nexus: hidden size of the SwiGLU projection (default: the hidden size).")
    p.add_argument("--attn-routing", choices=["soft", "topk"], default="soft", help="Attention routing recorded for training (default soft).")
    p.add_argument("--attn-topk", type=int, default=1, help="k for --attn-routing topk.")
    g = p.add_argument_group("training settings recorded for the MoE (default: the seeds'; --use-checkpoint-args restores them unless the training command line gives them)")
    g.add_argument("--hidden-dropout", type=float, default=None, help="Dropout after attention and FFN.")
    g.add_argument("--attention-dropout", type=float, default=None, help="Dropout on attention probabilities.")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=None, help="Load-balancing loss coefficient (BTX: 0.01).")
    g.add_argument("--moe-z-loss-coeff", type=float, default=None, help="Router z-loss coefficient.")
    g.add_argument("--moe-router-load-balancing-type", choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"], default=None, help="Load-balancing method.")
    p.add_argument("--force", action="store_true", help="Replace an existing output (only once the new one is complete).")
    p.add_argument("--part-size-mb", type=float, default=128,
                   help="Write buffer: the output is saved in parts of about this size (at most three in memory), then merged (default 128).")
    p.add_argument("--no-fsync", dest="fsync", action="store_false", help="Do not fsync written files (faster, not crash-safe).")
    p.add_argument("--crc32", action="store_true",
                   help="Store zip CRC-32 checksums with every tensor (torch.load never checks them; off by "
                   "default because computing them halves the write speed).")
    p.add_argument("--quiet", "-q", action="store_true", help="No progress lines on stderr.")
    add_open_args(p)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    quiet_libraries()
    args = build_parser().parse_args(argv)
    from bam_megatron.checkpoint.dcp_writer import release_freed_buffers
    from bam_megatron.checkpoint.opener import open_options
    from bam_megatron.errors import BAMError
    from bam_megatron.upcycle.mix import format_summary, upcycle
    from bam_megatron.upcycle.plan import UpcycleOptions

    opts = UpcycleOptions(
        mode=args.attention_experts,
        weights=args.weights,
        router_init=args.router_init,
        router_std=args.router_std,
        seed=args.seed,
        moe_router_topk=args.moe_router_topk,
        moe_router_pre_softmax=args.moe_router_pre_softmax,
        attn_routing=args.attn_routing,
        attn_topk=args.attn_topk,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        moe_z_loss_coeff=args.moe_z_loss_coeff,
        moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        expert_names=args.expert_names,
        router=args.router,
        shared_expert=args.shared_expert,
        domain_embeddings=args.domain_embeddings,
        domains=[d for d in args.domains.split(",") if d] if args.domains else None,
        nexus_projection_size=args.nexus_projection_size,
    )
    release_freed_buffers()
    progress = stderr_progress(args.quiet)
    try:
        result = upcycle(
            args.seeds, args.output, opts, force=args.force,
            part_bytes=int(args.part_size_mb * 1024**2), sync=args.fsync, crc32=args.crc32, progress=progress,
            options=open_options(args),
        )
    except BAMError as exc:
        return user_error("upcycle_bam.py", exc)
    print(format_summary(result), flush=True)
    return 0

