"""The Mix phase's plan: options, the output tensors and the recorded arguments.

``check_options`` validates the user's options against the seed count; ``plan_outputs`` lists
every tensor of the BAM checkpoint (key, global shape, dtype, role); ``output_args`` is what the
output records so that ``pretrain_bam.py --use-checkpoint-args`` rebuilds the model;
``count_parameters`` gives total and active parameters.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from bam_megatron.checkpoint.dcp_writer import PlannedTensor
from bam_megatron.errors import UpcycleError
from bam_megatron.upcycle import mapping as U
from bam_megatron.upcycle.nexus import DomainEmbeddings, nexus_shapes
from bam_megatron.upcycle.seeds import Architecture

# Plain arguments copied from seed 0 (tokenizer and init), beside the model arguments.
CARRIED_ARGS = (
    "tokenizer_type",
    "vocab_size",
    "vocab_file",
    "merge_file",
    "tokenizer_model",
    "make_vocab_size_divisible_by",
    "init_method_std",
    "hidden_dropout",
    "attention_dropout",
    "moe_aux_loss_coeff",
    "moe_z_loss_coeff",
    "moe_router_load_balancing_type",
)
# Training settings the user may set for the MoE (recorded; restored by --use-checkpoint-args
# unless the training command line gives them).
TRAINING_OPTIONS = ("hidden_dropout", "attention_dropout", "moe_aux_loss_coeff", "moe_z_loss_coeff",
                    "moe_router_load_balancing_type")


@dataclass
class UpcycleOptions:
    """How to mix (see ``tools/upcycle_bam.py --help``)."""

    mode: str = "full"  # full | shared-kv | merged
    weights: Optional[Sequence[float]] = None  # per seed, for averaged tensors (normalised)
    router_init: str = "random"
    router_std: Optional[float] = None  # default: the seeds' --init-method-std
    seed: int = 1234  # generator of the random routers
    moe_router_topk: int = 1
    moe_router_pre_softmax: bool = True
    attn_routing: str = "soft"
    attn_topk: int = 1
    # None: the seeds' recorded values (seed 0's)
    hidden_dropout: Optional[float] = None
    attention_dropout: Optional[float] = None
    moe_aux_loss_coeff: Optional[float] = None
    moe_z_loss_coeff: Optional[float] = None
    moe_router_load_balancing_type: Optional[str] = None
    expert_names: Optional[Sequence[str]] = None  # per seed; default: the seeds' directory names
    # FFN router: linear | nexus; Nexus reads the routed experts' domain embeddings
    router: str = "linear"
    shared_expert: Optional[bool] = None  # seed 0's FFN always on; None: with the Nexus router
    domain_embeddings: Optional[str] = None  # file of tools/domain_embeddings.py
    domains: Optional[Sequence[str]] = None  # which of its domains, in expert order (default all)
    nexus_projection_size: Optional[int] = None  # P (default: hidden size)

    @property
    def has_shared_expert(self) -> bool:
        return self.router == "nexus" if self.shared_expert is None else bool(self.shared_expert)

    def routed_experts(self, num_seeds: int) -> int:
        """FFN experts the router chooses from (all seeds, or all but seed 0's shared one)."""
        return num_seeds - 1 if self.has_shared_expert else num_seeds


@dataclass
class OutputTensor(PlannedTensor):
    """A tensor of the BAM checkpoint and its role: attention-expert | ffn-expert | shared |
    shared-expert (seed 0's FFN, always on) | router | router-buffer (Nexus domain embeddings)."""

    role: str = "shared"


def check_options(num_seeds: int, opts: UpcycleOptions) -> List[float]:
    """Validate the options against the seed count; returns the normalised weights."""
    n = num_seeds
    if opts.mode not in U.MODES:
        raise UpcycleError(f"unknown --attention-experts {opts.mode!r}; choose one of {', '.join(U.MODES)}")
    if n < 2:
        raise UpcycleError(
            f"--attention-experts {opts.mode} needs at least 2 seeds (the seed first, then the "
            f"domain experts), got {n}"
        )
    if opts.weights is None:
        weights = [1.0 / n] * n
    else:
        if len(opts.weights) != n:
            raise UpcycleError(f"--weights has {len(opts.weights)} values for {n} seeds; give one weight per seed")
        if any(not math.isfinite(w) or w < 0 for w in opts.weights) or sum(opts.weights) <= 0:
            raise UpcycleError("--weights must be finite, non-negative and not all zero")
        total = float(sum(opts.weights))
        weights = [float(w) / total for w in opts.weights]
    if opts.expert_names is not None and (len(opts.expert_names) != n or not all(str(x).strip() for x in opts.expert_names)):
        raise UpcycleError(f"--expert-names has {len(opts.expert_names)} names for {n} seeds; give one non-empty name per seed, in order")
    if opts.router_init not in U.ROUTER_INITS:
        raise UpcycleError(f"unknown --router-init {opts.router_init!r}; choose one of {', '.join(U.ROUTER_INITS)}")
    if opts.router_std is not None and not opts.router_std > 0:
        raise UpcycleError(f"--router-std must be positive, got {opts.router_std}")
    _check_router_options(n, opts)
    routed = opts.routed_experts(n)
    if not 1 <= opts.moe_router_topk <= routed:
        what = f"the number of routed FFN experts ({routed}: seed 0's FFN is shared)" if opts.has_shared_expert else f"the number of seeds ({n})"
        raise UpcycleError(f"--moe-router-topk {opts.moe_router_topk} must be between 1 and {what}")
    if opts.moe_router_topk == 1 and not opts.moe_router_pre_softmax:
        raise UpcycleError("--moe-router-topk 1 needs --moe-router-pre-softmax (megatron-core requirement)")
    if opts.attn_routing not in ("soft", "topk"):
        raise UpcycleError(f"unknown --attn-routing {opts.attn_routing!r}; choose soft or topk")
    if opts.attn_routing == "topk":
        if opts.mode == "merged":
            raise UpcycleError("--attn-routing topk needs attention experts; --attention-experts merged has none")
        if not 1 <= opts.attn_topk <= n:
            raise UpcycleError(f"--attn-topk {opts.attn_topk} must be between 1 and the number of seeds ({n})")
    return weights


def default_expert_name(path: str) -> str:
    """A seed's name from its path: the checkpoint directory's name (the parent of an ``iter_*``
    or ``release`` directory)."""
    path = os.path.normpath(os.path.abspath(path))
    base = os.path.basename(path)
    if base == "release" or re.fullmatch(r"iter_\d+", base):
        base = os.path.basename(os.path.dirname(path))
    return base


def expert_names(seed_paths: Sequence[str], opts: UpcycleOptions) -> List[str]:
    """One name per expert (``--expert-names``, else the seeds' directory names)."""
    if opts.expert_names is not None:
        return [str(x).strip() for x in opts.expert_names]
    return [default_expert_name(p) for p in seed_paths]


def _check_router_options(n: int, opts: UpcycleOptions) -> None:
    if opts.router not in ("linear", "nexus"):
        raise UpcycleError(f"unknown --router {opts.router!r}; choose linear or nexus")
    if opts.router == "linear" and (opts.domain_embeddings or opts.domains):
        raise UpcycleError("--domain-embeddings / --domains are for --router nexus; add --router nexus or drop them")
    if opts.has_shared_expert and n < 2:
        raise UpcycleError("a shared FFN expert (seed 0's FFN) needs at least one more seed for the routed experts")
    if opts.nexus_projection_size is not None and opts.nexus_projection_size < 1:
        raise UpcycleError(f"--nexus-projection-size must be >= 1, got {opts.nexus_projection_size}")


def _role(rule: U.Rule, out_key: str) -> str:
    if rule.kind == U.AVERAGE or (rule.kind == U.SPLIT_QKV and out_key == rule.outputs[1]):
        return "shared"
    if rule.kind == U.SHARED_STACK and out_key == rule.outputs[0]:
        return "shared-expert"
    return "ffn-expert" if ".mlp." in out_key else "attention-expert"


def plan_outputs(arch: Architecture, n: int, opts: UpcycleOptions,
                 domains: Optional[DomainEmbeddings] = None) -> Dict[str, OutputTensor]:
    """Every tensor of the BAM checkpoint: key -> global shape, dtype and role (``domains``: the
    routed experts' domain embeddings, with the Nexus router)."""
    out: Dict[str, OutputTensor] = {}
    shared = opts.has_shared_expert
    for key, shape in arch.shapes.items():
        rule = U.tensor_rule(key, opts.mode, shared)
        for out_key, out_shape in U.upcycled_shapes(key, shape, n, opts.mode, arch.attn, shared).items():
            out[out_key] = OutputTensor(out_key, tuple(out_shape), arch.dtype, role=_role(rule, out_key))
    if opts.mode != "merged":
        out[U.ATTN_ROUTER_KEY] = OutputTensor(U.ATTN_ROUTER_KEY, (arch.num_layers, n, arch.hidden_size), arch.dtype, role="router")
    routed = opts.routed_experts(n)
    if opts.router == "nexus":
        projection = opts.nexus_projection_size or arch.hidden_size
        for key, shape in nexus_shapes(arch.num_layers, routed, arch.hidden_size, domains.dim, projection).items():
            buffer = key == U.NEXUS_DOMAIN_KEY  # kept in fp32 (model/nexus_router.py)
            out[key] = OutputTensor(key, shape, torch.float32 if buffer else arch.dtype, role="router-buffer" if buffer else "router")
    else:
        out[U.FFN_ROUTER_KEY] = OutputTensor(U.FFN_ROUTER_KEY, (arch.num_layers, routed, arch.hidden_size), arch.dtype, role="router")
    return out


def output_args(arch: Architecture, n: int, opts: UpcycleOptions, domains: Optional[DomainEmbeddings] = None) -> dict:
    """The ``args`` of the BAM checkpoint: every ``arguments.MODEL_ARGS`` entry (so that
    ``--use-checkpoint-args`` rebuilds the model) plus seed 0's tokenizer and init settings."""
    nexus = opts.router == "nexus"
    a = arch.args
    seq = a.get("seq_length")
    if not isinstance(seq, int):
        raise UpcycleError("seed 0 records no --seq-length")
    args = {k: a[k] for k in CARRIED_ARGS if k in a}
    args.update(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.attn.num_attention_heads,
        group_query_attention=arch.attn.num_query_groups != arch.attn.num_attention_heads,
        num_query_groups=arch.attn.num_query_groups,
        kv_channels=arch.attn.head_dim,
        seq_length=seq,
        max_position_embeddings=a.get("max_position_embeddings") or seq,
        swiglu=arch.gated,
        normalization=a.get("normalization")
        or ("LayerNorm" if U.LAYER_PREFIX + "input_layernorm.bias" in arch.shapes else "RMSNorm"),
        norm_epsilon=a.get("norm_epsilon", 1e-5),
        position_embedding_type="learned_absolute"
        if "embedding.position_embeddings.weight" in arch.shapes
        else a.get("position_embedding_type", "rope"),
        rotary_base=a.get("rotary_base", 10000),
        rotary_percent=a.get("rotary_percent", 1.0),
        untie_embeddings_and_output_weights="output_layer.weight" in arch.shapes,
        add_bias_linear=arch.bias,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        rotary_interleaved=bool(a.get("rotary_interleaved", False)),
        padded_vocab_size=arch.padded_vocab_size,
        num_experts=opts.routed_experts(n),
        moe_ffn_hidden_size=arch.ffn_hidden_size,
        moe_router_topk=opts.moe_router_topk,
        moe_router_pre_softmax=bool(opts.moe_router_pre_softmax),
        moe_router_type=opts.router,
        nexus_domain_size=domains.dim if nexus else None,
        nexus_projection_size=(opts.nexus_projection_size or arch.hidden_size) if nexus else None,
        moe_shared_expert_intermediate_size=arch.ffn_hidden_size if opts.has_shared_expert else None,
        bam_attn_experts=1 if opts.mode == "merged" else n,
        bam_attn_routing=opts.attn_routing if opts.mode != "merged" else "soft",
        bam_attn_topk=opts.attn_topk,
        bam_attn_topk_renormalize=True,
        bam_kv_sharing=opts.mode == "shared-kv",
        bam_sequential_block=arch.sequential,
    )
    args.setdefault("init_method_std", 0.02)
    for name in TRAINING_OPTIONS:
        if getattr(opts, name) is not None:
            args[name] = getattr(opts, name)
    return args


@dataclass
class ParamCounts:
    total: int
    active: int
    attention_expert: int  # parameters of one attention expert (all layers)
    ffn_expert: int  # parameters of one FFN expert (all layers)


def count_parameters(plan: Dict[str, OutputTensor], n: int, args: dict) -> ParamCounts:
    """Total parameters and those a token uses (soft attention: every attention expert; top-k
    attention: k of them; FFN: the shared expert, if any, and top-k routed experts). The Nexus
    domain embeddings are buffers, not parameters."""
    total = sum(t.numel for t in plan.values() if t.role != "router-buffer")
    attn = sum(t.numel for t in plan.values() if t.role == "attention-expert") // n
    routed = args["num_experts"]
    ffn = sum(t.numel for t in plan.values() if t.role == "ffn-expert") // routed
    attn_active = n if args.get("bam_attn_routing", "soft") == "soft" else args.get("bam_attn_topk", 1)
    active = total - (n - attn_active) * attn - (routed - args["moe_router_topk"]) * ffn
    return ParamCounts(total, active, attn, ffn)
