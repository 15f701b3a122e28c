"""BAM options, kept beside megatron-core's ``TransformerConfig``.

``BAMConfig`` holds what megatron-core has no name for: the attention experts (Mixture of
Attention) and the block type. The FFN mixture of experts is configured with megatron-core's own
``TransformerConfig`` fields (``num_moe_experts``, ``moe_router_topk``,
``moe_router_pre_softmax``, ``moe_aux_loss_coeff``, ``moe_z_loss_coeff``, ...), because its
``MoELayer`` reads them there.

``validate_bam_setup`` checks the pair (and the parallel layout) before any module is built and
raises ``BAMConfigError`` with a one-line message naming the problem and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from bam_megatron.errors import BAMConfigError

ATTN_ROUTING_CHOICES = ("soft", "topk")
FFN_ROUTER_CHOICES = ("linear", "nexus")
# Selective-recompute modules the BAM layers honour (see layer.py / moa.py).
SUPPORTED_RECOMPUTE_MODULES = ("core_attn", "mlp", "moe", "moe_act")


@dataclass
class BAMConfig:
    """Options of the BAM block.

    Attributes:
        attn_experts: N, the number of attention experts per layer. 1 is ordinary attention
            (dense seeds and BTX); N > 1 builds a Mixture of Attention.
        attn_routing: ``"soft"`` (softmax over all N experts; every token goes through every
            expert; the paper's default) or ``"topk"`` (keep the k largest router weights).
        attn_topk: k for ``attn_routing="topk"``.
        attn_topk_renormalize: with top-k attention routing, renormalise the k kept weights to
            sum to 1 (keeps the output scale of soft routing). Otherwise they are the softmax
            over all experts, truncated.
        kv_sharing: "Shared KV": Q and O per expert, one K,V projection shared by all attention
            experts (grouped-query attention across experts). Default is "KV experts"
            (Q, K, V, O per expert).
        parallel_block: ``y = x + Attn(Norm(x)) + FFN(Norm(x))`` (one norm per block, as in the
            paper). ``False`` gives the sequential block (attention, then FFN, each with its own
            norm) so that sequential seeds can be upcycled too.
        ffn_router: the FFN experts' router: ``"linear"`` (megatron-core's ``TopKRouter``) or
            ``"nexus"`` (``nexus_router.NexusRouter``: logits from projected domain embeddings).
        nexus_domain_size: D, the size of the Nexus domain embeddings (default: hidden size).
        nexus_projection_size: P, the hidden size of the Nexus SwiGLU projection (default:
            hidden size).
    """

    attn_experts: int = 1
    attn_routing: str = "soft"
    attn_topk: int = 1
    attn_topk_renormalize: bool = True
    kv_sharing: bool = False
    parallel_block: bool = True
    ffn_router: str = "linear"
    nexus_domain_size: Optional[int] = None
    nexus_projection_size: Optional[int] = None

    def __post_init__(self):
        if self.attn_experts < 1:
            raise BAMConfigError(
                f"--bam-attn-experts must be >= 1, got {self.attn_experts}; "
                "use 1 for ordinary attention"
            )
        if self.attn_routing not in ATTN_ROUTING_CHOICES:
            raise BAMConfigError(
                f"--bam-attn-routing must be one of {ATTN_ROUTING_CHOICES}, "
                f"got {self.attn_routing!r}"
            )
        if self.attn_routing == "topk" and not 1 <= self.attn_topk <= self.attn_experts:
            raise BAMConfigError(
                f"--bam-attn-topk {self.attn_topk} must be between 1 and --bam-attn-experts "
                f"{self.attn_experts}; lower the top-k or add attention experts"
            )
        if self.ffn_router not in FFN_ROUTER_CHOICES:
            raise BAMConfigError(
                f"--moe-router-type must be one of {FFN_ROUTER_CHOICES}, got {self.ffn_router!r}"
            )
        for flag, size in (("--nexus-domain-size", self.nexus_domain_size),
                           ("--nexus-projection-size", self.nexus_projection_size)):
            if size is not None and size < 1:
                raise BAMConfigError(f"{flag} must be >= 1, got {size}")
        if self.kv_sharing and self.attn_experts == 1:
            raise BAMConfigError(
                "--bam-kv-sharing needs --bam-attn-experts > 1 (with one expert there is "
                "nothing to share); drop --bam-kv-sharing or add attention experts"
            )

    @property
    def is_moa(self) -> bool:
        """True when the attention is a Mixture of Attention (N > 1)."""
        return self.attn_experts > 1

    def nexus_sizes(self, hidden_size: int):
        """``(D, P)`` of the Nexus projection, the defaults filled with ``hidden_size``."""
        return self.nexus_domain_size or hidden_size, self.nexus_projection_size or hidden_size


def validate_bam_setup(
    config,
    bam: BAMConfig,
    *,
    tensor_model_parallel_size: Optional[int] = None,
    expert_model_parallel_size: Optional[int] = None,
    pipeline_model_parallel_size: Optional[int] = None,
    inference: bool = False,
) -> None:
    """Check a ``TransformerConfig`` + ``BAMConfig`` pair before building anything.

    Parallel sizes default to the ones recorded in ``config``. ``inference``: the model only runs
    forward (generation, scoring), where FFN experts with TP > 1 need no sequence parallelism.

    Raises:
        BAMConfigError: one line naming the problem and the fix.
    """
    tp = tensor_model_parallel_size or config.tensor_model_parallel_size
    ep = expert_model_parallel_size or config.expert_model_parallel_size
    pp = pipeline_model_parallel_size or config.pipeline_model_parallel_size
    _validate_shape(config, tp, pp)
    if config.num_moe_experts is not None:
        _validate_ffn_experts(config, tp, ep, inference)
    elif bam.ffn_router != "linear" or config.moe_shared_expert_intermediate_size is not None:
        raise BAMConfigError(
            "--moe-router-type nexus and --moe-shared-expert-intermediate-size need FFN experts; "
            "set --num-experts"
        )
    elif ep > 1 and not bam.is_moa:
        raise BAMConfigError(
            f"--expert-model-parallel-size {ep} needs experts to distribute; set --num-experts "
            "and/or --bam-attn-experts, or use --expert-model-parallel-size 1"
        )
    if bam.is_moa:
        _validate_attention_experts(config, bam, tp, ep)
    if config.recompute_granularity == "selective":
        unsupported = [m for m in config.recompute_modules if m not in SUPPORTED_RECOMPUTE_MODULES]
        if unsupported:
            raise BAMConfigError(
                f"--recompute-modules {unsupported} are not supported by the BAM layers; use "
                f"a subset of {list(SUPPORTED_RECOMPUTE_MODULES)}"
            )


def _validate_shape(config, tp: int, pp: int) -> None:
    """Heads, groups, layers and FFN divide by the parallel sizes; supported norm; no CP."""
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    if heads % tp:
        raise BAMConfigError(
            f"--num-attention-heads {heads} is not divisible by --tensor-model-parallel-size "
            f"{tp}; choose a tensor-parallel size that divides the head count"
        )
    if heads % groups:
        raise BAMConfigError(
            f"--num-attention-heads {heads} is not divisible by --num-query-groups {groups}; "
            "use a query-group count that divides the head count"
        )
    if config.num_layers % pp:
        raise BAMConfigError(
            f"--num-layers {config.num_layers} is not divisible by "
            f"--pipeline-model-parallel-size {pp}; choose a pipeline size that divides it"
        )
    if config.ffn_hidden_size % tp:
        raise BAMConfigError(
            f"--ffn-hidden-size {config.ffn_hidden_size} is not divisible by "
            f"--tensor-model-parallel-size {tp}"
        )
    if config.normalization not in ("LayerNorm", "RMSNorm"):
        raise BAMConfigError(
            f"--normalization {config.normalization!r} is not supported; use LayerNorm or RMSNorm"
        )
    if getattr(config, "context_parallel_size", 1) != 1:
        raise BAMConfigError(
            "context parallelism is not supported by the BAM layers; use "
            "--context-parallel-size 1"
        )


def _validate_ffn_experts(config, tp: int, ep: int, inference: bool = False) -> None:
    """FFN experts: the expert-parallel size divides them; top-k fits; SP with TP (training)."""
    experts = config.num_moe_experts
    if experts % ep:
        raise BAMConfigError(
            f"--num-experts {experts} is not divisible by --expert-model-parallel-size "
            f"{ep}; choose an expert-parallel size that divides the FFN expert count"
        )
    if config.moe_router_topk > experts:
        raise BAMConfigError(
            f"--moe-router-topk {config.moe_router_topk} is larger than --num-experts "
            f"{experts}; lower the top-k"
        )
    if tp > 1 and not config.sequence_parallel and not inference:
        raise BAMConfigError(
            "FFN experts with --tensor-model-parallel-size > 1 need --sequence-parallel "
            "(megatron-core requirement); add --sequence-parallel"
        )
    shared = config.moe_shared_expert_intermediate_size
    if shared is not None:
        if config.add_bias_linear:
            raise BAMConfigError(
                "a shared FFN expert has no biases (megatron-core); add --disable-bias-linear or drop "
                "--moe-shared-expert-intermediate-size"
            )
        if shared % tp:
            raise BAMConfigError(
                f"--moe-shared-expert-intermediate-size {shared} is not divisible by "
                f"--tensor-model-parallel-size {tp}"
            )


def _validate_attention_experts(config, bam: BAMConfig, tp: int, ep: int) -> None:
    """Attention experts: EP divides them, TP keeps KV groups whole, no biases / QK norm."""
    n = bam.attn_experts
    groups = config.num_query_groups or config.num_attention_heads
    if n % ep:
        raise BAMConfigError(
            f"--bam-attn-experts {n} is not divisible by --expert-model-parallel-size {ep}; "
            "attention experts are spread over the expert-parallel group, choose sizes "
            "that divide"
        )
    if groups % tp:
        raise BAMConfigError(
            f"--num-query-groups {groups} is not divisible by --tensor-model-parallel-size "
            f"{tp}; attention experts keep each KV group on one rank, lower the "
            "tensor-parallel size"
        )
    etp = getattr(config, "expert_tensor_parallel_size", None) or tp
    if ep > 1 and etp != tp:
        raise BAMConfigError(
            f"--expert-tensor-parallel-size {etp} differs from --tensor-model-parallel-size "
            f"{tp}; attention experts shard heads over the tensor-parallel group, use equal "
            "sizes"
        )
    if config.add_bias_linear or config.add_qkv_bias:
        raise BAMConfigError(
            "attention experts have no biases (as in the paper); add "
            "--disable-bias-linear and drop --add-qkv-bias"
        )
    if config.qk_layernorm:
        raise BAMConfigError(
            "--qk-layernorm is not supported with --bam-attn-experts > 1; attention experts have "
            "no query/key norms (use --bam-attn-experts 1, e.g. BTX-style merged attention)"
        )
