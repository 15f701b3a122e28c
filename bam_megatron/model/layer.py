"""The BAM parallel transformer block (GPT-J / PaLM style, one norm per block)::

    h = Norm(x)
    y = x + Attn(h) + FFN(h)

``Attn`` is megatron-core's ``SelfAttention`` (dense seeds, BTX) or the Mixture of Attention;
``FFN`` is megatron-core's ``MLP`` (dense) or ``MoELayer`` (FFN experts). The class reuses
megatron-core's ``TransformerLayer`` for building the submodules from a spec, for the
global ``layer_number`` under pipeline parallelism, for the MoE aux-loss layer bookkeeping and
for ``sharded_state_dict``; only the forward differs. The sequential block needs no class of
its own: it is megatron-core's ``TransformerLayer`` with the same submodules.
"""

from __future__ import annotations

from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor


class BAMParallelTransformerLayer(TransformerLayer):
    """Parallel attention + FFN block. Input and output ``[s, b, h]`` (``[s/TP, b, h]`` with
    sequence parallelism). The spec must set ``pre_mlp_layernorm`` to ``IdentityOp``."""

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        context=None,
        context_mask=None,
        rotary_pos_emb=None,
        rotary_pos_cos=None,
        rotary_pos_sin=None,
        rotary_pos_cos_sin=None,
        attention_bias=None,
        inference_context=None,
        packed_seq_params=None,
        sequence_len_offset=None,
        padding_mask=None,
        *,
        inference_params=None,
        **unused,
    ):
        """Returns ``(output [s, b, h], context)`` like ``TransformerLayer``.

        Inference: ``inference_context`` (megatron-core's static context; ``inference_params`` is
        its deprecated name) goes to the attention, which keeps the KV cache; the FFN (dense or
        ``MoELayer``) is per token and needs no state.
        """
        inference_context = inference_context if inference_context is not None else inference_params
        residual = hidden_states
        normed = self.input_layernorm(hidden_states)

        attn_out = self.self_attention(
            normed,
            attention_mask=attention_mask,
            inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin,
            attention_bias=attention_bias,
            packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset,
        )
        with self.bias_dropout_add_exec_handler():
            hidden_states = self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(
                attn_out, residual, self.hidden_dropout
            )

        if self.is_moe_layer:
            mlp_out = self.mlp(normed, padding_mask=padding_mask)
        elif self.recompute_mlp:
            mlp_out = tensor_parallel.checkpoint(self.mlp, False, normed)
        else:
            mlp_out = self.mlp(normed)
        with self.bias_dropout_add_exec_handler():
            output = self.mlp_bda(self.training, self.config.bias_dropout_fusion)(
                mlp_out, hidden_states, self.hidden_dropout
            )
        output = make_viewless_tensor(inp=output, requires_grad=output.requires_grad, keep_graph=True)
        return output, context
