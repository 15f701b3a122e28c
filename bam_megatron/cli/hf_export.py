"""Export a checkpoint of this project as a Hugging Face model folder.

    python tools/hf_export.py ckpt/bam --output hf/bam
    python -c "from transformers import AutoModelForCausalLM; \\
               m = AutoModelForCausalLM.from_pretrained('hf/bam', trust_remote_code=True)"

Any checkpoint of ``pretrain_bam.py``, ``tools/upcycle_bam.py`` or ``tools/hf_import.py`` (and
Megatron-LM GPT torch_dist checkpoints), at any saved TP / PP / EP layout, becomes safetensors
shards + ``config.json`` + the tokenizer files it records. The class is the first that holds the
model exactly: dense sequential -> Llama / Qwen2 / Qwen3, dense parallel LayerNorm without norm
biases -> Cohere, BTX-style sequential MoE with renormalised top-k -> Mixtral, everything else
(parallel blocks, attention experts, BAM's top-k routing, the Nexus router, a shared FFN expert)
-> ``BAMForCausalLM``, whose code
(``configuration_bam.py``, ``modeling_bam.py``) is copied into the folder: load it with
``trust_remote_code=True``. Streams one layer at a time; writes under ``<output>.tmp-*`` and
renames when complete.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from bam_megatron.checkpoint.opener.options import add_open_args
from bam_megatron.cli.console import stderr_progress, user_error
from bam_megatron.library_messages import quiet_libraries

ARCHITECTURES = ("auto", "llama", "qwen2", "qwen3", "cohere", "mixtral", "bam")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf_export.py", allow_abbrev=False,
                                description="Write a checkpoint of this project as a Hugging Face model folder.")
    p.add_argument("checkpoint", metavar="CKPT", help="Checkpoint root (with the tracker) or one iter_* directory.")
    p.add_argument("--output", "-o", required=True, help="Hugging Face model folder to create.")
    p.add_argument("--architecture", choices=ARCHITECTURES, default="auto",
                   help="Model class to write (default auto: the first native class that holds the model exactly, else bam).")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="Weights dtype (default: as stored).")
    p.add_argument("--max-shard-size-gb", type=float, default=5.0, help="Safetensors shard size (default 5).")
    p.add_argument("--tokenizer", default=None, help="Tokenizer file or folder to ship instead of the one the checkpoint records.")
    p.add_argument("--no-tokenizer", action="store_true", help="Ship no tokenizer files.")
    p.add_argument("--force", action="store_true", help="Replace an existing output (only once the new one is complete).")
    p.add_argument("--no-fsync", dest="fsync", action="store_false", help="Do not fsync written files (faster, not crash-safe).")
    p.add_argument("--quiet", "-q", action="store_true", help="No progress lines on stderr.")
    add_open_args(p)
    return p


def _summary(result) -> str:
    s = result.spec
    what = "dense"
    if s.is_moa or s.is_moe:
        kv = "shared KV" if s.kv_sharing else "KV experts"
        what = (f"{s.attn_experts} attention experts ({kv}, {s.attn_routing} routing), " if s.is_moa else "") + \
               (f"{s.num_experts} FFN experts (top-{s.moe_router_topk})" if s.is_moe else "dense FFN")
    lines = [f"exported {result.architecture} -> {result.output}",
             f"  {s.num_layers} layers, hidden {s.hidden_size}, {'parallel' if s.parallel_block else 'sequential'} blocks, {what}"]
    if result.not_native and result.architecture == "BAMForCausalLM":
        lines.append("  not a native class: " + "; ".join(result.not_native))
    lines.append("  tokenizer: " + (", ".join(sorted(result.tokenizer.files)) if result.tokenizer else "none"))
    lines.append(f"  files: {', '.join(result.files)}")
    lines.append(f"  read {result.bytes_read / 1024**3:.2f} GiB, wrote {result.bytes_written / 1024**3:.2f} GiB, {result.seconds:.1f} s")
    remote = ", trust_remote_code=True" if result.architecture == "BAMForCausalLM" else ""
    lines.append(f"  load it: AutoModelForCausalLM.from_pretrained({result.output!r}{remote})")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    quiet_libraries()
    args = build_parser().parse_args(argv)
    import torch

    from bam_megatron.checkpoint.dcp_writer import release_freed_buffers
    from bam_megatron.checkpoint.opener import open_options
    from bam_megatron.errors import BAMError
    from bam_megatron.hf.exporter import ExportOptions, hf_export

    if args.tokenizer and args.no_tokenizer:
        print("hf_export.py: error: --tokenizer and --no-tokenizer exclude each other", file=sys.stderr)
        return 1
    opts = ExportOptions(
        architecture=args.architecture, dtype=None if args.dtype == "auto" else getattr(torch, args.dtype),
        shard_bytes=int(args.max_shard_size_gb * 1024**3), tokenizer=args.tokenizer, no_tokenizer=args.no_tokenizer,
        sync=args.fsync, force=args.force, open=open_options(args),
    )
    release_freed_buffers()
    progress = stderr_progress(args.quiet)
    try:
        result = hf_export(args.checkpoint, args.output, opts, progress)
    except BAMError as exc:
        return user_error("hf_export.py", exc)
    print(_summary(result), flush=True)
    return 0
