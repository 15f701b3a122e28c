"""Build a BAM (or dense seed) model: megatron-core's own ``GPTModel`` with BAM layer specs."""

from __future__ import annotations

from typing import Optional

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from bam_megatron.model.config import BAMConfig, validate_bam_setup
from bam_megatron.model.dispatch import enable_local_dispatch
from bam_megatron.model.specs import get_bam_block_spec


def build_bam_model(
    config,
    bam: BAMConfig,
    *,
    vocab_size: int,
    max_sequence_length: int,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    use_te: Optional[bool] = None,
    share_embeddings_and_output_weights: bool = False,
    position_embedding_type: str = "rope",
    rotary_percent: float = 1.0,
    rotary_base: int = 10000,
    parallel_output: bool = True,
    inference: bool = False,
) -> GPTModel:
    """A ``GPTModel`` whose layers are BAM blocks, for this rank's pipeline stage.

    Args:
        config: megatron-core ``TransformerConfig`` (shape, parallel sizes, FFN experts).
        bam: attention experts and block type.
        vocab_size: padded vocabulary size.
        max_sequence_length: longest sequence (position embeddings / RoPE cache).
        pre_process / post_process: embedding / output layer on this stage; default from the
            pipeline rank.
        use_te: force Transformer Engine linears on (True) or off (False); default: when it
            imports.
        inference: the model only runs forward (``inference/load.py`` builds it so, without
            sequence parallelism); relaxes the training-only checks.

    Raises:
        BAMConfigError: an invalid setting, before anything is built.
    """
    validate_bam_setup(config, bam, inference=inference)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    spec = get_bam_block_spec(
        config, bam, use_te, vp_stage=vp_stage, pp_rank=parallel_state.get_pipeline_model_parallel_rank()
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type=position_embedding_type,
        rotary_percent=rotary_percent,
        rotary_base=rotary_base,
        vp_stage=vp_stage,
    )
    enable_local_dispatch(model)  # sync-free MoE dispatch where all experts are local
    return model
