"""The arguments that define a model, as one typed record (no torch import).

``ModelArgs`` holds what a checkpoint must record so that any program can rebuild its model: the
architecture (``ARCHITECTURE``: every field compared against a checkpoint before loading it) and
the model's training settings that travel with it (``CARRIED``: dropout, init, MoE losses,
vocabulary padding; restored unless a training command line gives them). Field names and
defaults are Megatron-LM's argument names and defaults, so the same record reads

- this project's recorded arguments (a dict of plain values),
- Megatron-LM's recorded ``argparse.Namespace`` (after ``checkpoint.opener`` read it safely), and
- a training command line (``from_namespace``),

and the model builders read it with the same attribute names as an argument namespace.
``from_recorded`` applies Megatron-LM's conventions once (its ``num_query_groups`` counts only
with ``--group-query-attention``; unset head dimension, FFN size and position count are derived
as Megatron-LM derives them), so every program agrees on what a checkpoint holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional


def _arch(default=None):
    return field(default=default, metadata={"architecture": True})


@dataclass(frozen=True)
class ModelArgs:
    """A model's recorded arguments (see the module docstring); None: not known."""

    num_layers: Optional[int] = _arch()
    hidden_size: Optional[int] = _arch()
    ffn_hidden_size: Optional[int] = _arch()
    num_attention_heads: Optional[int] = _arch()
    num_query_groups: Optional[int] = _arch()
    kv_channels: Optional[int] = _arch()
    seq_length: Optional[int] = _arch()
    max_position_embeddings: Optional[int] = _arch()
    swiglu: bool = _arch(False)
    normalization: str = _arch("LayerNorm")
    norm_epsilon: float = _arch(1e-5)
    position_embedding_type: str = _arch("learned_absolute")
    rotary_base: int = _arch(10000)
    rotary_percent: float = _arch(1.0)
    untie_embeddings_and_output_weights: bool = _arch(False)
    add_bias_linear: bool = _arch(True)
    add_qkv_bias: bool = _arch(False)
    qk_layernorm: bool = _arch(False)
    rotary_interleaved: bool = _arch(False)
    padded_vocab_size: Optional[int] = _arch()
    num_experts: Optional[int] = _arch()
    moe_ffn_hidden_size: Optional[int] = _arch()
    moe_router_topk: int = _arch(2)
    moe_router_pre_softmax: bool = _arch(False)
    moe_router_type: str = _arch("linear")
    nexus_domain_size: Optional[int] = _arch()
    nexus_projection_size: Optional[int] = _arch()
    moe_shared_expert_intermediate_size: Optional[int] = _arch()
    bam_attn_experts: int = _arch(1)
    bam_attn_routing: str = _arch("soft")
    bam_attn_topk: int = _arch(1)
    bam_attn_topk_renormalize: bool = _arch(True)
    bam_kv_sharing: bool = _arch(False)
    bam_sequential_block: bool = _arch(False)
    # carried with the model, restored unless the command line gives them
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: Optional[float] = None
    moe_router_load_balancing_type: str = "aux_loss"

    @classmethod
    def from_recorded(cls, recorded: Mapping[str, Any], inferred: Optional[Mapping[str, Any]] = None,
                      megatron_lm: bool = False) -> "ModelArgs":
        """The record of a checkpoint's plain-valued arguments (this project's, or Megatron-LM's
        with ``megatron_lm``).

        ``inferred``: values read from the checkpoint's tensors, used where the arguments say
        nothing (e.g. Megatron-LM records no ``bam_sequential_block``; its blocks are sequential).
        """
        values = {f.name: recorded[f.name] for f in dataclasses.fields(cls) if recorded.get(f.name) is not None}
        for name, value in (inferred or {}).items():
            values.setdefault(name, value)
        if megatron_lm and not recorded.get("group_query_attention") and values.get("num_attention_heads"):
            values["num_query_groups"] = values["num_attention_heads"]  # its num_query_groups counts only with GQA
        return cls(**values).derived()

    @classmethod
    def from_namespace(cls, args) -> "ModelArgs":
        """The model of a (finalized) training command line."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})

    def derived(self) -> "ModelArgs":
        """Unset sizes derived as Megatron-LM derives them (query groups = heads, head dimension
        = hidden / heads, position count = sequence length, FFN size from the hidden size)."""
        heads, hidden = self.num_attention_heads, self.hidden_size
        changes: Dict[str, Any] = {}
        if self.num_query_groups is None and heads:
            changes["num_query_groups"] = heads
        if self.kv_channels is None and heads and hidden:
            changes["kv_channels"] = hidden // heads
        if self.max_position_embeddings is None and self.seq_length:
            changes["max_position_embeddings"] = self.seq_length
        if self.ffn_hidden_size is None and hidden:
            changes["ffn_hidden_size"] = int((4 * hidden * 2 / 3) / 64) * 64 if self.swiglu else 4 * hidden
        return dataclasses.replace(self, **changes) if changes else self

    def replace(self, **changes) -> "ModelArgs":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def missing(self, names=("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size")) -> Optional[str]:
        """The first of ``names`` that is unknown (None when the model can be built)."""
        return next((n for n in names if getattr(self, n) is None), None)


ARCHITECTURE = tuple(f.name for f in dataclasses.fields(ModelArgs) if f.metadata.get("architecture"))
CARRIED = tuple(f.name for f in dataclasses.fields(ModelArgs) if not f.metadata.get("architecture"))
