"""``BAMForCausalLM``: BAM (Branch-Attend-Mix) models in transformers, with a KV cache.

Computes what bam-megatron's megatron-core model computes (written by ``tools/hf_export.py``;
logits agree to float32 rounding). Shipped beside the weights, loaded with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``; imports only torch and
transformers.

A layer is a parallel block ``y = x + Attn(Norm(x)) + FFN(Norm(x))`` or a sequential one.
``Attn`` is ordinary attention or a Mixture of Attention over N experts::

    MoA(h) = sum_e p_e(h) · O_e · MHA(Q_e h, K_e h, V_e h),   p(h) = softmax(W_router h)

(top-k routing keeps the k largest weights). With *KV experts* every expert has its own K, V
and the cache holds N·G key/value heads per layer (one set per expert); with *shared KV* the
experts share one K, V and the cache holds the G heads of the dense model, one cache for all
experts. ``FFN`` is a dense MLP or N FFN experts with a top-k router; ``output_router_logits``
returns the routers' logits per layer as Mixtral does (``router_logits`` for the FFN,
``attention_router_logits`` for the attention) and adds the load-balancing loss.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .configuration_bam import BAMConfig

# transformers renamed the cache argument and output field ``past_key_values`` -> ``cache``.
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(MoeCausalLMOutputWithPast)} else "past_key_values"


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


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``q [b, H, s, dh]``, ``k, v [b, G, t, dh]`` (query head ``h`` uses key head ``h // (H/G)``),
    ``mask`` bool ``[b, 1, s, t]`` (True: attend) or None (causal) -> ``[b, s, H·dh]``."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


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
        h, g = config.num_attention_heads, config.num_key_value_heads
        self.heads, self.groups, self.head_dim = h, g, dh
        self.num_experts = config.num_attention_experts

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
            per_expert = "qo" if config.kv_sharing else "qkvo"
            self.experts = nn.ModuleList([projections(per_expert) for _ in range(self.num_experts)])
            if config.kv_sharing:
                for name, module in projections("kv").items():
                    self.add_module(name, module)

    def _heads(self, proj: nn.Linear, x: torch.Tensor, norm: Optional[nn.Module] = None) -> torch.Tensor:
        b, s, _ = x.shape
        y = proj(x).view(b, s, -1, self.head_dim)
        if norm is not None:
            y = norm(y)
        return y.transpose(1, 2)

    def _rope(self, t: torch.Tensor, rope) -> torch.Tensor:
        return t if rope is None else apply_rope(t, *rope, self.config.rope_interleaved)

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

    def forward(self, x: torch.Tensor, rope, mask: Optional[torch.Tensor], cache: Optional[Cache]):
        """``x [b, s, d]`` -> ``(out [b, s, d], router logits [b·s, N] or None)``."""
        if self.num_experts == 1:
            q = self._rope(self._heads(self.q_proj, x, getattr(self, "q_norm", None)), rope)
            k = self._rope(self._heads(self.k_proj, x, getattr(self, "k_norm", None)), rope)
            v = self._heads(self.v_proj, x)
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)
            return self.o_proj(attend(q, k, v, mask)), None
        logits, probs = self.route(x)
        probs = probs.to(x.dtype)
        if self.config.kv_sharing:
            k, v = self._rope(self._heads(self.k_proj, x), rope), self._heads(self.v_proj, x)
        else:  # every expert's key/value heads side by side: [b, N·G, s, dh]
            k = torch.cat([self._rope(self._heads(e.k_proj, x), rope) for e in self.experts], dim=1)
            v = torch.cat([self._heads(e.v_proj, x) for e in self.experts], dim=1)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = torch.zeros_like(x)
        g = self.groups
        for i, expert in enumerate(self.experts):
            q = self._rope(self._heads(expert.q_proj, x), rope)
            k_e, v_e = (k, v) if self.config.kv_sharing else (k[:, i * g : (i + 1) * g], v[:, i * g : (i + 1) * g])
            out = out + probs[..., i : i + 1] * expert.o_proj(attend(q, k_e, v_e, mask))
        return out, logits.reshape(-1, self.num_experts)


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


class BAMSparseMoE(nn.Module):
    """N FFN experts, each token through ``num_experts_per_tok`` of them."""

    def __init__(self, config: BAMConfig):
        super().__init__()
        self.config = config
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList([BAMMLP(config, config.moe_intermediate_size) for _ in range(config.num_experts)])

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
        return out.view_as(x), logits


# ---------------------------------------------------------------------------------- layers


class BAMDecoderLayer(nn.Module):
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

    def forward(self, x: torch.Tensor, rope, mask, cache):
        """``x [b, s, d]`` -> ``(y, attention router logits, FFN router logits)``."""
        h = self.input_layernorm(x)
        attn, attn_logits = self.self_attn(h, rope, mask, cache)
        if self.parallel:
            ffn, ffn_logits = self._ffn(h)
            return (x + attn) + ffn, attn_logits, ffn_logits
        x = x + attn
        ffn, ffn_logits = self._ffn(self.post_attention_layernorm(x))
        return x + ffn, attn_logits, ffn_logits


class BAMPreTrainedModel(PreTrainedModel):
    config_class = BAMConfig
    config: BAMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["BAMDecoderLayer"]


def build_mask(attention_mask: Optional[torch.Tensor], batch: int, q_len: int, past: int, device) -> Optional[torch.Tensor]:
    """Bool ``[b, 1, q, past+q]`` (True: attend): causal and, with a 2-D ``attention_mask``
    (1 = token, 0 = padding), no padded keys. None when plain causal attention (no cache) or
    full attention (one new token) suffices."""
    total = past + q_len
    if attention_mask is not None and attention_mask.dim() == 2 and bool(attention_mask[:, -total:].all()):
        attention_mask = None
    if attention_mask is None and (past == 0 or q_len == 1):
        return None
    q_pos = torch.arange(past, total, device=device)[:, None]
    mask = (torch.arange(total, device=device)[None, :] <= q_pos)[None, None].expand(batch, 1, q_len, total)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, -total:].bool().to(device)
        mask = mask | (torch.arange(total, device=device)[None, :] == q_pos)[None, None]  # no empty rows
    return mask


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

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None):
        """Returns ``(hidden [b, s, d], cache, attention router logits, FFN router logits)``."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, s, _ = x.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            # left padding: every sequence's first real token is position 0
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -s:].to(x.device)
        elif position_ids is None:
            position_ids = torch.arange(past, past + s, device=x.device)[None].expand(b, s)
        rope = None
        if self.config.position_embedding_type == "rope":
            rope = rope_cos_sin(self.config, position_ids, x.device)
        else:
            x = x + self.embed_positions(position_ids)
        mask = build_mask(attention_mask, b, s, past, x.device)
        attn_logits, ffn_logits = [], []
        for layer in self.layers:
            x, a, f = layer(x, rope, mask, cache)
            attn_logits.append(a)
            ffn_logits.append(f)
        return self.norm(x), cache, attn_logits, ffn_logits


def load_balancing_loss(router_logits, num_experts: int, top_k: int) -> torch.Tensor:
    """Switch-style ``N · sum_i f_i · P_i`` over all layers' FFN routers: ``f_i`` the fraction of
    token slots sent to expert ``i``, ``P_i`` its mean router probability."""
    logits = torch.cat([r.float() for r in router_logits], dim=0)
    probs = torch.softmax(logits, dim=-1)
    chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).float().sum(dim=1)
    return num_experts * (chosen.mean(dim=0) / top_k * probs.mean(dim=0)).sum()


class BAMForCausalLM(BAMPreTrainedModel, GenerationMixin):
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
        output_router_logits: Optional[bool] = None,
        logits_to_keep: int = 0,
        past_key_values: Optional[Cache] = None,
        **kwargs,
    ) -> BAMCausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        if not use_cache:
            cache = None
        output_router_logits = self.config.output_router_logits if output_router_logits is None else output_router_logits
        hidden, cache, attn_logits, ffn_logits = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = aux_loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        ffn_router = tuple(f for f in ffn_logits if f is not None)
        if output_router_logits and ffn_router:
            aux_loss = load_balancing_loss(ffn_router, self.config.num_experts, self.config.num_experts_per_tok)
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss
        out = {"loss": loss, "aux_loss": aux_loss, "logits": logits, CACHE_FIELD: cache}
        if output_router_logits:
            out["router_logits"] = ffn_router or None
            out["attention_router_logits"] = tuple(a for a in attn_logits if a is not None) or None
        return BAMCausalLMOutputWithPast(**out)


__all__ = ["BAMForCausalLM", "BAMModel", "BAMPreTrainedModel"]
