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


@dataclass(frozen=True)
class ModelSpec:
    """A GPT model of this project (dense seed, BTX or BAM).

    Shapes: ``L`` layers, hidden ``d``, ``H`` query heads in ``G`` groups of head dim ``dh``,
    FFN ``F`` (``moe_ffn_hidden_size`` for experts), ``V`` embedding rows (padded vocabulary).
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
            "moe_router_type": "linear",
            "nexus_domain_size": None,
            "nexus_projection_size": None,
            "moe_shared_expert_intermediate_size": None,
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
    _check_no_nexus(shapes, what)
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
    n_ffn = int(shapes[LP + "mlp.router.weight"][1]) if LP + "mlp.router.weight" in shapes else None
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
    )
    return spec


def _check_no_nexus(shapes: Dict[str, Sequence[int]], what: str) -> None:
    """The transformers classes hold linear FFN routers and no shared FFN expert."""
    extra = [k for k in shapes if k.startswith((LP + "mlp.router.projection", LP + "mlp.router.domain", LP + "mlp.shared_experts."))]
    if extra:
        raise HFError(
            f"{what} has a Nexus router or a shared FFN expert ({extra[0]}), which no transformers class of this "
            "project holds yet; export a model mixed with the linear router (tools/upcycle_bam.py --router linear)"
        )


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


def dense_shapes(spec: ModelSpec) -> Dict[str, tuple]:
    """Global keys and shapes of a dense checkpoint of ``spec`` (what an import must produce)."""
    d, dh, ffn, v, L = spec.hidden_size, spec.head_dim, spec.ffn_hidden_size, spec.vocab_size, spec.num_layers
    rows = spec.num_query_groups * (spec.heads_per_group + 2) * dh
    ln = spec.normalization == "LayerNorm"
    out = {"embedding.word_embeddings.weight": (v, d), "decoder.final_layernorm.weight": (d,)}
    if ln:
        out["decoder.final_layernorm.bias"] = (d,)
    if spec.untied:
        out["output_layer.weight"] = (v, d)
    layer = {"input_layernorm.weight": (d,), "self_attention.linear_qkv.weight": (rows, d),
             "self_attention.linear_proj.weight": (d, spec.num_attention_heads * dh),
             "mlp.linear_fc1.weight": ((2 if spec.swiglu else 1) * ffn, d), "mlp.linear_fc2.weight": (d, ffn)}
    norms = ["input_layernorm"] + ([] if spec.parallel_block else ["pre_mlp_layernorm"])
    if not spec.parallel_block:
        layer["pre_mlp_layernorm.weight"] = (d,)
    if spec.qkv_bias:
        layer["self_attention.linear_qkv.bias"] = (rows,)
    if spec.add_bias_linear:
        layer.update({"self_attention.linear_proj.bias": (d,), "mlp.linear_fc1.bias": (layer["mlp.linear_fc1.weight"][0],),
                      "mlp.linear_fc2.bias": (d,)})
    if spec.qk_layernorm:
        layer.update({"self_attention.q_layernorm.weight": (dh,), "self_attention.k_layernorm.weight": (dh,)})
        norms += ["self_attention.q_layernorm", "self_attention.k_layernorm"]
    if ln:
        layer.update({f"{n}.bias": layer[f"{n}.weight"] for n in norms})
    out.update({LP + k: (L,) + s for k, s in layer.items()})
    return out
