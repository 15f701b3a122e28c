"""One forward step of a model at any TP / PP / EP layout, for generation and scoring.

Every rank of a model-parallel group calls ``forward_logits`` with the same tokens. Under
pipeline parallelism the stages run one after the other: a stage receives the previous stage's
hidden states ``[s, b, h]``, runs its layers and sends its output on; the last stage computes
the logits, gathered over tensor-parallel ranks to the full (padded) vocabulary.
``broadcast_from_last_stage`` then hands what the last stage decided (sampled tokens, scores) to
every rank of the pipeline. On one stage both are local.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


def _pipeline_size() -> int:
    return ps.get_pipeline_model_parallel_world_size()


def is_last_stage() -> bool:
    """Whether this rank holds the output layer (computes logits)."""
    return _pipeline_size() == 1 or ps.is_pipeline_last_stage()


def _selected_logits(model, tokens, position_ids, select: torch.Tensor) -> torch.Tensor:
    """Logits of the positions ``select [b, n]`` only: the decoder runs on every position (with
    ``post_process`` off, ``GPTModel.forward`` returns its final hidden states ``[s, b, h]``), the
    output layer only on the selected ones (on a small model it costs as much as the layers)."""
    model.post_process = False
    try:
        hidden = model(tokens, position_ids, None)
    finally:
        model.post_process = True
    rows = torch.arange(select.shape[0], device=select.device).unsqueeze(1)
    picked = hidden.transpose(0, 1)[rows, select].transpose(0, 1)  # [n, b, h]
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    logits, _ = model.output_layer(picked.contiguous(), weight=weight, runtime_gather_output=True)
    return logits.transpose(0, 1)  # [b, n, V]


def forward_logits(model, tokens: torch.Tensor, position_ids: torch.Tensor, context=None,
                   select: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Run the model on ``tokens``; the last pipeline stage returns the logits.

    Args:
        model: this rank's megatron-core ``GPTModel`` (eval mode).
        tokens, position_ids: ``[b, s]`` on this rank's device.
        context: a static inference context (KV cache) or None (no cache, causal mask).
        select: without a context, ``[b, n]`` positions whose logits are wanted (default: all).

    Returns:
        ``[b, s, V]`` logits (``[b, 1, V]`` with a context: megatron-core materialises only the
        last position; ``[b, n, V]`` with ``select``), full padded vocabulary, on the last stage;
        None on other stages.
    """
    pp = _pipeline_size()
    b, s = tokens.shape
    if pp > 1 and not ps.is_pipeline_first_stage():
        config = model.config
        dtype = config.pipeline_dtype or config.params_dtype
        hidden = torch.empty((s, b, config.hidden_size), dtype=dtype, device=tokens.device)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank(), group=ps.get_pipeline_model_parallel_group())
        model.set_input_tensor(hidden)
    if select is not None and context is None and is_last_stage():
        return _selected_logits(model, tokens, position_ids, select)
    kwargs = {"inference_context": context} if context is not None else {}
    out = model(tokens, position_ids, None, runtime_gather_output=True, **kwargs)
    if pp > 1 and not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank(), group=ps.get_pipeline_model_parallel_group())
        return None
    return out


def broadcast_from_last_stage(tensor: Optional[torch.Tensor], shape, dtype, device) -> torch.Tensor:
    """``tensor`` of the last pipeline stage's tensor-parallel rank 0, on every rank of this
    rank's model-parallel group (a no-op on one rank). Other ranks pass None (or anything)."""
    if is_last_stage() and ps.get_tensor_model_parallel_world_size() > 1:
        tensor = tensor.contiguous()
        dist.broadcast(tensor, src=ps.get_tensor_model_parallel_src_rank(), group=ps.get_tensor_model_parallel_group())
    if _pipeline_size() == 1:
        return tensor
    if not is_last_stage():
        tensor = torch.empty(shape, dtype=dtype, device=device)
    else:
        tensor = tensor.contiguous()
    dist.broadcast(tensor, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return tensor
