"""Shared pieces of the generation tests: the four model kinds at one tiny shape, prompts, and
greedy decoding by full recomputation (no KV cache) as the reference."""

from __future__ import annotations

import torch

N_EXPERTS = 4
CONTEXT = 24
MAX_NEW = 6
# Lengths chosen so that batches mix short and long prompts and one prompt reaches the context.
PROMPT_LENGTHS = (3, 7, 5, 1, 9, 4, 20, 2)
KINDS = ("dense", "BTX", "BAM KV experts", "BAM shared KV")


def kind_configs(kind: str, tp: int = 1, pp: int = 1, ep: int = 1):
    """``(TransformerConfig, BAMConfig)`` of one model kind: 2 layers, 4 heads in 2 query groups,
    4 attention and/or FFN experts (top-1), weights large enough for clear argmaxes."""
    from bam_megatron.model.config import BAMConfig
    from support.models import moe_overrides, tiny_config

    moe = moe_overrides(N_EXPERTS, 1, True) if kind != "dense" else {}
    cfg = tiny_config(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        pipeline_dtype=torch.float32,
        num_query_groups=2,
        init_method_std=0.3,
        **moe,
    )
    attn = N_EXPERTS if kind.startswith("BAM") else 1
    return cfg, BAMConfig(attn_experts=attn, kv_sharing=kind == "BAM shared KV")


def build(kind: str, tp: int = 1, pp: int = 1, ep: int = 1):
    """This rank's model of ``kind`` for inference (eval mode)."""
    from bam_megatron.model.build import build_bam_model
    from support.models import VOCAB

    cfg, bam = kind_configs(kind, tp, pp, ep)
    model = build_bam_model(cfg, bam, vocab_size=VOCAB, max_sequence_length=CONTEXT, inference=True)
    return model.eval()


def prompts(seed: int = 0):
    """Token-id prompts of ``PROMPT_LENGTHS``."""
    from support.models import VOCAB

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def greedy_by_recompute(model, prompt_list, max_new: int, context: int):
    """Greedy continuation of every prompt, recomputing the whole sequences for every new token
    (no cache): one forward per step over all sequences, right-padded (causal attention: the
    padding after a sequence's last token does not change its logits). Every rank runs every
    prompt, so the ranks' forward calls line up."""
    from bam_megatron.inference.pipeline import broadcast_from_last_stage, forward_logits, is_last_stage

    seqs = [list(p) for p in prompt_list]
    ends = [min(len(p) + max_new, context) for p in prompt_list]
    with torch.no_grad():
        while any(len(s) < e for s, e in zip(seqs, ends)):
            width = max(len(s) for s in seqs)
            tokens = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
            positions = torch.arange(width).unsqueeze(0).expand(len(seqs), -1)
            logits = forward_logits(model, tokens, positions)
            last = torch.tensor([len(s) - 1 for s in seqs])
            nxt = logits[torch.arange(len(seqs)), last].argmax(-1) if is_last_stage() else None
            nxt = broadcast_from_last_stage(nxt, (len(seqs),), torch.long, tokens.device)
            for s, e, t in zip(seqs, ends, nxt.tolist()):
                if len(s) < e:
                    s.append(t)
    return [s[len(p):] for s, p in zip(seqs, prompt_list)]
