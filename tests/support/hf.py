"""Helpers of the Hugging Face tests: tiny random transformers models built from configs (never
downloaded), our model rebuilt from a checkpoint through ``--use-checkpoint-args``, logits of both.

Weights are redrawn from N(0, 1/fan_in) (norm weights around 1): transformers' 0.02 init gives
nearly flat logits that would hide mapping errors.
"""

from __future__ import annotations

import json
import os

import torch

VOCAB = 256
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def redraw(model, seed: int = 0) -> None:
    """N(0, 1/fan_in) for matrices, 1 + N(0, 0.1) for norm weights, N(0, 0.1) for biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def write_tokenizer(folder: str, vocab: int = VOCAB) -> None:
    """A word-level ``tokenizer.json`` with ``vocab`` tokens (``t0`` ... and ``<eos>``) and its
    ``tokenizer_config.json``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"t{i}": i for i in range(vocab - 1)}
    words["<eos>"] = vocab - 1
    tok = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>"}, f)


def make_hf_model(folder: str, config_class: str, seed: int = 0, tokenizer: bool = True, **overrides):
    """A tiny random ``*ForCausalLM`` of ``config_class`` (e.g. ``"LlamaConfig"``) saved to
    ``folder``; returns the model (fp32, eval)."""
    import transformers

    cfg = getattr(transformers, config_class)(**{**TINY, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    redraw(model, seed)
    model.eval()
    model.save_pretrained(folder)
    if tokenizer:
        write_tokenizer(folder, cfg.vocab_size)
    return model


def tokens(batch: int = 2, seq: int = 16, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def load_ours(ckpt: str):
    """Our model rebuilt from ``ckpt``'s recorded arguments (as every program reads them: the
    opener) with its weights loaded; call inside a process group (``single_process``)."""
    from bam_megatron.checkpoint.opener import open_checkpoint
    from bam_megatron.checkpoint.weights import load_model_weights
    from bam_megatron.model.build import build_bam_model
    from bam_megatron.training.configs import (
        ComputeSettings,
        ParallelLayout,
        bam_config_from_args,
        gpt_model_kwargs,
        transformer_config,
    )

    opened = open_checkpoint(ckpt, tensors="defer")
    args = opened.require_model_args().replace(hidden_dropout=0.0, attention_dropout=0.0)
    model = build_bam_model(transformer_config(args, ParallelLayout(), ComputeSettings()), bam_config_from_args(args),
                            **gpt_model_kwargs(args), parallel_output=False)
    load_model_weights(model, opened)
    model.eval()
    return model


def our_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """``[b, s, V]`` logits of our model (no attention mask: causal)."""
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        return model(ids, pos, None).float()


def model_args(cfg, bam, vocab: int, seq: int, untied: bool = True, position: str = "rope", rotary_base: int = 10000) -> dict:
    """Recorded arguments (``MODEL_ARGS`` names) of a model built from ``cfg`` + ``bam``."""
    return {
        "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "ffn_hidden_size": cfg.ffn_hidden_size,
        "num_attention_heads": cfg.num_attention_heads, "group_query_attention": True,
        "num_query_groups": cfg.num_query_groups, "kv_channels": cfg.kv_channels, "seq_length": seq,
        "max_position_embeddings": seq, "swiglu": cfg.gated_linear_unit, "normalization": cfg.normalization,
        "norm_epsilon": cfg.layernorm_epsilon, "position_embedding_type": position, "rotary_base": rotary_base,
        "rotary_percent": 1.0, "rotary_interleaved": cfg.rotary_interleaved, "untie_embeddings_and_output_weights": untied,
        "add_bias_linear": cfg.add_bias_linear, "add_qkv_bias": cfg.add_qkv_bias, "qk_layernorm": cfg.qk_layernorm,
        "padded_vocab_size": vocab, "num_experts": cfg.num_moe_experts, "moe_ffn_hidden_size": cfg.moe_ffn_hidden_size,
        "moe_router_topk": cfg.moe_router_topk, "moe_router_pre_softmax": cfg.moe_router_pre_softmax,
        "bam_attn_experts": bam.attn_experts, "bam_attn_routing": bam.attn_routing, "bam_attn_topk": bam.attn_topk,
        "bam_attn_topk_renormalize": bam.attn_topk_renormalize, "bam_kv_sharing": bam.kv_sharing,
        "moe_router_type": bam.ffn_router, "moe_shared_expert_intermediate_size": cfg.moe_shared_expert_intermediate_size,
        **dict(zip(("nexus_domain_size", "nexus_projection_size"),
                   bam.nexus_sizes(cfg.hidden_size) if bam.ffn_router == "nexus" else (None, None))),
        "bam_sequential_block": not bam.parallel_block, "tokenizer_type": "NullTokenizer", "vocab_size": vocab - 1,
    }


def save_ours(model, root: str, args: dict) -> None:
    """Save ``model`` (every rank calls this) as a Megatron-LM layout checkpoint recording ``args``."""
    import torch.distributed as dist

    from bam_megatron.checkpoint.weights import save_model_weights

    ckpt = os.path.join(root, "iter_0000000")
    save_model_weights(model, ckpt)
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save({"args": args, "iteration": 0}, os.path.join(ckpt, "common.pt"))
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("0")
    if dist.is_initialized():
        dist.barrier()
