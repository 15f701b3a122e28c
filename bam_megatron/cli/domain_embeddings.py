"""Domain embeddings for the Nexus router: the mean representation of each domain's data.

    python tools/domain_embeddings.py --load ckpt/seed --output ckpt/domains.pt \\
        --domain code:data/code_train_text_document legal:data/legal_train_text_document

For every ``NAME:PREFIX`` (a Megatron indexed dataset, e.g. a domain expert's training data) it
samples ``--tokens`` tokens (whole documents in a seeded random order), runs them through the
checkpoint's model (normally the dense seed: every domain, also one added later, must be
embedded by the same checkpoint) and averages the final hidden states (the output of the final
norm) over those tokens. The output is one small file: the ``[domains, hidden]`` embeddings with
their names, the checkpoint, the datasets and the token counts. ``tools/upcycle_bam.py --router
nexus --domain-embeddings FILE`` and ``tools/add_expert.py --domain-embedding FILE`` read it.
One process (the CPU, or one GPU); the checkpoint may have been saved at any layout.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from bam_megatron.checkpoint.opener.options import add_open_args
from bam_megatron.cli.console import user_error
from bam_megatron.library_messages import quiet_libraries


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="domain_embeddings.py", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--load", required=True, help="The checkpoint whose model embeds the data (normally the dense seed).")
    p.add_argument("--domain", nargs="+", required=True, metavar="NAME:PREFIX", help="Named indexed datasets, one per domain.")
    p.add_argument("--output", "-o", required=True, help="The file to write (a small torch file).")
    p.add_argument("--tokens", type=int, default=65536, help="Tokens sampled per domain (default 65536; all of a smaller dataset).")
    p.add_argument("--seq-length", type=int, default=None, help="Sequence length of the samples (default: the checkpoint's).")
    p.add_argument("--micro-batch-size", type=int, default=8, help="Sequences per forward pass.")
    p.add_argument("--seed", type=int, default=1234, help="Which documents are sampled.")
    p.add_argument("--force", action="store_true", help="Replace an existing --output.")
    p.add_argument("--quiet", "-q", action="store_true", help="No progress lines on stderr.")
    add_open_args(p)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, value in (("--tokens", args.tokens), ("--micro-batch-size", args.micro_batch_size), ("--seq-length", args.seq_length)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if os.path.lexists(args.output) and not args.force:
        print(f"domain_embeddings.py: error: output {args.output} exists; pass --force to replace it", file=sys.stderr)
        return 1
    from bam_megatron.checkpoint.opener import open_checkpoint, open_options
    from bam_megatron.errors import BAMError
    from bam_megatron.training.domain_embeddings import compute_domain_embeddings, parse_domains
    from bam_megatron.upcycle.nexus import save_domain_embeddings

    say = (lambda _m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        domains = parse_domains(args.domain)
        ckpt = open_checkpoint(args.load, what=f"--load {args.load}", options=open_options(args), tensors="defer")
        for note in ckpt.notes:
            say(note)
        result = compute_domain_embeddings(ckpt, domains, tokens=args.tokens, seq_length=args.seq_length,
                                           micro_batch=args.micro_batch_size, seed=args.seed, progress=say)
        save_domain_embeddings(result, args.output)
    except BAMError as exc:
        return user_error("domain_embeddings.py", exc)
    print(f"domain embeddings [{len(result.names)}, {result.dim}] of {', '.join(result.names)} under {ckpt.dir} -> {args.output}")
    return 0
