"""What every Hugging Face adapter offers, and the reader of ``config.json``.

An adapter maps one Hugging Face model class to this project's checkpoint keys with pure
functions on tensors. Each direction works on one unit at a time through a ``get(name)``
callable, so the drivers can stream (one layer in memory) and can *plan* by calling the same
functions on ``meta`` tensors (names and shapes, no data):

- import: ``spec_from_config`` (refuses, naming the field, whatever the model cannot represent
  exactly), ``import_globals`` / ``import_layer`` (Hugging Face names -> our global keys /
  our per-layer names relative to ``decoder.layers.``);
- export: ``export_problem`` (why this class cannot hold a model exactly, or None; from the
  shapes), ``value_problem`` (the same from the stored values, e.g. Cohere's zero norm biases),
  ``export_config`` (``config.json``), ``export_globals`` / ``export_layer`` (our names ->
  Hugging Face names).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Dict, Optional

import torch

from bam_megatron.errors import HFError
from bam_megatron.hf.spec import ModelSpec

Getter = Callable[[str], torch.Tensor]
Tensors = Dict[str, torch.Tensor]
HF_LAYER_PREFIX = "model.layers."


class HFConfig:
    """A Hugging Face ``config.json`` as stored (transformers 4.x or 5.x fields)."""

    def __init__(self, data: dict, path: str):
        self.data, self.path = data, path

    @classmethod
    def read(cls, folder: str) -> "HFConfig":
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            raise HFError(f"{folder} has no config.json; pass a Hugging Face model folder (save_pretrained output)")
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise HFError(f"{path} is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise HFError(f"{path} holds no JSON object")
        return cls(data, path)

    def get(self, name: str, default=None):
        value = self.data.get(name)
        return default if value is None else value

    def require(self, name: str):
        value = self.data.get(name)
        if value is None:
            raise HFError(f"{self.path} has no {name}")
        return value

    def refuse(self, field: str, why: str) -> HFError:
        """The one-line error for a field this project cannot represent exactly."""
        return HFError(f"{self.path}: {field} = {json.dumps(self._field(field))}: {why}")

    def _field(self, field: str):
        value = self.data
        for part in field.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    @property
    def architecture(self) -> str:
        archs = self.data.get("architectures")
        if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
            raise HFError(f"{self.path}: architectures = {json.dumps(archs)}: name exactly one model class, e.g. [\"LlamaForCausalLM\"]")
        return archs[0]

    def rope(self) -> Dict[str, object]:
        """``{"rope_type", "rope_theta", "partial_rotary_factor", "field"}`` from transformers 5's
        ``rope_parameters`` or 4's ``rope_theta`` / ``rope_scaling``; ``field`` names where the
        type was read (for error messages)."""
        params = self.data.get("rope_parameters")
        scaling = self.data.get("rope_scaling")
        if isinstance(params, dict) and params:
            rope_type, field = params.get("rope_type") or params.get("type") or "default", "rope_parameters.rope_type"
            theta = params.get("rope_theta", self.data.get("rope_theta"))
            partial = params.get("partial_rotary_factor", self.data.get("partial_rotary_factor"))
        else:
            rope_type, field = "default", "rope_scaling"
            if isinstance(scaling, dict) and scaling:
                rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
            theta, partial = self.data.get("rope_theta"), self.data.get("partial_rotary_factor")
        return {"rope_type": rope_type, "rope_theta": theta, "partial_rotary_factor": partial, "field": field}


class Adapter:
    """Base class: one Hugging Face model class (``architecture``) <-> this project's keys."""

    architecture = ""
    model_type = ""
    tied_default = False  # the class's default of ``tie_word_embeddings``

    # ---------------------------------------------------------------- import (HF -> ours)
    def tied(self, cfg: HFConfig) -> bool:
        """Whether the model shares its embedding with the output layer."""
        return bool(cfg.get("tie_word_embeddings", self.tied_default))

    def spec_from_config(self, cfg: HFConfig, seq_length: Optional[int], vocab_multiple: int) -> ModelSpec:
        raise HFError(f"{cfg.path}: {self.architecture} cannot be imported (only exported)")

    def import_globals(self, get: Getter, spec: ModelSpec, cfg: HFConfig) -> Tensors:
        raise NotImplementedError

    def import_layer(self, get: Getter, spec: ModelSpec) -> Tensors:
        raise NotImplementedError

    # ---------------------------------------------------------------- export (ours -> HF)
    def export_problem(self, spec: ModelSpec) -> Optional[str]:
        """Why this class cannot hold ``spec`` exactly (None: it can)."""
        raise NotImplementedError

    def value_problem(self, read_global: Getter, read_layers: Getter, spec: ModelSpec) -> Optional[str]:
        """Why the stored values (not only the shapes) keep this class from holding the model
        exactly (None: they do not). ``read_layers(name)`` reads ``decoder.layers.<name> [L, ...]``."""
        return None

    def export_config(self, spec: ModelSpec) -> dict:
        raise NotImplementedError

    def export_globals(self, get: Getter, spec: ModelSpec) -> Tensors:
        raise NotImplementedError

    def export_layer(self, get: Getter, spec: ModelSpec) -> Tensors:
        raise NotImplementedError


def rope_config(spec: ModelSpec) -> dict:
    """``config.json`` RoPE fields readable by transformers 4 (``rope_theta``) and 5
    (``rope_parameters``)."""
    theta = float(spec.rotary_base)
    return {"rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta}}
