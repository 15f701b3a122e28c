"""A checkpoint -> its model, ready for generation or scoring, at this run's parallel layout.

    ckpt = open_checkpoint("ckpt/bam", options=..., tensors="defer")   # before any process group
    tokenizer = build_tokenizer_for(ckpt)
    init_distributed(tp, pp, ep)
    loaded = load_model(ckpt, ParallelLayout(tp, pp, ep))
    loaded.model(tokens, position_ids, None)

The model is the one the checkpoint records (``Checkpoint.model``, read once by
``checkpoint/opener``: the shape, the experts, the vocabulary; this project's checkpoints and
Megatron-LM's, whose Transformer Engine norm names are mapped), so it loads without restating
anything. It is built for inference: eval mode, no dropout, no sequence parallelism (the KV cache
and the last-token logits of megatron-core's inference path need whole sequences on every
tensor-parallel rank), weights read from the checkpoint at whatever layout it was saved, after its
tensor data was verified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from bam_megatron.checkpoint.opener import Checkpoint
from bam_megatron.errors import ConfigError
from bam_megatron.model.model_args import ModelArgs
from bam_megatron.training.configs import ComputeSettings, ParallelLayout


def build_tokenizer_for(ckpt: Checkpoint, **overrides):
    """The tokenizer the checkpoint records, with ``overrides`` (``tokenizer_model=...``; None:
    not given); checks that it fits the model's vocabulary.

    Raises:
        CheckpointError: a recorded tokenizer file is missing and no override replaces it.
        TokenizerConfigError: the tokenizer cannot be built.
        ConfigError: the tokenizer has more tokens than the model's (padded) vocabulary.
    """
    from bam_megatron.data.tokenizers import build_tokenizer_from_args

    model = ckpt.require_model_args()
    tokenizer = build_tokenizer_from_args(ckpt.require_tokenizer(**overrides))
    if tokenizer.vocab_size > model.padded_vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary has "
            f"{model.padded_vocab_size}; use the checkpoint's tokenizer"
        )
    return tokenizer


@dataclass
class LoadedModel:
    """This rank's model and what describes it."""

    model: object  # megatron-core GPTModel, eval mode
    model_args: ModelArgs
    config: object  # TransformerConfig
    bam: object  # BAMConfig
    checkpoint: str
    iteration: int

    @property
    def max_sequence_length(self) -> int:
        """The longest sequence (prompt + new tokens) the model was built for."""
        return int(self.model_args.max_position_embeddings)

    @property
    def kind(self) -> str:
        """``dense``, ``BTX``, ``BAM shared KV`` or ``BAM KV experts``."""
        if self.bam.is_moa:
            return "BAM shared KV" if self.bam.kv_sharing else "BAM KV experts"
        return "BTX" if self.config.num_moe_experts else "dense"


def load_model(ckpt: Checkpoint, layout: Optional[ParallelLayout] = None, *, fp32: bool = False) -> LoadedModel:
    """Build the checkpoint's model for this rank (process groups initialised at ``layout``'s
    sizes) and load its weights (verified first, collectively).

    Raises:
        BAMConfigError / ConfigError: the layout does not fit the model.
        CheckpointError: the checkpoint records no model, is damaged, or its weights do not fit.
    """
    from bam_megatron.checkpoint.weights import load_model_weights
    from bam_megatron.model.build import build_bam_model
    from bam_megatron.parallel.device import get_device
    from bam_megatron.training.configs import bam_config_from_args, gpt_model_kwargs, transformer_config

    layout = layout or ParallelLayout()
    model_args = ckpt.require_model_args().replace(hidden_dropout=0.0, attention_dropout=0.0)
    tp = layout.tensor_model_parallel_size
    if model_args.padded_vocab_size % tp:
        raise ConfigError(
            f"the model's vocabulary of {model_args.padded_vocab_size} does not divide by "
            f"--tensor-model-parallel-size {tp}; choose a size that divides it"
        )
    layout = ParallelLayout(tp, layout.pipeline_model_parallel_size, layout.expert_model_parallel_size,
                            layout.expert_tensor_parallel_size, sequence_parallel=False)
    config = transformer_config(model_args, layout, ComputeSettings(fp32=fp32))
    config.perform_initialization = False  # every weight comes from the checkpoint
    bam = bam_config_from_args(model_args)
    model = build_bam_model(config, bam, **gpt_model_kwargs(model_args), inference=True).to(get_device())
    load_model_weights(model, ckpt)
    model.eval()
    return LoadedModel(model, model_args, config, bam, ckpt.dir, ckpt.iteration)
