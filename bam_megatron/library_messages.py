"""Messages of other libraries that every program filters once, at its start (no torch import).

Each entry is a message that tells a user of this project nothing they can act on. Everything
else a library says is shown; run with ``BAM_SHOW_LIBRARY_MESSAGES=1`` to see these too.

| message (start) | from | why it is filtered |
|---|---|---|
| ``Transformer Engine and Apex are not installed`` | megatron-core optimizer, clip_grads, FSDP | the pure-PyTorch path is this project's tested path; README says when TE is used |
| ``Apex is not installed. Falling back to Torch Norm`` | megatron-core models | the same |
| ``full scope is deprecated`` | megatron-core 0.16.1 ``TransformerConfig`` | its own default; no CUDA graphs are used |
| ``\\`load_state_dict\\` is deprecated`` | torch DCP, called by megatron-core's loader | megatron-core's call, not ours |
| ``Please use DTensor instead`` | torch, megatron-core's sharded tensors | the same |
| ``torch.distributed is disabled, unavailable or uninitialized`` | torch DCP ``save`` | the tools' single-process writers ask for ``no_dist`` explicitly; torch warns anyway |
| ``Unable to save ... indexes because path_to_cache is None`` | megatron-core datasets | runs without ``--save`` / ``--data-cache-path`` build indexes in memory on purpose |
| ``Local process N encountered an error`` | megatron-core's checkpoint writer | the save's own error says it in one line (a disk condition) or with its traceback |
"""

from __future__ import annotations

import logging
import os
import warnings

WARNINGS = (
    (UserWarning, r"Transformer Engine and Apex are not installed"),
    (UserWarning, r"Apex is not installed"),
    (UserWarning, r"full scope is deprecated"),
    (FutureWarning, r"`load_state_dict` is deprecated"),
    (FutureWarning, r"Please use DTensor instead"),
    (UserWarning, r"torch.distributed is disabled, unavailable or uninitialized"),
)
LOG_MESSAGES = {
    "megatron.core.datasets.gpt_dataset": "because path_to_cache is None",
    "megatron.core.datasets.blended_dataset": "because path_to_cache is None",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "encountered an error",
}


class _Drop(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


_installed = False


def quiet_libraries() -> None:
    """Install the filters of the module docstring (idempotent; a no-op with
    ``BAM_SHOW_LIBRARY_MESSAGES=1``)."""
    global _installed
    if _installed or os.environ.get("BAM_SHOW_LIBRARY_MESSAGES") == "1":
        return
    for category, message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, text in LOG_MESSAGES.items():
        logging.getLogger(name).addFilter(_Drop(text))
    _installed = True
