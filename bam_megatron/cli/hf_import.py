"""Import a local Hugging Face model folder as a checkpoint of this project.

    python tools/hf_import.py path/to/Llama-3.2-1B --output ckpt/seed
    python pretrain_bam.py --pretrained-checkpoint ckpt/seed --use-checkpoint-args \
        --load ckpt/seed_trained --save ckpt/seed_trained ...              # train it (the import stays as it is)
    python tools/upcycle_bam.py -o ckpt/bam ckpt/seed ckpt/code ...         # or mix it

Reads ``config.json`` and the safetensors weights (sharded or not; no hub access) of
``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM`` or
``CohereForCausalLM`` (a dense checkpoint), or this project's own ``BAMForCausalLM`` exports (e.g.
fine-tuned with PEFT LoRA and merged; the checkpoint of the model they hold: BTX, BAM, Nexus), and
writes one torch_dist checkpoint in Megatron-LM's layout recording the model and tokenizer arguments, with the tokenizer files copied to ``<output>/tokenizer/``.
Anything the model cannot represent exactly (RoPE scaling, a sliding window shorter than the
sequence, biases it lacks, another architecture) stops it before anything is written, with one
line naming the field. Streams one layer at a time; writes under ``<output>.tmp-*`` and renames
when complete.
"""

from __future__ import annotations

import argparse
from typing import List, Optional

from bam_megatron.cli.console import stderr_progress, user_error
from bam_megatron.library_messages import quiet_libraries

DTYPES = ("auto", "float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf_import.py", allow_abbrev=False,
                                description="Convert a local Hugging Face model folder into a checkpoint of this project.")
    p.add_argument("hf_dir", metavar="HF_DIR", help="Folder with config.json and *.safetensors (save_pretrained output).")
    p.add_argument("--output", "-o", required=True, help="Checkpoint directory to create.")
    p.add_argument("--seq-length", type=int, default=None,
                   help="Training sequence length to record (default: max_position_embeddings, at most 4096).")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="Pad the vocabulary (embedding rows, zeros) to a multiple of this (default 128).")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="Weights dtype of the checkpoint (default: as stored).")
    p.add_argument("--force", action="store_true", help="Replace an existing output (only once the new one is complete).")
    p.add_argument("--part-size-mb", type=float, default=128, help="Write buffer: parts of about this size (default 128).")
    p.add_argument("--no-fsync", dest="fsync", action="store_false", help="Do not fsync written files (faster, not crash-safe).")
    p.add_argument("--quiet", "-q", action="store_true", help="No progress lines on stderr.")
    return p


def _trained(output: str) -> str:
    """A folder beside the import for training it (``--load`` / ``--save``)."""
    return output.rstrip("/") + "_trained"


def _summary(result) -> str:
    s, a = result.spec, result.args
    lines = [
        f"imported {result.architecture} -> {result.output}",
        f"  {s.num_layers} layers, hidden {s.hidden_size}, {s.num_attention_heads} heads ({s.num_query_groups} KV groups, "
        f"head dim {s.head_dim}), FFN {s.ffn_hidden_size}, vocabulary {s.vocab_size}, {s.normalization}, "
        f"{'parallel' if s.parallel_block else 'sequential'} blocks, RoPE base {s.rotary_base}"
        f"{' (interleaved)' if s.rotary_interleaved else ''}, sequence {s.seq_length}",
        "  tokenizer: " + (f"{a['tokenizer_type']} {a.get('tokenizer_model') or a.get('vocab_file')} (relative to the checkpoint)"
                           if result.tokenizer else "none (pass the tokenizer flags when training)"),
        *(f"  note: {n}" for n in result.notes),
        f"  read {result.bytes_read / 1024**3:.2f} GiB, wrote {result.bytes_written / 1024**3:.2f} GiB, {result.seconds:.1f} s",
        f"  train it (into its own folder; the import stays as it is): python pretrain_bam.py --pretrained-checkpoint "
        f"{result.output} --use-checkpoint-args --load {_trained(result.output)} --save {_trained(result.output)} ...",
    ]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    quiet_libraries()
    args = build_parser().parse_args(argv)
    import torch

    from bam_megatron.checkpoint.dcp_writer import release_freed_buffers
    from bam_megatron.errors import BAMError
    from bam_megatron.hf.importer import ImportOptions, hf_import

    opts = ImportOptions(
        seq_length=args.seq_length, vocab_multiple=args.make_vocab_size_divisible_by,
        dtype=None if args.dtype == "auto" else getattr(torch, args.dtype),
        part_bytes=int(args.part_size_mb * 1024**2), sync=args.fsync, force=args.force,
    )
    release_freed_buffers()
    progress = stderr_progress(args.quiet)
    try:
        result = hf_import(args.hf_dir, args.output, opts, progress)
    except BAMError as exc:
        return user_error("hf_import.py", exc)
    print(_summary(result), flush=True)
    return 0
