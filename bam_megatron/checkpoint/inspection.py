"""What a torch_dist checkpoint holds, read from its indexes only (no tensor data).

``inspect_checkpoint`` -> a dict (tensors with global shapes, recorded arguments, iteration,
optimizer / RNG presence, expert layout per layer); ``format_inspection`` -> readable text.
Works on checkpoints of ``pretrain_bam.py``, of the upcycle tool and on Megatron-LM GPT
torch_dist checkpoints.
"""

from __future__ import annotations

import math
import os
from typing import Dict, Sequence

from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from bam_megatron.checkpoint import keys as U
from bam_megatron.checkpoint.dcp_reader import is_model_entry, shape_text
from bam_megatron.checkpoint.opener import DEFAULT_OPTIONS, OpenOptions, open_checkpoint


def human_count(n: float) -> str:
    """``1.23B`` style counts."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def describe_layout(shapes: Dict[str, Sequence[int]]) -> dict:
    """The expert layout of a model from its checkpoint's tensor shapes.

    Returns ``{"num_layers", "block", "attention": {"experts", "kv", "router"},
    "ffn": {"experts", "router", "router_type", "shared_expert"}, "layers": [per-layer dicts]}``;
    ``kv`` is ``"per expert"``, ``"shared"`` or ``"dense"`` (ordinary attention); ``router_type``
    ``"linear"`` or ``"nexus"`` (whose per-layer entry is the domain embeddings' shape).
    """
    lp = U.LAYER_PREFIX
    ln = shapes.get(lp + "input_layernorm.weight") or shapes.get(lp + "self_attention.linear_qkv.layer_norm_weight")
    num_layers = int(ln[0]) if ln is not None else None
    if lp + "self_attention.linear_q.weight" in shapes:
        attn_experts, kv = int(shapes[lp + "self_attention.linear_q.weight"][1]), "shared"
    elif lp + "self_attention.linear_qkv.weight" in shapes and len(shapes[lp + "self_attention.linear_qkv.weight"]) == 4:
        attn_experts, kv = int(shapes[lp + "self_attention.linear_qkv.weight"][1]), "per expert"
    else:
        attn_experts, kv = 1, "dense"
    fc1 = shapes.get(lp + U.EXPERTS_PREFIX + "linear_fc1.weight")
    ffn_experts = int(fc1[1]) if fc1 is not None else 0
    sequential = lp + "pre_mlp_layernorm.weight" in shapes or lp + "mlp.linear_fc1.layer_norm_weight" in shapes
    attn_router = shapes.get(U.ATTN_ROUTER_KEY)
    ffn_router = shapes.get(U.FFN_ROUTER_KEY)
    router_type = "linear"
    if shapes.get(U.NEXUS_DOMAIN_KEY) is not None:
        ffn_router, router_type = shapes[U.NEXUS_DOMAIN_KEY], "nexus"
    layers = [
        {
            "layer": i + 1,
            "attention_experts": attn_experts,
            "kv": kv,
            "attention_router": list(attn_router[1:]) if attn_router is not None else None,
            "ffn_experts": ffn_experts,
            "ffn_router": list(ffn_router[1:]) if ffn_router is not None else None,
        }
        for i in range(num_layers or 0)
    ]
    return {
        "num_layers": num_layers,
        "block": "sequential" if sequential else "parallel",
        "attention": {"experts": attn_experts, "kv": kv, "router": attn_router is not None},
        "ffn": {"experts": ffn_experts, "router": ffn_router is not None, "router_type": router_type,
                "shared_expert": U.SHARED_FC1_KEY in shapes},
        "layers": layers,
    }


def inspect_checkpoint(path: str, include_all: bool = False, options: OpenOptions = DEFAULT_OPTIONS) -> dict:
    """What a torch_dist checkpoint holds: tensors (model, or every entry with
    ``include_all``), recorded arguments, iteration, expert layout. Reads no tensor data (its index
    files are verified and read by the opener)."""
    ckpt = open_checkpoint(path, options=options, tensors="none")
    md, common = ckpt.metadata, ckpt.common
    tensors, others = [], []
    for key, entry in md.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata):
            rec = {"name": key, "shape": [int(x) for x in entry.size], "dtype": str(entry.properties.dtype).replace("torch.", ""),
                   "chunks": len(entry.chunks)}
            if is_model_entry(key):
                tensors.append(rec)
            elif include_all:
                others.append(rec)
            else:
                others.append({"name": key})
        else:
            others.append({"name": key} if not include_all else {"name": key, "shape": None, "dtype": "bytes"})
    tensors.sort(key=lambda r: r["name"])
    shapes = {U.canonical_key(r["name"]): r["shape"] for r in tensors}
    shapes.update({r["name"]: r["shape"] for r in tensors})
    info = {
        "path": os.path.abspath(path),
        "checkpoint_dir": ckpt.dir,
        "iteration": common.get("iteration"),
        "consumed_train_samples": common.get("consumed_train_samples"),
        "has_optimizer_state": ckpt.has_optimizer_state,
        "has_rng_state": ckpt.has_rng_state,
        "layout_saved_with": common.get("layout"),
        "parameters": sum(math.prod(r["shape"]) for r in tensors),
        "tensors": tensors,
        "other_entries": len(others) if not include_all else others,
        "args": ckpt.recorded_args,
        "model": ckpt.model.as_dict(),
        "tokenizer": ckpt.tokenizer.as_dict(),
        "upcycling": ckpt.provenance.upcycling,
        "verification": ckpt.verification.summary(),
        "notes": list(ckpt.notes) + ([ckpt.tokenizer_problem] if ckpt.tokenizer_problem else []),
        "expert_layout": describe_layout(shapes),
    }
    return info


def format_inspection(info: dict, show_args: bool = True) -> str:
    """Readable text for ``inspect_checkpoint``'s dict."""
    lay = info["expert_layout"]
    lines = [
        f"checkpoint: {info['checkpoint_dir']}",
        f"iteration: {info['iteration']}   consumed samples: {info['consumed_train_samples']}   "
        f"optimizer state: {'yes' if info['has_optimizer_state'] else 'no'}   RNG state: {'yes' if info['has_rng_state'] else 'no'}",
        f"parameters: {info['parameters']:,} ({human_count(info['parameters'])})",
    ]
    if info.get("upcycling"):
        up = info["upcycling"]
        names = up.get("expert_names") or []
        seeds = [f"{n} = {p}" if n else p for n, p in zip(list(names) + [None] * len(up.get("seeds", [])), up.get("seeds", []))]
        lines.append(f"upcycled ({up.get('mode')}) from: " + ", ".join(seeds))
    lines.append(f"verification: {info['verification']}")
    lines += [f"note: {n}" for n in info.get("notes", [])]
    tok = info.get("tokenizer") or {}
    if tok.get("tokenizer_type"):
        files = ", ".join(f"{k} = {v}" for k, v in tok.items() if v is not None and k != "tokenizer_type")
        lines.append(f"tokenizer: {tok['tokenizer_type']}" + (f" ({files})" if files else ""))
    lines += ["", "expert layout:"]
    attn = lay["attention"]
    kv_text = {"per expert": "K,V per expert", "shared": "K,V shared", "dense": "ordinary attention"}[attn["kv"]]
    ffn = lay["ffn"]
    ffn_router = "FFN (Nexus)" if ffn.get("router_type") == "nexus" else "FFN"
    lines.append(
        f"  {lay['num_layers']} layers, {lay['block']} blocks; attention experts {attn['experts']} ({kv_text}); "
        f"FFN experts {ffn['experts'] or 'none (dense FFN)'}{' + 1 shared' if ffn.get('shared_expert') else ''}; routers: "
        + (", ".join(x for x, on in (("attention", attn["router"]), (ffn_router, ffn["router"])) if on) or "none")
    )
    rows = [("layer", "attention experts", "KV", "attention router", "FFN experts", "FFN router")]
    for r in lay["layers"]:
        rows.append((
            str(r["layer"]), str(r["attention_experts"]), r["kv"],
            shape_text(r["attention_router"]) if r["attention_router"] else "-",
            str(r["ffn_experts"] or "-"),
            shape_text(r["ffn_router"]) if r["ffn_router"] else "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        lines.append("  " + " | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  " + "-+-".join("-" * w for w in widths))
    lines += ["", "tensors:"]
    wn = max([len(t["name"]) for t in info["tensors"]] + [4])
    ws = max([len(shape_text(t["shape"])) for t in info["tensors"]] + [5])
    for t in info["tensors"]:
        lines.append(f"  {t['name']:<{wn}}  {shape_text(t['shape']):<{ws}}  {t['dtype']}")
    others = info["other_entries"]
    if isinstance(others, int):
        if others:
            lines.append(f"  (+ {others} optimizer / RNG / extra-state entries; --all lists them)")
    else:
        for t in others:
            shape = shape_text(t["shape"]) if t.get("shape") else ""
            lines.append(f"  {t['name']:<{wn}}  {shape:<{ws}}  {t.get('dtype', '')}")
    if show_args:
        lines += ["", "recorded arguments:"]
        for k in sorted(info["args"]):
            lines.append(f"  {k} = {info['args'][k]!r}")
    return "\n".join(lines)


def verify(path: str, progress=None, options: OpenOptions = DEFAULT_OPTIONS) -> str:
    """Open the checkpoint verifying every file (structure, then every recorded checksum);
    returns a one-line summary. Raises ``CheckpointError`` naming the first damaged file."""
    ckpt = open_checkpoint(path, options=options, tensors="verify", progress=progress)
    return f"{ckpt.dir}: {ckpt.verification.summary()}"
