"""``BAMForCausalLM`` known to transformers by name, like its own classes.

transformers' Auto classes find the class of an exported folder through its ``auto_map``
(``trust_remote_code=True``), but some of its programs look the architecture up as an attribute
of the ``transformers`` module — ``transformers serve`` loads a model with
``getattr(transformers, config.architectures[0])`` — where a remote-code class is not.
``register()`` adds this package's ``BAMConfig`` (model type ``bam``), ``BAMModel`` and
``BAMForCausalLM`` to ``AutoConfig``, ``AutoModel`` and ``AutoModelForCausalLM`` and sets them
as attributes of ``transformers``: afterwards exported folders load without
``trust_remote_code``, with this package's copy of the code (the one ``hf_export.py`` copies
into every folder).
"""

from __future__ import annotations


def register() -> None:
    """Register the BAM classes with transformers (idempotent)."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from bam_megatron.hf.bam_model.configuration_bam import BAMConfig
    from bam_megatron.hf.bam_model.modeling_bam import BAMForCausalLM, BAMModel

    if getattr(transformers, "BAMForCausalLM", None) is BAMForCausalLM:
        return
    AutoConfig.register(BAMConfig.model_type, BAMConfig, exist_ok=True)
    AutoModel.register(BAMConfig, BAMModel, exist_ok=True)
    AutoModelForCausalLM.register(BAMConfig, BAMForCausalLM, exist_ok=True)
    for cls in (BAMConfig, BAMModel, BAMForCausalLM):
        setattr(transformers, cls.__name__, cls)
