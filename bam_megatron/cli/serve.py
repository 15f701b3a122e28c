"""Serve an exported model behind an OpenAI-compatible HTTP endpoint (transformers' own server).

    python tools/hf_export.py ckpt/bam -o hf/bam
    python tools/serve.py hf/bam --port 8000                   # or bam-serve
    python -c "from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-'); \\
               print(c.completions.create(model='hf/bam', prompt='def ', max_tokens=16, temperature=0).choices[0].text)"

``transformers serve`` looks a model's class up as ``getattr(transformers, architectures[0])``,
where ``BAMForCausalLM`` (remote code beside the weights) is not. This program registers the
class with transformers (``bam_megatron.hf.registry``) and runs transformers' server
(``transformers.cli.serve.Serve``, needs ``pip install 'bam-megatron[serve]'``) pinned to the
folder: ``/v1/completions``, ``/v1/chat/completions`` (with the chat template the tokenizer
carries), ``/v1/responses``, ``/v1/models``, ``/health``. Requests name the model as the folder
was given here. Every folder ``hf_export.py`` writes (Llama, Qwen, Cohere, Mixtral too) serves
the same way. Stops on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from bam_megatron.cli.console import user_error
from bam_megatron.library_messages import quiet_libraries

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve.py", allow_abbrev=False,
                                description="Serve an exported model behind an OpenAI-compatible endpoint (transformers serve).")
    p.add_argument("folder", metavar="HF_DIR", help="A Hugging Face model folder written by hf_export.py (with its tokenizer).")
    p.add_argument("--host", default="127.0.0.1", help="Address to listen on (default 127.0.0.1: this machine only).")
    p.add_argument("--port", type=int, default=8000, help="Port (default 8000).")
    p.add_argument("--device", default="auto", help="Device: auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", help="Weights dtype: auto (as stored; default), float32, bfloat16, float16.")
    p.add_argument("--attn-implementation", default=None, choices=["eager", "sdpa", "flex_attention"],
                   help="Attention implementation (default: transformers' choice, sdpa).")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="Run the model code copied into the folder instead of this package's copy of it.")
    p.add_argument("--log-level", default="warning", help="transformers' log level (default warning).")
    return p


def check_folder(folder: str) -> None:
    """What the server needs before it starts: the folder, its config and its tokenizer."""
    from bam_megatron.errors import HFError

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise HFError(f"{folder} has no config.json; pass a model folder written by hf_export.py")
    if not any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
        raise HFError(f"{folder} has no tokenizer files; export it with its tokenizer (hf_export.py without "
                      "--no-tokenizer, or --tokenizer PATH)")
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise HFError("serving needs transformers' serving packages (fastapi, uvicorn, openai): "
                      "pip install 'bam-megatron[serve]'")


def main(argv: Optional[List[str]] = None) -> int:
    quiet_libraries()
    args = build_parser().parse_args(argv)
    from bam_megatron.errors import BAMError

    try:
        check_folder(args.folder)
    except BAMError as exc:
        return user_error("serve.py", exc)
    from transformers.cli.serve import Serve

    from bam_megatron.hf.registry import register

    register()
    print(f"[serve] {args.folder} at http://{args.host}:{args.port}/v1 (requests name the model {args.folder!r})",
          file=sys.stderr, flush=True)
    Serve(force_model=args.folder, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
          attn_implementation=args.attn_implementation, trust_remote_code=args.trust_remote_code, log_level=args.log_level)
    return 0
