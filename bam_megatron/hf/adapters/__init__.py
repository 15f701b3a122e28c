"""State-dict adapters between Hugging Face model classes and this project's checkpoints.

``IMPORTERS``: the classes ``tools/hf_import.py`` reads (``BAMForCausalLM``: our own exports,
back into the checkpoint of their model). ``EXPORTERS``: the classes
``tools/hf_export.py`` may write, in order of preference; the first whose ``export_problem`` is
None (and, where an adapter has one, whose ``value_problem`` is None) is used, and
``BAMForCausalLM`` holds everything.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from bam_megatron.errors import HFError
from bam_megatron.hf.adapters.bam import BAMAdapter
from bam_megatron.hf.adapters.base import Adapter, HFConfig
from bam_megatron.hf.adapters.cohere import CohereAdapter
from bam_megatron.hf.adapters.llama import LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter
from bam_megatron.hf.adapters.mixtral import MixtralAdapter

IMPORTERS: Dict[str, type] = {
    cls.architecture: cls for cls in (LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter, CohereAdapter, BAMAdapter)
}
EXPORTERS: Tuple[type, ...] = (LlamaAdapter, Qwen2Adapter, Qwen3Adapter, CohereAdapter, MixtralAdapter, BAMAdapter)
EXPORT_NAMES = {cls.model_type: cls for cls in EXPORTERS}


def importer_for(cfg: HFConfig) -> Adapter:
    """The adapter of ``cfg``'s architecture.

    Raises:
        HFError: an architecture this project does not import, naming the field.
    """
    arch = cfg.architecture
    if arch not in IMPORTERS:
        raise cfg.refuse("architectures", f"not supported; supported: {', '.join(sorted(IMPORTERS))}")
    return IMPORTERS[arch]()


def export_candidates(forced: str = "auto") -> List[Adapter]:
    """Adapters to try in order (``forced``: one model type, e.g. ``bam``)."""
    if forced == "auto":
        return [cls() for cls in EXPORTERS]
    if forced not in EXPORT_NAMES:
        raise HFError(f"unknown --architecture {forced!r}; choose auto or one of {', '.join(EXPORT_NAMES)}")
    return [EXPORT_NAMES[forced]()]


__all__ = ["Adapter", "EXPORTERS", "HFConfig", "IMPORTERS", "export_candidates", "importer_for"]
