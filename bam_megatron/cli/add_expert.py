"""Add an expert to a mixture of experts (Nexus' extension; Gritsch et al. 2024).

    python tools/add_expert.py ckpt/bam ckpt/expert_math --domain-embedding ckpt/math_domain.pt \\
        --output ckpt/bam_plus_math

MOE_CKPT is a BAM or BTX checkpoint (the output of upcycle_bam.py, or a trained one); DENSE_CKPT a
dense model of the same architecture and tokenizer (a new domain expert branched from the same
seed). The dense model's FFN becomes FFN expert n and, for BAM, its attention attention expert N;
the new expert's router entry is its domain embedding through the MoE's trained projection
(Nexus router; --domain-embedding from tools/domain_embeddings.py, computed under the same
checkpoint as the MoE's) or, for linear routers, the mean of the existing rows; every other
tensor (embeddings, norms, output layer; K/V with shared KV; BTX's attention) becomes
(1-λ)·MoE + λ·dense with λ = 1/(n+1), n the dense models already in the MoE. The output is one
checkpoint at iteration 0 (no optimizer state) for a short fine-tune:
pretrain_bam.py --pretrained-checkpoint OUT --use-checkpoint-args ... at any layout.

Streamed layer by layer, written under OUT.tmp-* and renamed when complete; bad input stops it
before anything is written, with one line naming the problem.
"""

from __future__ import annotations

import argparse
from typing import List, Optional

from bam_megatron.checkpoint.opener.options import add_open_args
from bam_megatron.cli.console import stderr_progress, user_error
from bam_megatron.library_messages import quiet_libraries


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="add_expert.py", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("moe", metavar="MOE_CKPT", help="The mixture of experts to extend (root with tracker, or iter_* directory).")
    p.add_argument("dense", metavar="DENSE_CKPT", help="The dense model whose FFN (and attention) becomes the new expert.")
    p.add_argument("--output", "-o", required=True, help="Checkpoint directory to create.")
    p.add_argument("--domain-embedding", default=None, metavar="FILE",
                   help="The new expert's domain embedding (tools/domain_embeddings.py); required for a Nexus router.")
    p.add_argument("--domain", default=None, metavar="NAME", help="Which domain of --domain-embedding (when it holds several).")
    p.add_argument("--merge-weight", type=float, default=None, metavar="LAMBDA",
                   help="λ, the dense model's weight in the merged tensors (default 1/(n+1)).")
    p.add_argument("--force", action="store_true", help="Replace an existing output (only once the new one is complete).")
    p.add_argument("--part-size-mb", type=float, default=128, help="Write buffer: parts of about this size (default 128).")
    p.add_argument("--no-fsync", dest="fsync", action="store_false", help="Do not fsync written files (faster, not crash-safe).")
    p.add_argument("--quiet", "-q", action="store_true", help="No progress lines on stderr.")
    add_open_args(p)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    quiet_libraries()
    args = build_parser().parse_args(argv)
    from bam_megatron.checkpoint.dcp_writer import release_freed_buffers
    from bam_megatron.checkpoint.opener import open_options
    from bam_megatron.errors import BAMError
    from bam_megatron.upcycle.add_expert import AddExpertOptions, add_expert, format_summary

    opts = AddExpertOptions(domain_embedding=args.domain_embedding, domain=args.domain, merge_weight=args.merge_weight)
    release_freed_buffers()
    progress = stderr_progress(args.quiet)
    try:
        result = add_expert(args.moe, args.dense, args.output, opts, force=args.force,
                            part_bytes=int(args.part_size_mb * 1024**2), sync=args.fsync, progress=progress,
                            options=open_options(args))
    except BAMError as exc:
        return user_error("add_expert.py", exc)
    print(format_summary(result), flush=True)
    return 0
