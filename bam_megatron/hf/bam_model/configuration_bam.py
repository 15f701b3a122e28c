"""Configuration of ``BAMForCausalLM``: BAM (Branch-Attend-Mix) models in transformers.

Shipped beside the weights of every model ``tools/hf_export.py`` writes as ``BAMForCausalLM``
(load with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``). It imports
only transformers.
"""

from transformers import PretrainedConfig


class BAMConfig(PretrainedConfig):
    r"""A decoder-only model with attention experts (Mixture of Attention) and FFN experts.

    Args:
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads, max_position_embeddings:
            as in Llama. ``num_attention_heads`` (H) are the query heads of one attention expert.
        expert_key_value_heads: key/value heads (G) of one attention expert (grouped-query
            attention inside the expert).
        num_key_value_heads: the key/value heads the KV cache holds per layer, which is what
            transformers' cache classes size caches from: ``N·G`` with KV experts (every expert
            its own keys and values), ``G`` with shared KV and dense attention. Derived from
            ``expert_key_value_heads``; a config without ``expert_key_value_heads`` (written
            before it existed) gives ``G`` here, as it did then.
        head_dim: dimension of one head.
        intermediate_size: FFN size of the dense FFN (``num_experts == 0``).
        moe_intermediate_size: FFN size of one FFN expert.
        hidden_act: ``"silu"`` with ``gated_mlp`` (SwiGLU: ``down(silu(gate x) * up x)``) or
            ``"gelu"`` without (``down(gelu(up x))``).
        norm_type: ``"rmsnorm"`` or ``"layernorm"`` (with bias); ``norm_eps`` its epsilon.
        parallel_block: ``y = x + Attn(Norm(x)) + FFN(Norm(x))`` (one norm per block; BAM's block)
            instead of the sequential ``x + Attn(Norm(x))``, then ``+ FFN(Norm(.))``.
        position_embedding_type: ``"rope"`` or ``"learned_absolute"``.
        rope_theta, partial_rotary_factor: RoPE base and the fraction of each head it rotates.
        rope_interleaved: rotate the pairs ``(2i, 2i+1)`` instead of ``(i, i + rot/2)``.
        qkv_bias / linear_bias / qk_norm: biases on the query/key/value projections / on every
            linear layer; a norm over the head dimension on queries and keys (dense attention).
        attention_dropout: dropout on the attention probabilities (training only).
        num_attention_experts: N attention experts (1: ordinary attention).
        kv_sharing: the experts share one key/value projection (and one KV cache).
        attention_routing: ``"soft"`` (softmax over all experts) or ``"topk"``
            (``attention_top_k``, renormalised when ``attention_top_k_renormalize``).
        num_experts: routed FFN experts (0: a dense FFN); ``num_experts_per_tok`` of them per token.
        router_pre_softmax: softmax over all experts, then top-k, weights not renormalised (BAM);
            otherwise top-k of the logits, softmax over those k (BTX / Mixtral).
        router_type: ``"linear"`` (logits ``W x``) or ``"nexus"`` (logits ``x · e_i`` with expert
            embeddings ``e_i = W2 · SwiGLU(W1 · d_i)`` from fixed domain embeddings ``d_i``).
        nexus_domain_size, nexus_projection_size: D and P of the Nexus projection.
        shared_expert_intermediate_size: FFN size of an always-on shared FFN expert added to
            the routed ones (0: none).
        output_router_logits, router_aux_loss_coef: as in Mixtral (load-balancing loss).
    """

    model_type = "bam"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=4096,
        moe_intermediate_size=None,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=None,
        expert_key_value_heads=None,
        head_dim=None,
        max_position_embeddings=2048,
        hidden_act="silu",
        gated_mlp=True,
        norm_type="rmsnorm",
        norm_eps=1e-5,
        parallel_block=True,
        position_embedding_type="rope",
        rope_theta=10000.0,
        partial_rotary_factor=1.0,
        rope_interleaved=False,
        qkv_bias=False,
        linear_bias=False,
        qk_norm=False,
        attention_dropout=0.0,
        num_attention_experts=1,
        kv_sharing=False,
        attention_routing="soft",
        attention_top_k=1,
        attention_top_k_renormalize=True,
        num_experts=0,
        num_experts_per_tok=1,
        router_pre_softmax=True,
        router_type="linear",
        nexus_domain_size=None,
        nexus_projection_size=None,
        shared_expert_intermediate_size=0,
        output_router_logits=False,
        router_aux_loss_coef=0.0,
        initializer_range=0.02,
        use_cache=True,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size or intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_attention_experts = num_attention_experts
        self.kv_sharing = kv_sharing
        self.expert_key_value_heads = expert_key_value_heads or num_key_value_heads or num_attention_heads
        self.num_key_value_heads = self.expert_key_value_heads * self.cache_experts
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.hidden_act = hidden_act
        self.gated_mlp = gated_mlp
        self.norm_type = norm_type
        self.norm_eps = norm_eps
        self.parallel_block = parallel_block
        self.position_embedding_type = position_embedding_type
        self.rope_theta = rope_theta
        self.partial_rotary_factor = partial_rotary_factor
        self.rope_interleaved = rope_interleaved
        self.qkv_bias = qkv_bias
        self.linear_bias = linear_bias
        self.qk_norm = qk_norm
        self.attention_dropout = attention_dropout
        self.attention_routing = attention_routing
        self.attention_top_k = attention_top_k
        self.attention_top_k_renormalize = attention_top_k_renormalize
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.router_pre_softmax = router_pre_softmax
        self.router_type = router_type
        self.nexus_domain_size = nexus_domain_size or hidden_size
        self.nexus_projection_size = nexus_projection_size or hidden_size
        self.shared_expert_intermediate_size = shared_expert_intermediate_size or 0
        self.output_router_logits = output_router_logits
        self.router_aux_loss_coef = router_aux_loss_coef
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self._check()

    @property
    def cache_experts(self) -> int:
        """How many attention experts keep their own keys and values (N with KV experts, else 1)."""
        return 1 if self.kv_sharing else self.num_attention_experts

    def _check(self):
        if self.norm_type not in ("rmsnorm", "layernorm"):
            raise ValueError(f"norm_type must be rmsnorm or layernorm, got {self.norm_type!r}")
        if self.position_embedding_type not in ("rope", "learned_absolute"):
            raise ValueError(f"position_embedding_type must be rope or learned_absolute, got {self.position_embedding_type!r}")
        if self.attention_routing not in ("soft", "topk"):
            raise ValueError(f"attention_routing must be soft or topk, got {self.attention_routing!r}")
        if self.router_type not in ("linear", "nexus"):
            raise ValueError(f"router_type must be linear or nexus, got {self.router_type!r}")
        if self.num_attention_heads % self.expert_key_value_heads:
            raise ValueError("expert_key_value_heads must divide num_attention_heads")
        if self.num_attention_experts > 1 and (self.qkv_bias or self.linear_bias or self.qk_norm):
            raise ValueError("attention experts have no biases and no query/key norms")
        if (self.router_type != "linear" or self.shared_expert_intermediate_size) and not self.num_experts:
            raise ValueError("a Nexus router and a shared expert need FFN experts (num_experts > 0)")


__all__ = ["BAMConfig"]
