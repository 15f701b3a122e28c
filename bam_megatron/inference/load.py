"""A checkpoint -> its model, ready for generation or scoring, at this run's parallel layout.

    args, ckpt_dir = checkpoint_model_args("ckpt/bam")            # before any process group
    init_distributed(tp, pp, ep)
    loaded = load_model(args, ckpt_dir, tensor_model_parallel_size=tp, ...)
    loaded.model(tokens, position_ids, None)

The model arguments come from the checkpoint (what ``pretrain_bam.py --use-checkpoint-args``
restores: the shape, the experts, the vocabulary, the tokenizer), so any checkpoint of
``pretrain_bam.py`` or ``tools/upcycle_bam.py`` — or a Megatron-LM GPT checkpoint with the
local layer names — loads without restating them. The model is built for inference: eval mode,
no dropout, no sequence parallelism (the KV cache and the last-token logits of megatron-core's
inference path need whole sequences on every tensor-parallel rank), weights read from the
checkpoint at whatever layout it was saved.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional, Tuple

from bam_megatron.checkpoint.common import plain_args, read_common
from bam_megatron.checkpoint.layout import resolve_checkpoint_dir
from bam_megatron.data.tokenizer_args import TOKENIZER_ARGS
from bam_megatron.errors import CheckpointError, ConfigError
from bam_megatron.training.arguments import MODEL_ARGS, build_parser

# What a checkpoint contributes besides the architecture.
_CARRIED = TOKENIZER_ARGS + ("make_vocab_size_divisible_by", "init_method_std")


def checkpoint_model_args(load: str, **tokenizer_overrides) -> Tuple[argparse.Namespace, str]:
    """The model and tokenizer arguments recorded in checkpoint ``load``.

    Args:
        load: a checkpoint root (with its tracker) or one ``iter_*`` directory.
        tokenizer_overrides: ``tokenizer_type``, ``tokenizer_model``, ... to use instead of the
            recorded ones (e.g. the tokenizer file moved); None values are ignored.

    Returns:
        ``(args, checkpoint_dir)``: ``pretrain_bam.py``'s argument namespace with the
        checkpoint's model arguments (dropout 0), and the resolved ``iter_*`` directory.

    Raises:
        CheckpointError: not a checkpoint, or one that records no model arguments.
    """
    ckpt_dir = resolve_checkpoint_dir(load, f"--load {load}")
    saved = plain_args(read_common(ckpt_dir).get("args"))
    missing = [n for n in ("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size") if saved.get(n) is None]
    if missing:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} does not record its model arguments ({missing[0]} is absent); "
            "use a checkpoint written by pretrain_bam.py or tools/upcycle_bam.py"
        )
    args = build_parser().parse_args([])
    for name in MODEL_ARGS + _CARRIED:
        if name in saved:
            setattr(args, name, saved[name])
    for name, value in tokenizer_overrides.items():
        if value is not None:
            setattr(args, name, value)
    if args.num_query_groups is None:
        args.num_query_groups = args.num_attention_heads
    if args.kv_channels is None:
        args.kv_channels = args.hidden_size // args.num_attention_heads
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    args.hidden_dropout = args.attention_dropout = 0.0
    args.sequence_parallel = False
    args.load = ckpt_dir
    return args, ckpt_dir


def build_tokenizer_for(args):
    """The tokenizer the checkpoint records (or the overrides given to
    ``checkpoint_model_args``); checks that it fits the model's vocabulary.

    Raises:
        TokenizerConfigError: the tokenizer cannot be built (e.g. its file moved: pass
            ``--tokenizer-model``).
        ConfigError: the tokenizer has more tokens than the model's (padded) vocabulary.
    """
    from bam_megatron.data.tokenizers import build_tokenizer_from_args

    tokenizer = build_tokenizer_from_args(args)
    if tokenizer.vocab_size > args.padded_vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary has "
            f"{args.padded_vocab_size}; use the checkpoint's tokenizer"
        )
    return tokenizer


@dataclass
class LoadedModel:
    """This rank's model and what describes it."""

    model: object  # megatron-core GPTModel, eval mode
    args: argparse.Namespace
    config: object  # TransformerConfig
    bam: object  # BAMConfig
    checkpoint: str
    iteration: int

    @property
    def max_sequence_length(self) -> int:
        """The longest sequence (prompt + new tokens) the model was built for."""
        return int(self.args.max_position_embeddings)

    @property
    def kind(self) -> str:
        """``dense``, ``BTX``, ``BAM shared KV`` or ``BAM KV experts``."""
        if self.bam.is_moa:
            return "BAM shared KV" if self.bam.kv_sharing else "BAM KV experts"
        return "BTX" if self.config.num_moe_experts else "dense"


def load_model(
    args: argparse.Namespace,
    ckpt_dir: str,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: Optional[int] = None,
    fp32: bool = False,
) -> LoadedModel:
    """Build the checkpoint's model for this rank (process groups initialised at these sizes)
    and load its weights.

    Raises:
        BAMConfigError / ConfigError: the layout does not fit the model.
        CheckpointError: the weights do not fit the model.
    """
    from bam_megatron.checkpoint.weights import load_model_weights
    from bam_megatron.model.build import build_bam_model
    from bam_megatron.parallel.device import get_device
    from bam_megatron.training.configs import bam_config_from_args, gpt_model_kwargs, transformer_config_from_args

    args.tensor_model_parallel_size = tensor_model_parallel_size
    args.pipeline_model_parallel_size = pipeline_model_parallel_size
    args.expert_model_parallel_size = expert_model_parallel_size
    args.expert_tensor_parallel_size = expert_tensor_parallel_size
    args.fp32 = fp32
    if args.padded_vocab_size % tensor_model_parallel_size:
        raise ConfigError(
            f"the model's vocabulary of {args.padded_vocab_size} does not divide by "
            f"--tensor-model-parallel-size {tensor_model_parallel_size}; choose a size that divides it"
        )
    config = transformer_config_from_args(args)
    config.perform_initialization = False  # every weight comes from the checkpoint
    bam = bam_config_from_args(args)
    model = build_bam_model(config, bam, **gpt_model_kwargs(args), inference=True).to(get_device())
    load_model_weights(model, ckpt_dir)
    model.eval()
    iteration = int(read_common(ckpt_dir).get("iteration", 0))
    return LoadedModel(model, args, config, bam, ckpt_dir, iteration)
