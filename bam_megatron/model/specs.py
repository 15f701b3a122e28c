"""megatron-core layer specs for BAM models.

``get_bam_block_spec`` returns the ``TransformerBlockSubmodules`` that megatron-core's own
``GPTModel`` takes as ``transformer_layer_spec``: every layer is a BAM block (parallel by
default, sequential on request) whose attention is megatron-core's ``SelfAttention`` with torch
SDPA (one attention expert) or the fused Mixture of Attention (N > 1), and whose FFN is
megatron-core's dense ``MLP`` or its ``MoELayer`` (experts: ``SequentialMLP`` with a grouped-GEMM
forward on GPU, see ``experts.py``; router: megatron-core's linear ``TopKRouter`` or the Nexus
router of ``nexus_router.py``, set as the spec's router builder — the layer stays megatron-core's
own ``MoELayer``; a shared expert when ``moe_shared_expert_intermediate_size`` is set). The final
norm is the sequence-parallel capable torch norm.

Linear layers come from Transformer Engine when ``transformer_engine`` imports (and ``use_te`` is
not False), otherwise from megatron-core's local (pure PyTorch) modules.
"""

from __future__ import annotations

from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from bam_megatron.model.config import BAMConfig
from bam_megatron.model.experts import GroupedGemmExperts
from bam_megatron.model.layer import BAMParallelTransformerLayer
from bam_megatron.model.moa import MixtureOfAttention
from bam_megatron.model.nexus_router import NexusConfig, nexus_router_builder
from bam_megatron.model.norm import Norm
from bam_megatron.model.sdpa import SDPAttention


def transformer_engine_available() -> bool:
    """True when Transformer Engine imports (its modules are then used for the linears)."""
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a broken build raising at import
        return False
    return True


def _backend(use_te: Optional[bool]):
    if use_te is None:
        use_te = transformer_engine_available()
    if use_te:
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    return LocalSpecProvider()


def attention_spec(bam: BAMConfig, backend, qk_layernorm: bool = False) -> ModuleSpec:
    """Dense attention (N = 1) or the Mixture of Attention (N > 1). ``qk_layernorm``: dense
    attention normalises every query and key head (``config.normalization`` over the head
    dimension, one weight shared by the heads) before RoPE."""
    qk_norm = Norm if qk_layernorm else IdentityOp
    if bam.is_moa:
        return ModuleSpec(
            module=MixtureOfAttention,
            params={"bam_config": bam, "attn_mask_type": AttnMaskType.causal},
        )
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=backend.column_parallel_linear(),
            core_attention=SDPAttention,
            linear_proj=backend.row_parallel_linear(),
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
    )


def ffn_spec(num_moe_experts: Optional[int], backend, moe_grouped_gemm: bool = False, router=None) -> ModuleSpec:
    """Dense MLP, or megatron-core's MoELayer with ``num_moe_experts`` experts (``router``: a
    router builder in place of megatron-core's ``TopKRouter``)."""
    if num_moe_experts is None:
        return ModuleSpec(
            module=MLP,
            submodules=MLPSubmodules(
                linear_fc1=backend.column_parallel_linear(),
                linear_fc2=backend.row_parallel_linear(),
            ),
        )
    spec = get_moe_module_spec_for_backend(
        backend=backend, num_experts=num_moe_experts, moe_grouped_gemm=moe_grouped_gemm
    )
    if spec.submodules.experts.module is SequentialMLP:
        # Same module and checkpoint, plus a grouped-GEMM forward on GPU.
        spec.submodules.experts.module = GroupedGemmExperts
    if router is not None:
        spec.submodules.router = router
    return spec


def ffn_router_builder(config, bam: BAMConfig):
    """The FFN router builder for ``bam.ffn_router`` (None: megatron-core's ``TopKRouter``)."""
    if bam.ffn_router != "nexus" or config.num_moe_experts is None:
        return None
    return nexus_router_builder(NexusConfig(*bam.nexus_sizes(config.hidden_size)))


def get_bam_layer_spec(
    config, bam: BAMConfig, use_te: Optional[bool] = None
) -> ModuleSpec:
    """Spec of one BAM layer for ``config`` (a megatron-core ``TransformerConfig``)."""
    backend = _backend(use_te)
    moe_grouped_gemm = bool(getattr(config, "moe_grouped_gemm", False))
    submodules = TransformerLayerSubmodules(
        input_layernorm=Norm,
        self_attention=attention_spec(bam, backend, bool(getattr(config, "qk_layernorm", False))),
        self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=IdentityOp if bam.parallel_block else Norm,
        mlp=ffn_spec(config.num_moe_experts, backend, moe_grouped_gemm, ffn_router_builder(config, bam)),
        mlp_bda=get_bias_dropout_add,
    )
    layer = BAMParallelTransformerLayer if bam.parallel_block else TransformerLayer
    return ModuleSpec(module=layer, submodules=submodules)


def get_bam_block_spec(
    config,
    bam: BAMConfig,
    use_te: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
) -> TransformerBlockSubmodules:
    """Block spec to pass to ``GPTModel(transformer_layer_spec=...)``: this pipeline stage's
    layers (all identical BAM layers) and the final norm."""
    layer = get_bam_layer_spec(config, bam, use_te)
    num_local = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_local, layer_norm=Norm)
