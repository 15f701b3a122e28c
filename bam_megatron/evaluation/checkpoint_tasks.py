"""One checkpoint on several multiple-choice task files (``tools/evaluate_bam.py --tasks``).

Loads the checkpoint's model at the requested layout (``inference/load.py``), tokenizes with the
checkpoint's tokenizer and scores each task (``multiple_choice.py``); the process groups exist
only for the duration of the call.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

from bam_megatron.checkpoint.opener.opening import DEFAULT_OPTIONS
from bam_megatron.checkpoint.opener.options import OpenOptions
from bam_megatron.evaluation.multiple_choice import score_task
from bam_megatron.evaluation.tasks import load_task


def evaluate_checkpoint_on_tasks(
    load: str,
    tasks: Sequence[Tuple[str, str]],
    *,
    num_fewshot: int = 0,
    fewshot_seed: int = 1234,
    batch_size: int = 16,
    limit: Optional[int] = None,
    layout: Tuple[int, int, int] = (1, 1, 1),
    tokenizer_model: Optional[str] = None,
    seed: int = 1234,
    options: OpenOptions = DEFAULT_OPTIONS,
) -> Dict[str, dict]:
    """``{task name: metrics}`` of checkpoint ``load`` on ``tasks`` (``(name, path)`` pairs).

    Args:
        limit: score only the first ``limit`` items of each task.
        layout: ``(tensor, pipeline, expert)`` parallel sizes of this run.
        tokenizer_model: replaces the tokenizer file the checkpoint records.
        options: how the checkpoint is opened (checksums, trust).

    Raises:
        BAMError: a bad checkpoint, task file or layout (one line).
    """
    from bam_megatron.checkpoint.opener import open_checkpoint
    from bam_megatron.inference.load import build_tokenizer_for, load_model
    from bam_megatron.parallel.distributed import destroy_distributed, init_distributed
    from bam_megatron.training.configs import ParallelLayout

    items = {name: load_task(path)[:limit] for name, path in tasks}  # errors before any process group
    ckpt = open_checkpoint(load, what=load, options=options, tensors="defer")
    tokenizer = build_tokenizer_for(ckpt, tokenizer_model=tokenizer_model)
    tp, pp, ep = layout
    init_distributed(tp, pp, ep, seed=seed)
    try:
        loaded = load_model(ckpt, ParallelLayout(tp, pp, ep))
        results = {}
        for name, task_items in items.items():
            results[name] = score_task(
                loaded.model, task_items, tokenizer.tokenize, tokenizer.eod,
                max_length=loaded.max_sequence_length, num_fewshot=num_fewshot, seed=fewshot_seed,
                batch_size=batch_size,
            )
        return results
    finally:
        destroy_distributed()
