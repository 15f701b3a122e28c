"""Generate text with a trained checkpoint (dense, BTX or BAM), using the KV cache.

    python tools/generate.py --load ckpt/bam --prompt "def fibonacci(n):" --max-new-tokens 48 --greedy
    python tools/generate.py --load ckpt/bam --prompts-file prompts.txt --temperature 0.8 --top-p 0.95
    python tools/generate.py --load ckpt/bam --prompt-token-ids 5,17,3 --output-format json
    torchrun --nproc-per-node 4 tools/generate.py --load ckpt/bam --expert-model-parallel-size 4 ...

The model arguments and the tokenizer come from the checkpoint (``--tokenizer-*`` flags replace
the recorded tokenizer, e.g. when its file moved). Prompts: every ``--prompt``, then every
``--prompt-token-ids``, then the lines of ``--prompts-file`` (a ``.jsonl`` file holds one object
per line with ``"prompt"`` (text) or ``"prompt_ids"`` (token ids)); they are generated in batches
of ``--batch-size`` per data-parallel rank. A sequence ends after ``--max-new-tokens`` tokens, at
the end-of-document token (unless ``--ignore-eos``; ``--eos-id`` names another) or at the model's
context length. Output on stdout: each prompt followed by its completion, or with
``--output-format json`` one JSON object per prompt: ``index``, ``prompt_ids``,
``generated_ids``, ``logprobs`` (the model's log-probability of each new token), and with a
tokenizer ``prompt`` and ``generated_text``. Progress goes to stderr.

Any layout works under torchrun (``--tensor-/--pipeline-/--expert-model-parallel-size``); the
remaining ranks are data-parallel and share the prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional

from bam_megatron.library_messages import quiet_libraries

PROG = "generate.py"


def build_parser() -> argparse.ArgumentParser:
    from bam_megatron.checkpoint.opener.options import add_open_args
    from bam_megatron.data.tokenizer_args import add_tokenizer_args

    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--load", required=True, help="Checkpoint root (with tracker) or iter_* directory.")
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="A prompt (repeatable).")
    g.add_argument("--prompt-token-ids", action="append", default=[], metavar="IDS",
                   help="A prompt as comma-separated token ids, e.g. 1,2,3 (repeatable; needs no tokenizer with --output-format json).")
    g.add_argument("--prompts-file", default=None, metavar="FILE",
                   help="One prompt per line; a .jsonl file: one object per line with \"prompt\" or \"prompt_ids\".")
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=32, help="New tokens per prompt (default 32).")
    g.add_argument("--greedy", action="store_true", help="Argmax decoding (ignores temperature, top-k, top-p).")
    g.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (default 1.0).")
    g.add_argument("--top-k", type=int, default=0, help="Sample among the k most likely tokens (0: all).")
    g.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling threshold (1.0: off).")
    g.add_argument("--seed", type=int, default=1234, help="Sampling seed.")
    g.add_argument("--eos-id", type=int, default=None, help="Stop a sequence after this token (default: the tokenizer's end-of-document).")
    g.add_argument("--ignore-eos", action="store_true", help="Never stop before --max-new-tokens.")
    g.add_argument("--batch-size", type=int, default=8, help="Prompts per forward on each data-parallel rank (default 8).")
    g.add_argument("--output-format", choices=["text", "json"], default="text", help="text (default) or one JSON object per prompt.")
    g.add_argument("--quiet", "-q", action="store_true", help="No progress lines on stderr.")
    g = p.add_argument_group("layout")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1, help="Spreads FFN and attention experts.")
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    g.add_argument("--fp32", action="store_true", help="fp32 on a GPU too (default there: bf16; the CPU always uses fp32).")
    add_tokenizer_args(p)
    add_open_args(p.add_argument_group("checkpoint"))
    return p


def _token_ids(text: str, parser) -> List[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        parser.error(f"--prompt-token-ids {text!r} must be comma-separated integers, e.g. 1,2,3")


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    args.token_prompts = [_token_ids(t, p) for t in args.prompt_token_ids]
    if not (args.prompt or args.token_prompts or args.prompts_file):
        p.error("give at least one prompt: --prompt TEXT, --prompt-token-ids 1,2,3 or --prompts-file FILE")
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    return args


def read_prompts_file(path: str) -> list:
    """Prompts of a file: text lines, or for ``.jsonl`` ``{"prompt": ...}`` / ``{"prompt_ids": [...]}``
    objects. Returns a list of str (text) or list of int (token ids)."""
    from bam_megatron.errors import InferenceError

    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
    except OSError as exc:
        raise InferenceError(f"cannot read --prompts-file {path}: {exc.strerror or exc}") from None
    if not path.endswith(".jsonl"):
        return [line for line in lines if line.strip()]
    prompts = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InferenceError(f"{path}:{n} is not JSON ({exc.msg}); write one object per line") from None
        if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            prompts.append(obj["prompt"])
        elif isinstance(obj, dict) and isinstance(obj.get("prompt_ids"), list) and all(isinstance(i, int) for i in obj["prompt_ids"]):
            prompts.append(list(obj["prompt_ids"]))
        else:
            raise InferenceError(f'{path}:{n} needs "prompt" (text) or "prompt_ids" (a list of token ids)')
    return prompts


def _collect_prompts(args) -> list:
    prompts = list(args.prompt) + list(args.token_prompts)
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file)
    return prompts


def _print_results(results, prompts, tokenizer, fmt: str) -> None:
    for i, (res, raw) in enumerate(zip(results, prompts)):
        if fmt == "json":
            obj = {"index": i, "prompt_ids": res.prompt_ids, "generated_ids": res.generated_ids,
                   "logprobs": [round(x, 6) for x in res.logprobs]}
            if tokenizer is not None:
                obj["prompt"] = raw if isinstance(raw, str) else tokenizer.detokenize(res.prompt_ids)
                obj["generated_text"] = tokenizer.detokenize(res.generated_ids)
            sys.stdout.write(json.dumps(obj) + "\n")
        else:
            sys.stdout.write(f"=== prompt {i} ({len(res.prompt_ids)} tokens, {len(res.generated_ids)} new) ===\n")
            sys.stdout.write(tokenizer.detokenize(res.prompt_ids + res.generated_ids) + "\n")
    sys.stdout.flush()


def _tokenize(tokenizer, prompt: str) -> List[int]:
    """A text prompt's ids; a prompt the checkpoint's tokenizer cannot read (words for a
    NullTokenizer, which reads ids) is one line naming it and the way out."""
    from bam_megatron.errors import InferenceError, TokenizerConfigError

    try:
        return tokenizer.tokenize(prompt)
    except TokenizerConfigError as exc:
        raise InferenceError(
            f"prompt {prompt[:60]!r} cannot be tokenized: {exc}; give the ids with --prompt-token-ids 1,2,3 "
            "(or a checkpoint with a text tokenizer, or --tokenizer-type / --tokenizer-model)"
        ) from None


def run(args) -> int:
    """Load, generate, print (on rank 0). User errors raise ``BAMError``."""
    import torch.distributed as dist

    from bam_megatron.checkpoint.opener import open_checkpoint, open_options
    from bam_megatron.inference.generate import check_prompts, generate
    from bam_megatron.inference.load import build_tokenizer_for, load_model
    from bam_megatron.inference.sampling import SamplingParams
    from bam_megatron.parallel.distributed import destroy_distributed, init_distributed
    from bam_megatron.training.configs import ParallelLayout

    sampling = SamplingParams(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    prompts = _collect_prompts(args)
    ckpt = open_checkpoint(args.load, what=f"--load {args.load}", options=open_options(args), tensors="defer")
    model_args = ckpt.require_model_args()
    need_tokenizer = args.output_format == "text" or any(isinstance(p, str) for p in prompts)
    tokenizer = build_tokenizer_for(
        ckpt, tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model,
        vocab_file=args.vocab_file, merge_file=args.merge_file, vocab_size=args.vocab_size,
    ) if need_tokenizer else None
    ids = [_tokenize(tokenizer, p) if isinstance(p, str) else p for p in prompts]
    eos = None if args.ignore_eos else (args.eos_id if args.eos_id is not None else (tokenizer.eod if tokenizer else None))
    vocab = tokenizer.vocab_size if tokenizer else model_args.padded_vocab_size
    check_prompts(ids, model_args.max_position_embeddings, vocab)  # before any process group
    init_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                     args.expert_model_parallel_size, args.expert_tensor_parallel_size, seed=args.seed)
    try:
        say = (lambda m: print(f"[generate] {m}", file=sys.stderr, flush=True)) if dist.get_rank() == 0 and not args.quiet else None
        for note in ckpt.notes if dist.get_rank() == 0 else []:
            print(note, file=sys.stderr, flush=True)
        start = time.perf_counter()
        layout = ParallelLayout(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                args.expert_model_parallel_size, args.expert_tensor_parallel_size)
        loaded = load_model(ckpt, layout, fp32=args.fp32)
        if say:
            say(f"loaded {ckpt.dir} ({loaded.kind}, iteration {loaded.iteration}, context "
                f"{loaded.max_sequence_length}; {ckpt.verification.summary()}) in {time.perf_counter() - start:.1f} s; "
                f"{len(ids)} prompts")
        start = time.perf_counter()
        results = generate(
            loaded.model, ids, max_new_tokens=args.max_new_tokens, sampling=sampling,
            max_sequence_length=loaded.max_sequence_length, batch_size=args.batch_size, eos_id=eos,
            vocab_size=vocab, progress=say,
        )
        if say:
            new = sum(len(r.generated_ids) for r in results)
            seconds = time.perf_counter() - start
            say(f"{new} new tokens in {seconds:.2f} s ({new / max(seconds, 1e-9):.1f} tokens/s)")
        if dist.get_rank() == 0:
            _print_results(results, prompts, tokenizer, args.output_format)
    finally:
        destroy_distributed()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    quiet_libraries()
    args = parse_args(argv)
    from bam_megatron.errors import BAMError

    try:
        return run(args)
    except BAMError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        sys.stderr.flush()
        return 1


if __name__ == "__main__":
    sys.exit(main())
