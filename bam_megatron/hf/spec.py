"""``ModelSpec``: one description of a model that both sides of the Hugging Face bridge speak.

The import fills it from a Hugging Face ``config.json`` (an adapter's ``spec_from_config``) and
records it as this project's model arguments (``to_args``: the ``MODEL_ARGS`` names that
``pretrain_bam.py --use-checkpoint-args`` restores); the export reads it back from a checkpoint
(``spec_from_checkpoint``: the recorded arguments, checked against the stored tensors' shapes,
which win where they say more) and hands it to the adapter that writes the Hugging Face model.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Dict, Optional, Sequence

from bam_megatron.errors import HFError

LP = "decoder.layers."
NEXUS_DOMAIN = LP + "mlp.router.domain_embeddings"  # fp32 whatever the model's dtype


@dataclass(frozen=True)
class ModelSpec:
    """A GPT model of this project (dense seed, BTX or BAM, linear or Nexus router).

    Shapes: ``L`` layers, hidden ``d``, ``H`` query heads in ``G`` groups of head dim ``dh``,
    FFN ``F`` (``moe_ffn_hidden_size`` for experts), ``V`` embedding rows (padded vocabulary);
    the Nexus router's domain embeddings of size ``D`` through a SwiGLU of size ``P``; a shared
    FFN expert of size ``shared_expert_ffn`` (0: none).
    """

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    seq_length: int
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-5
    position_embedding_type: str = "rope"
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    rotary_interleaved: bool = False
    swiglu: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    untied: bool = True
    parallel_block: bool = False
    attn_experts: int = 1
    kv_sharing: bool = False
    attn_routing: str = "soft"
    attn_topk: int = 1
    attn_topk_renormalize: bool = True
    num_experts: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    moe_router_topk: int = 1
    moe_router_pre_softmax: bool = True
    moe_router_type: str = "linear"
    nexus_domain_size: Optional[int] = None
    nexus_projection_size: Optional[int] = None
    shared_expert_ffn: int = 0

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.rotary_percent)

    @property
    def is_moa(self) -> bool:
        return self.attn_experts > 1

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def qkv_bias(self) -> bool:
        return self.add_bias_linear or self.add_qkv_bias

    @property
    def is_nexus(self) -> bool:
        return self.moe_router_type == "nexus"

    @property
    def expert_ffn(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    def with_(self, **changes) -> "ModelSpec":
        return replace(self, **changes)

    def to_args(self) -> dict:
        """This project's recorded model arguments (``training/arguments.MODEL_ARGS``)."""
        return {
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "ffn_hidden_size": self.ffn_hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "group_query_attention": self.num_query_groups != self.num_attention_heads,
            "num_query_groups": self.num_query_groups,
            "kv_channels": self.head_dim,
            "seq_length": self.seq_length,
            "max_position_embeddings": self.max_position_embeddings,
            "swiglu": self.swiglu,
            "normalization": self.normalization,
            "norm_epsilon": self.norm_epsilon,
            "position_embedding_type": self.position_embedding_type,
            "rotary_base": self.rotary_base,
            "rotary_percent": self.rotary_percent,
            "rotary_interleaved": self.rotary_interleaved,
            "untie_embeddings_and_output_weights": self.untied,
            "add_bias_linear": self.add_bias_linear,
            "add_qkv_bias": self.add_qkv_bias,
            "qk_layernorm": self.qk_layernorm,
            "padded_vocab_size": self.vocab_size,
            "num_experts": self.num_experts,
            "moe_ffn_hidden_size": self.moe_ffn_hidden_size,
            "moe_router_topk": self.moe_router_topk,
            "moe_router_pre_softmax": self.moe_router_pre_softmax,
            "moe_router_type": self.moe_router_type,
            "nexus_domain_size": self.nexus_domain_size,
            "nexus_projection_size": self.nexus_projection_size,
            "moe_shared_expert_intermediate_size": self.shared_expert_ffn or None,
            "bam_attn_experts": self.attn_experts,
            "bam_attn_routing": self.attn_routing,
            "bam_attn_topk": self.attn_topk,
            "bam_attn_topk_renormalize": self.attn_topk_renormalize,
            "bam_kv_sharing": self.kv_sharing,
            "bam_sequential_block": not self.parallel_block,
        }


def _arg(args: dict, name: str, default, what: str):
    value = args.get(name, default)
    if value is None and default is None:
        raise HFError(f"{what} records no --{name.replace('_', '-')}; it was not written by pretrain_bam.py, the upcycle tool or Megatron-LM")
    return default if value is None else value


def spec_from_checkpoint(args: dict, shapes: Dict[str, Sequence[int]], what: str) -> ModelSpec:
    """The model of a checkpoint: recorded ``args`` (Megatron-LM names) checked against the
    stored global ``shapes`` (canonical keys; see ``upcycle.mapping.canonical_key``).

    Raises:
        HFError: a required argument is missing or contradicts the tensors.
    """
    ln = shapes.get(LP + "input_layernorm.weight")
    emb = shapes.get("embedding.word_embeddings.weight")
    if ln is None or emb is None:
        raise HFError(f"{what} has no {LP}input_layernorm.weight or embedding; it is not a GPT model checkpoint")
    num_layers, hidden = int(ln[0]), int(ln[1])
    heads = int(_arg(args, "num_attention_heads", None, what))
    proj = shapes.get(LP + "self_attention.linear_proj.weight")
    if proj is None or int(proj[-1]) % heads:
        raise HFError(f"{what}: the attention output weight does not fit {heads} heads; it is not a GPT model checkpoint")
    head_dim = int(proj[-1]) // heads
    groups = _query_groups(shapes, heads, head_dim, what)
    n_attn = 1
    if LP + "self_attention.router.weight" in shapes:
        n_attn = int(shapes[LP + "self_attention.router.weight"][1])
    n_ffn = _ffn_experts(shapes)
    fc1 = shapes.get(LP + ("mlp.experts.experts.linear_fc1.weight" if n_ffn else "mlp.linear_fc1.weight"))
    fc2 = shapes.get(LP + ("mlp.experts.experts.linear_fc2.weight" if n_ffn else "mlp.linear_fc2.weight"))
    if fc1 is None or fc2 is None or int(fc1[-2]) not in (int(fc2[-1]), 2 * int(fc2[-1])):
        raise HFError(f"{what} has no FFN weights that fit together (mlp linear_fc1 / linear_fc2); it is not a GPT model checkpoint")
    ffn = int(fc2[-1])
    seq = int(_arg(args, "seq_length", None, what))
    spec = ModelSpec(
        num_layers=num_layers,
        hidden_size=hidden,
        ffn_hidden_size=ffn if n_ffn is None else int(args.get("ffn_hidden_size") or ffn),
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=head_dim,
        vocab_size=int(emb[0]),
        max_position_embeddings=int(args.get("max_position_embeddings") or seq),
        seq_length=seq,
        normalization="LayerNorm" if LP + "input_layernorm.bias" in shapes else "RMSNorm",
        norm_epsilon=float(args.get("norm_epsilon", 1e-5)),
        position_embedding_type="learned_absolute" if "embedding.position_embeddings.weight" in shapes else "rope",
        rotary_base=int(args.get("rotary_base", 10000)),
        rotary_percent=float(args.get("rotary_percent", 1.0)),
        rotary_interleaved=bool(args.get("rotary_interleaved", False)),
        swiglu=int(fc1[-2]) == 2 * ffn,
        add_bias_linear=LP + "self_attention.linear_proj.bias" in shapes,
        add_qkv_bias=LP + "self_attention.linear_qkv.bias" in shapes and LP + "self_attention.linear_proj.bias" not in shapes,
        qk_layernorm=LP + "self_attention.q_layernorm.weight" in shapes,
        untied="output_layer.weight" in shapes,
        parallel_block=LP + "pre_mlp_layernorm.weight" not in shapes,
        attn_experts=n_attn,
        kv_sharing=LP + "self_attention.linear_kv.weight" in shapes,
        attn_routing=str(args.get("bam_attn_routing", "soft")) if n_attn > 1 else "soft",
        attn_topk=int(args.get("bam_attn_topk", 1)),
        attn_topk_renormalize=bool(args.get("bam_attn_topk_renormalize", True)),
        num_experts=n_ffn,
        moe_ffn_hidden_size=ffn if n_ffn else None,
        moe_router_topk=int(args.get("moe_router_topk", 1)) if n_ffn else 1,
        moe_router_pre_softmax=bool(args.get("moe_router_pre_softmax", False)) if n_ffn else True,
        **_router_and_shared_expert(shapes),
    )
    return spec


def _ffn_experts(shapes: Dict[str, Sequence[int]]) -> Optional[int]:
    """N routed FFN experts from the router's stored shape (linear ``[L, N, d]``, Nexus ``[L, N, D]``)."""
    for key in (NEXUS_DOMAIN, LP + "mlp.router.weight"):
        if key in shapes:
            return int(shapes[key][1])
    return None


def _router_and_shared_expert(shapes: Dict[str, Sequence[int]]) -> dict:
    """The Nexus router's sizes (domain embeddings ``[L, N, D]``, ``projection_fc1 [L, 2P, D]``)
    and the shared expert's FFN size (``shared_experts.linear_fc2 [L, d, F]``), from the shapes."""
    out: dict = {}
    if NEXUS_DOMAIN in shapes:
        fc1 = shapes.get(LP + "mlp.router.projection_fc1.weight")
        if fc1 is None or int(fc1[1]) % 2:
            raise HFError("the checkpoint has Nexus domain embeddings but no projection that fits them; it is incomplete")
        out.update(moe_router_type="nexus", nexus_domain_size=int(shapes[NEXUS_DOMAIN][2]), nexus_projection_size=int(fc1[1]) // 2)
    shared = shapes.get(LP + "mlp.shared_experts.linear_fc2.weight")
    if shared is not None:
        out["shared_expert_ffn"] = int(shared[-1])
    return out


def _query_groups(shapes: Dict[str, Sequence[int]], heads: int, head_dim: int, what: str) -> int:
    """G from the stored key/value rows: ``linear_qkv`` has ``(H + 2G)·dh`` rows, the shared
    ``linear_kv`` ``2G·dh``."""
    kv = shapes.get(LP + "self_attention.linear_kv.weight")
    qkv = shapes.get(LP + "self_attention.linear_qkv.weight")
    if kv is not None:
        twice = int(kv[-2]) // head_dim
    elif qkv is not None:
        twice = int(qkv[-2]) // head_dim - heads
    else:
        raise HFError(f"{what} has no query/key/value weights; it is not a GPT model checkpoint")
    groups = twice // 2
    if groups <= 0 or twice % 2 or heads % groups:
        raise HFError(f"{what}: the key/value weights fit no query-group count for {heads} heads of dimension {head_dim}")
    return groups


SPEC_FIELDS = tuple(f.name for f in fields(ModelSpec))


def checkpoint_shapes(spec: ModelSpec) -> Dict[str, tuple]:
    """Global keys and shapes of a checkpoint of ``spec`` (canonical keys, see
    ``upcycle.mapping``): what an import must produce, what an export reads."""
    d, v, L = spec.hidden_size, spec.vocab_size, spec.num_layers
    ln = spec.normalization == "LayerNorm"
    out = {"embedding.word_embeddings.weight": (v, d), "decoder.final_layernorm.weight": (d,)}
    if spec.position_embedding_type == "learned_absolute":
        out["embedding.position_embeddings.weight"] = (spec.max_position_embeddings, d)
    if ln:
        out["decoder.final_layernorm.bias"] = (d,)
    if spec.untied:
        out["output_layer.weight"] = (v, d)
    layer = {"input_layernorm.weight": (d,)}
    norms = ["input_layernorm"] + ([] if spec.parallel_block else ["pre_mlp_layernorm"])
    if not spec.parallel_block:
        layer["pre_mlp_layernorm.weight"] = (d,)
    layer.update(_attention_shapes(spec))
    if spec.qk_layernorm:
        norms += ["self_attention.q_layernorm", "self_attention.k_layernorm"]
    if ln:
        layer.update({f"{n}.bias": layer[f"{n}.weight"] for n in norms})
    layer.update(_ffn_shapes(spec))
    out.update({LP + k: (L,) + s for k, s in layer.items()})
    return out


def _attention_shapes(spec: ModelSpec) -> Dict[str, tuple]:
    """One layer's attention tensors: dense (``linear_qkv`` interleaved per group) or the
    Mixture of Attention's (experts on axis 0; ``linear_q`` + ``linear_kv`` with shared KV)."""
    d, dh, n = spec.hidden_size, spec.head_dim, spec.attn_experts
    hd, rows = spec.num_attention_heads * dh, spec.num_query_groups * (spec.heads_per_group + 2) * dh
    if spec.is_moa:
        out = {"self_attention.router.weight": (n, d), "self_attention.linear_proj.weight": (n, d, hd)}
        if spec.kv_sharing:
            out.update({"self_attention.linear_q.weight": (n, hd, d), "self_attention.linear_kv.weight": (2 * spec.num_query_groups * dh, d)})
        else:
            out["self_attention.linear_qkv.weight"] = (n, rows, d)
        return out
    out = {"self_attention.linear_qkv.weight": (rows, d), "self_attention.linear_proj.weight": (d, hd)}
    if spec.qkv_bias:
        out["self_attention.linear_qkv.bias"] = (rows,)
    if spec.add_bias_linear:
        out["self_attention.linear_proj.bias"] = (d,)
    if spec.qk_layernorm:
        out.update({"self_attention.q_layernorm.weight": (dh,), "self_attention.k_layernorm.weight": (dh,)})
    return out


def _mlp_shapes(spec: ModelSpec, prefix: str, ffn: int, experts: tuple = (), bias: bool = False) -> Dict[str, tuple]:
    d, rows = spec.hidden_size, (2 if spec.swiglu else 1) * ffn
    out = {prefix + "linear_fc1.weight": experts + (rows, d), prefix + "linear_fc2.weight": experts + (d, ffn)}
    if bias:
        out.update({prefix + "linear_fc1.bias": experts + (rows,), prefix + "linear_fc2.bias": experts + (d,)})
    return out


def _ffn_shapes(spec: ModelSpec) -> Dict[str, tuple]:
    """One layer's FFN tensors: dense, or routed experts (stacked on axis 0) with a linear or
    Nexus router and an optional shared expert (no biases)."""
    if not spec.is_moe:
        return _mlp_shapes(spec, "mlp.", spec.ffn_hidden_size, bias=spec.add_bias_linear)
    n, d = spec.num_experts, spec.hidden_size
    out = _mlp_shapes(spec, "mlp.experts.experts.", spec.expert_ffn, (n,), spec.add_bias_linear)
    if spec.is_nexus:
        p, dsz = spec.nexus_projection_size, spec.nexus_domain_size
        out.update({"mlp.router.domain_embeddings": (n, dsz), "mlp.router.projection_fc1.weight": (2 * p, dsz),
                    "mlp.router.projection_fc2.weight": (d, p)})
    else:
        out["mlp.router.weight"] = (n, d)
    if spec.shared_expert_ffn:
        out.update(_mlp_shapes(spec, "mlp.shared_experts.", spec.shared_expert_ffn))
    return out
