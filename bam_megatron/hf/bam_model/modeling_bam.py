"""``BAMForCausalLM``: BAM (Branch-Attend-Mix) models in transformers, with KV caches.

Computes what bam-megatron's megatron-core model computes (written by ``tools/hf_export.py``;
logits agree to float32 rounding). Shipped beside the weights, loaded with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``; imports only torch and
transformers.

A layer is a parallel block ``y = x + Attn(Norm(x)) + FFN(Norm(x))`` or a sequential one.
``Attn`` is ordinary attention or a Mixture of Attention over N experts::

    MoA(h) = sum_e p_e(h) · O_e · MHA(Q_e h, K_e h, V_e h),   p(h) = softmax(W_router h)

(top-k routing keeps the k largest weights). The N experts' heads run as one attention call
through transformers' attention interface (``attn_implementation`` ``"eager"``, ``"sdpa"`` or
``"flex_attention"``), in grouped-query form: query head ``j`` reads key/value head
``j // num_key_value_groups``.

- *KV experts* (every expert its own Q, K, V, O): ``N·H`` query heads in (expert, head) order,
  ``N·G`` key/value heads in (expert, group) order — the cache holds ``N·G`` heads per layer
  (``config.num_key_value_heads``), one set per expert.
- *Shared KV* (Q, O per expert, one K, V): ``N·H`` query heads in (group, expert, head) order
  over the ``G`` shared key/value heads — the cache holds the dense model's ``G`` heads.

``output_attentions=True`` returns per layer the probabilities ``[b, N·H, s, t]`` in (expert,
head) order (expert ``e``'s head ``h`` at ``e·H + h``); they exist only in the eager path, so an
``sdpa`` model computes a call with ``output_attentions=True`` eagerly (as transformers 4 did).

``FFN`` is a dense MLP or N routed FFN experts (top-k of a linear router, or of the Nexus router:
logits ``x · e_i`` with ``e_i = W2 · SwiGLU(W1 · d_i)`` from fixed domain embeddings ``d_i``,
computed in float32), plus an always-on shared expert when configured.
``output_router_logits`` returns the routers' logits per layer as Mixtral does
(``router_logits`` for the FFN, ``attention_router_logits`` for the attention) and adds the
load-balancing loss. The decoder layers support gradient checkpointing.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_bam import BAMConfig

try:  # transformers 5: initialisers that leave loaded weights alone
    from transformers import initialization as _init
except ImportError:  # pragma: no cover
    _init = nn.init

# transformers renamed the cache argument and output field ``past_key_values`` -> ``cache``.
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(MoeCausalLMOutputWithPast)} else "past_key_values"
_MASK_PARAMS = set(inspect.signature(create_causal_mask).parameters)


@dataclasses.dataclass
class BAMModelOutputWithPast(MoeModelOutputWithPast):
    """Mixtral's model output plus the attention routers' logits (one ``[tokens, N]`` per layer)."""

    attention_router_logits: Optional[Tuple[torch.FloatTensor, ...]] = None


@dataclasses.dataclass
class BAMCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """Mixtral's output plus the attention routers' logits (one ``[tokens, N]`` per layer)."""

    attention_router_logits: Optional[Tuple[torch.FloatTensor, ...]] = None


class BAMRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class BAMLayerNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def make_norm(config: BAMConfig, size: int) -> nn.Module:
    return (BAMRMSNorm if config.norm_type == "rmsnorm" else BAMLayerNorm)(size, config.norm_eps)


# ---------------------------------------------------------------------------------- RoPE


def rope_cos_sin(config: BAMConfig, position_ids: torch.Tensor, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [b, 1, s, rot]`` for positions ``[b, s]`` (computed in float32)."""
    rot = int(config.head_dim * config.partial_rotary_factor)
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float32, device=device) / rot))
    freqs = position_ids.to(device=device, dtype=torch.float32)[..., None] * inv_freq
    emb = torch.repeat_interleave(freqs, 2, dim=-1) if config.rope_interleaved else torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None], emb.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """RoPE on the first ``rot`` dims of every head of ``x [b, h, s, dh]``."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    if interleaved:
        rotated = torch.stack((-x_rot[..., 1::2], x_rot[..., ::2]), dim=-1).flatten(-2)
    else:
        x1, x2 = x_rot.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    out = x_rot * cos.to(x.dtype) + rotated * sin.to(x.dtype)
    return torch.cat((out, x_pass), dim=-1)


# ---------------------------------------------------------------------------------- attention


def repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[b, Hk, t, dh]`` -> ``[b, Hk·n, t, dh]``, each key/value head repeated ``n`` times in place."""
    if n == 1:
        return x
    b, h, t, dh = x.shape
    return x[:, :, None].expand(b, h, n, t, dh).reshape(b, h * n, t, dh)


def eager_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], scaling: float, dropout: float = 0.0, **kwargs):
    """Softmax attention written out (transformers' attention-interface signature).

    ``query [b, Hq, s, dh]``, ``key, value [b, Hk, t, dh]`` (query head ``j`` reads key head
    ``j // module.num_key_value_groups``), ``attention_mask`` additive float or bool (True:
    attend) ``[b, 1, s, t]``, or None for plain causal attention -> ``(out [b, s, Hq, dh],
    probabilities [b, Hq, s, t])``.
    """
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    s, t = scores.shape[-2:]
    if attention_mask is None and s > 1:  # the sdpa path skips the causal mask; eager needs it
        attention_mask = torch.arange(t, device=scores.device)[None] <= torch.arange(t - s, t, device=scores.device)[:, None]
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def attention_function(implementation: Optional[str], output_attentions: bool, attention_mask) -> Callable:
    """The attention interface of ``implementation``; eager when the probabilities are asked for."""
    if implementation in (None, "eager"):
        return eager_attention_forward
    if output_attentions:
        if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
            raise ValueError(f"output_attentions=True needs attn_implementation 'eager' or 'sdpa', not {implementation!r} "
                             "(it returns no attention probabilities)")
        return eager_attention_forward
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
    return ALL_ATTENTION_FUNCTIONS[implementation]


class BAMAttention(nn.Module):
    """Ordinary attention (N = 1) or the Mixture of Attention (N > 1); see the module docstring.

    Parameters: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (+ biases, ``q_norm``/``k_norm``) for
    N = 1; ``router [N, d]`` and ``experts.<e>.{q,k,v,o}_proj`` (KV experts) or
    ``experts.<e>.{q,o}_proj`` + shared ``k_proj``, ``v_proj`` (shared KV) for N > 1.
    """

    def __init__(self, config: BAMConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        d, dh = config.hidden_size, config.head_dim
        h, g = config.num_attention_heads, config.expert_key_value_heads
        self.heads, self.groups, self.head_dim = h, g, dh
        self.num_experts = config.num_attention_experts
        self.kv_sharing = self.num_experts > 1 and config.kv_sharing
        # query heads per key/value head of the fused call (transformers' attention functions read it)
        self.num_key_value_groups = self.num_experts * h // g if self.kv_sharing else h // g
        self.scaling = dh**-0.5
        self.is_causal = True

        def projections(names):
            bias = config.qkv_bias or config.linear_bias
            sizes = {"q": (h * dh, d, bias), "k": (g * dh, d, bias), "v": (g * dh, d, bias),
                     "o": (d, h * dh, config.linear_bias)}
            return nn.ModuleDict({f"{n}_proj": nn.Linear(sizes[n][1], sizes[n][0], bias=sizes[n][2]) for n in names})

        if self.num_experts == 1:
            for name, module in projections("qkvo").items():
                self.add_module(name, module)
            if config.qk_norm:
                self.q_norm, self.k_norm = make_norm(config, dh), make_norm(config, dh)
        else:
            self.router = nn.Linear(d, self.num_experts, bias=False)
            per_expert = "qo" if self.kv_sharing else "qkvo"
            self.experts = nn.ModuleList([projections(per_expert) for _ in range(self.num_experts)])
            if self.kv_sharing:
                for name, module in projections("kv").items():
                    self.add_module(name, module)

    def _heads(self, proj: nn.Linear, x: torch.Tensor, norm: Optional[nn.Module] = None) -> torch.Tensor:
        b, s, _ = x.shape
        y = proj(x).view(b, s, -1, self.head_dim)
        if norm is not None:
            y = norm(y)
        return y.transpose(1, 2)

    def _qkv(self, x: torch.Tensor, rope) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [b, s, d]`` -> the fused call's ``q [b, Hq, s, dh]``, ``k, v [b, Hk, s, dh]`` (RoPE applied)."""
        b, s, _ = x.shape
        if self.num_experts == 1:
            q = self._heads(self.q_proj, x, getattr(self, "q_norm", None))
            k = self._heads(self.k_proj, x, getattr(self, "k_norm", None))
            v = self._heads(self.v_proj, x)
        elif self.kv_sharing:  # (group, expert, head): each shared key/value head's queries side by side
            q = torch.stack([self._heads(e.q_proj, x).view(b, self.groups, -1, s, self.head_dim) for e in self.experts], dim=2)
            q = q.reshape(b, -1, s, self.head_dim)
            k, v = self._heads(self.k_proj, x), self._heads(self.v_proj, x)
        else:  # (expert, head) queries over (expert, group) keys and values
            q = torch.cat([self._heads(e.q_proj, x) for e in self.experts], dim=1)
            k = torch.cat([self._heads(e.k_proj, x) for e in self.experts], dim=1)
            v = torch.cat([self._heads(e.v_proj, x) for e in self.experts], dim=1)
        if rope is not None:
            q, k = (apply_rope(t, *rope, self.config.rope_interleaved) for t in (q, k))
        return q, k, v

    def route(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Router logits ``[b, s, N]`` and weights ``[b, s, N]`` (float32; zero off the top-k)."""
        logits = self.router(x)
        probs = torch.softmax(logits.float(), dim=-1)
        if self.config.attention_routing == "topk":
            top, idx = probs.topk(self.config.attention_top_k, dim=-1)
            if self.config.attention_top_k_renormalize:
                top = top / top.sum(dim=-1, keepdim=True)
            probs = torch.zeros_like(probs).scatter(-1, idx, top)
        return logits, probs

    def _output(self, attn: torch.Tensor, probs: Optional[torch.Tensor]) -> torch.Tensor:
        """``attn [b, s, Hq, dh]`` -> ``[b, s, d]``: each expert's heads through its O, weighted."""
        b, s = attn.shape[:2]
        if self.num_experts == 1:
            return self.o_proj(attn.reshape(b, s, -1))
        if self.kv_sharing:
            per_expert = attn.reshape(b, s, self.groups, self.num_experts, -1).unbind(3)
        else:
            per_expert = attn.reshape(b, s, self.num_experts, -1).unbind(2)
        out = 0
        for i, (expert, heads) in enumerate(zip(self.experts, per_expert)):
            out = out + probs[..., i : i + 1] * expert.o_proj(heads.reshape(b, s, -1))
        return out

    def _expert_major(self, weights: torch.Tensor) -> torch.Tensor:
        """Shared KV's (group, expert, head) probabilities -> (expert, head) order."""
        b, _, s, t = weights.shape
        return weights.view(b, self.groups, self.num_experts, -1, s, t).transpose(1, 2).reshape(b, -1, s, t)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                cache: Optional[Cache] = None, output_attentions: bool = False):
        """``[b, s, d]`` -> ``(out [b, s, d], probabilities [b, N·H, s, t] or None, router logits [b·s, N] or None)``."""
        q, k, v = self._qkv(hidden_states, position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attend = attention_function(self.config._attn_implementation, output_attentions, attention_mask)
        dropout = self.config.attention_dropout if self.training else 0.0
        attn, weights = attend(self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling)
        weights = weights if output_attentions else None
        if self.num_experts == 1:
            return self._output(attn, None), weights, None
        logits, probs = self.route(hidden_states)
        if weights is not None and self.kv_sharing:
            weights = self._expert_major(weights)
        return self._output(attn, probs.to(hidden_states.dtype)), weights, logits.reshape(-1, self.num_experts)


# ---------------------------------------------------------------------------------- FFN


class BAMMLP(nn.Module):
    """SwiGLU ``down(silu(gate x) * up x)`` or ``down(gelu(up x))``."""

    def __init__(self, config: BAMConfig, size: int):
        super().__init__()
        d, bias = config.hidden_size, config.linear_bias
        self.gated = config.gated_mlp
        if self.gated:
            self.gate_proj = nn.Linear(d, size, bias=bias)
        self.up_proj = nn.Linear(d, size, bias=bias)
        self.down_proj = nn.Linear(size, d, bias=bias)
        self.act = F.silu if config.hidden_act == "silu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class BAMNexusRouter(nn.Module):
    """Nexus router: logits ``x · e_i``, ``e_i = W2 · SwiGLU(W1 · d_i)`` (float32).

    ``domain_embeddings [N, D]`` is a fixed float32 buffer (saved with the weights);
    ``projection_fc1 [2P, D]`` (gate rows, then up rows) and ``projection_fc2 [d, P]`` are trained.
    """

    def __init__(self, config: BAMConfig):
        super().__init__()
        n, dsz, p = config.num_experts, config.nexus_domain_size, config.nexus_projection_size
        self.register_buffer("domain_embeddings", torch.zeros(n, dsz, dtype=torch.float32), persistent=True)
        self.projection_fc1 = nn.Linear(dsz, 2 * p, bias=False)
        self.projection_fc2 = nn.Linear(p, config.hidden_size, bias=False)

    def expert_embeddings(self) -> torch.Tensor:
        """``[N, d]`` float32 expert embeddings."""
        gate, up = F.linear(self.domain_embeddings.float(), self.projection_fc1.weight.float()).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.projection_fc2.weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, d]`` -> logits ``[T, N]`` in ``x``'s dtype."""
        return torch.matmul(x, self.expert_embeddings().to(x.dtype).t())


class BAMSparseMoE(nn.Module):
    """N routed FFN experts, each token through ``num_experts_per_tok`` of them, plus an
    always-on ``shared_expert`` when ``shared_expert_intermediate_size`` is set."""

    def __init__(self, config: BAMConfig):
        super().__init__()
        self.config = config
        if config.router_type == "nexus":
            self.router = BAMNexusRouter(config)
        else:
            self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList([BAMMLP(config, config.moe_intermediate_size) for _ in range(config.num_experts)])
        if config.shared_expert_intermediate_size:
            self.shared_expert = BAMMLP(config, config.shared_expert_intermediate_size)

    def route(self, logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``[T, N]`` logits -> top-k weights and expert indices ``[T, k]``."""
        k = self.config.num_experts_per_tok
        if self.config.router_pre_softmax:  # softmax over all, then top-k (not renormalised)
            scores = torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits)
            weights, idx = scores.topk(k, dim=-1)
        else:  # top-k logits, softmax over those k
            top, idx = logits.topk(k, dim=-1)
            weights = torch.softmax(top, dim=-1, dtype=torch.float32).type_as(logits)
        return weights, idx

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``x [b, s, d]`` -> ``(out [b, s, d], router logits [b·s, N])``."""
        flat = x.reshape(-1, x.shape[-1])
        logits = self.router(flat)
        weights, idx = self.route(logits)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = (idx == e).nonzero(as_tuple=True)
            if token.numel():
                out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        if hasattr(self, "shared_expert"):
            out = out + self.shared_expert(flat)
        return out.view_as(x), logits


# ---------------------------------------------------------------------------------- layers


class BAMDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: BAMConfig, layer_idx: int):
        super().__init__()
        self.parallel = config.parallel_block
        self.input_layernorm = make_norm(config, config.hidden_size)
        if not self.parallel:
            self.post_attention_layernorm = make_norm(config, config.hidden_size)
        self.self_attn = BAMAttention(config, layer_idx)
        self.mlp = BAMSparseMoE(config) if config.num_experts else BAMMLP(config, config.intermediate_size)

    def _ffn(self, h: torch.Tensor):
        out = self.mlp(h)
        return out if isinstance(out, tuple) else (out, None)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_embeddings=None,
                cache: Optional[Cache] = None, output_attentions: bool = False, **kwargs):
        """``[b, s, d]`` -> ``(y, attention probabilities, attention router logits, FFN router logits)``."""
        x = hidden_states
        h = self.input_layernorm(x)
        attn, weights, attn_logits = self.self_attn(h, position_embeddings, attention_mask, cache, output_attentions)
        if self.parallel:
            ffn, ffn_logits = self._ffn(h)
            return (x + attn) + ffn, weights, attn_logits, ffn_logits
        x = x + attn
        ffn, ffn_logits = self._ffn(self.post_attention_layernorm(x))
        return x + ffn, weights, attn_logits, ffn_logits


class BAMPreTrainedModel(PreTrainedModel):
    config_class = BAMConfig
    config: BAMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BAMDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # the FFN experts' token dispatch has data-dependent shapes

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, BAMNexusRouter):  # placeholders until the real domain embeddings are loaded
            _init.normal_(module.domain_embeddings, mean=0.0, std=1.0)


def _positions(attention_mask, position_ids, past: int, b: int, s: int, device) -> torch.Tensor:
    """``[b, s]`` positions: as given, else from a 2-D ``attention_mask`` (left padding: every
    sequence's first real token is position 0), else ``past .. past+s-1``."""
    if position_ids is not None:
        return position_ids
    if attention_mask is not None and attention_mask.dim() == 2:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -s:].to(device)
    return torch.arange(past, past + s, device=device)[None].expand(b, s)


def _causal_mask(config, inputs_embeds, attention_mask, cache, position_ids, past: int):
    """transformers' ``create_causal_mask`` for ``config._attn_implementation`` (its argument
    names changed within transformers 5)."""
    kwargs = {"config": config, "attention_mask": attention_mask, "position_ids": position_ids}
    kwargs["inputs_embeds" if "inputs_embeds" in _MASK_PARAMS else "input_embeds"] = inputs_embeds
    kwargs["cache" if "cache" in _MASK_PARAMS else "past_key_values"] = cache
    if "cache_position" in _MASK_PARAMS:
        kwargs["cache_position"] = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device)
    return create_causal_mask(**kwargs)


def _flag(value, default) -> bool:
    return bool(default) if value is None else bool(value)


class BAMModel(BAMPreTrainedModel):
    def __init__(self, config: BAMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding_type == "learned_absolute":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList([BAMDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = make_norm(config, config.hidden_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Optional[Cache] = None,
                inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                output_router_logits=None, return_dict=None, past_key_values=None, **kwargs):
        """Hidden states ``[b, s, d]`` after the final norm; ``hidden_states`` (L + 1: the
        embeddings, every layer's input, the final output), ``attentions`` and router logits
        when asked for."""
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        output_attentions = _flag(output_attentions, cfg.output_attentions)
        output_hidden_states = _flag(output_hidden_states, cfg.output_hidden_states)
        output_router_logits = _flag(output_router_logits, cfg.output_router_logits)
        return_dict = _flag(return_dict, getattr(cfg, "return_dict", True))
        use_cache = _flag(use_cache, cfg.use_cache) and not (self.training and self.is_gradient_checkpointing)
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = DynamicCache(config=cfg)
        if not use_cache:
            cache = None
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, s, _ = x.shape
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = _positions(attention_mask, position_ids, past, b, s, x.device)
        rope = None
        if cfg.position_embedding_type == "rope":
            rope = rope_cos_sin(cfg, position_ids, x.device)
        else:
            x = x + self.embed_positions(position_ids)
        mask = _causal_mask(cfg, x, attention_mask, cache, position_ids, past)
        hidden, attentions, attn_logits, ffn_logits = [], [], [], []
        for layer in self.layers:
            hidden.append(x)
            x, weights, a, f = layer(x, attention_mask=mask, position_embeddings=rope, cache=cache,
                                     output_attentions=output_attentions)
            attentions.append(weights)
            attn_logits.append(a)
            ffn_logits.append(f)
        x = self.norm(x)
        hidden.append(x)
        ffn_router = tuple(f for f in ffn_logits if f is not None)
        attn_router = tuple(a for a in attn_logits if a is not None)
        out = BAMModelOutputWithPast(
            last_hidden_state=x, **{CACHE_FIELD: cache},
            hidden_states=tuple(hidden) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
            router_logits=(ffn_router or None) if output_router_logits else None,
            attention_router_logits=(attn_router or None) if output_router_logits else None,
        )
        return out if return_dict else out.to_tuple()


def load_balancing_loss(router_logits, num_experts: int, top_k: int) -> torch.Tensor:
    """Switch-style ``N · sum_i f_i · P_i`` over all layers' FFN routers: ``f_i`` the fraction of
    token slots sent to expert ``i``, ``P_i`` its mean router probability."""
    logits = torch.cat([r.float() for r in router_logits], dim=0)
    probs = torch.softmax(logits, dim=-1)
    chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).float().sum(dim=1)
    return num_experts * (chosen.mean(dim=0) / top_k * probs.mean(dim=0)).sum()


LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


class BAMForCausalLM(BAMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BAMConfig):
        super().__init__(config)
        self.model = BAMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        output_router_logits: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep=0,
        past_key_values: Optional[Cache] = None,
        **kwargs,
    ):
        """Logits ``[b, s, V]`` (the last ``logits_to_keep`` positions when set); with ``labels``
        the next-token loss (plus ``router_aux_loss_coef`` × the load-balancing loss when
        ``output_router_logits``). ``return_dict=False`` returns the fields as a tuple."""
        output_router_logits = _flag(output_router_logits, self.config.output_router_logits)
        return_dict = _flag(return_dict, getattr(self.config, "return_dict", True))
        out = self.model(input_ids, attention_mask, position_ids, cache if cache is not None else past_key_values,
                         inputs_embeds, use_cache=use_cache, output_attentions=output_attentions,
                         output_hidden_states=output_hidden_states, output_router_logits=output_router_logits,
                         return_dict=True)
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep])
        loss = aux_loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                      **{k: kwargs[k] for k in LOSS_KWARGS if k in kwargs})
        if output_router_logits and out.router_logits:
            aux_loss = load_balancing_loss(out.router_logits, self.config.num_experts, self.config.num_experts_per_tok)
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
        result = BAMCausalLMOutputWithPast(
            loss=loss, aux_loss=aux_loss, logits=logits, **{CACHE_FIELD: getattr(out, CACHE_FIELD)},
            hidden_states=out.hidden_states, attentions=out.attentions, router_logits=out.router_logits,
            attention_router_logits=out.attention_router_logits,
        )
        return result if return_dict else result.to_tuple()


# ``save_pretrained`` of these classes writes ``auto_map`` and copies this code beside the weights.
BAMConfig.register_for_auto_class()
BAMModel.register_for_auto_class("AutoModel")
BAMForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["BAMForCausalLM", "BAMModel", "BAMPreTrainedModel"]
