"""Routing statistics of BAM models: do the experts specialise?

``RoutingRecorder`` hooks a model's attention routers (Mixture of Attention) and FFN routers
(megatron-core ``TopKRouter``) for the duration of a ``with`` block and returns, per layer and
expert, the mean attention-router weight and the fraction of FFN routing slots sent to each
expert — reduced over all ranks, so the result is the same at any TP/PP/EP/DP layout.
``write_routing_report`` saves them as CSV and PNG heatmaps (one per router kind, a panel per
domain), experts named after the checkpoints they were upcycled from.
"""

from __future__ import annotations

import csv
import os
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from bam_megatron.parallel.distributed import get_device


class RoutingRecorder:
    """Context manager collecting routing statistics of ``model`` (a list of model chunks).

    ``result()``: ``{"attention": [L][N_a] mean router weights or None,
    "ffn": [L][N_f] load fractions or None}`` with ``L`` the global layer count.
    """

    def __init__(self, model, num_layers: int):
        self.model = model
        self.num_layers = num_layers
        self._handles = []
        self._attn_sum: Optional[torch.Tensor] = None  # [L, N_a]
        self._attn_count = torch.zeros(num_layers, dtype=torch.float64)
        self._ffn: Optional[torch.Tensor] = None  # [L, N_f]

    def _on_attention(self, module, _inputs, _output):
        mean = module.last_router_mean
        if mean is None:
            return
        if self._attn_sum is None:
            self._attn_sum = torch.zeros(self.num_layers, mean.numel(), dtype=torch.float64)
        self._attn_sum[module.layer_number - 1] += mean.detach().double().cpu()
        self._attn_count[module.layer_number - 1] += 1

    def _on_ffn_router(self, module, _inputs, output):
        routing_map = output[1]
        counts = routing_map.sum(dim=0).detach().double().cpu()
        if self._ffn is None:
            self._ffn = torch.zeros(self.num_layers, counts.numel(), dtype=torch.float64)
        self._ffn[module.layer_number - 1] += counts

    def __enter__(self):
        from megatron.core.transformer.moe.router import TopKRouter

        from bam_megatron.model.moa import MixtureOfAttention

        for chunk in self.model:
            for module in chunk.modules():
                if isinstance(module, MixtureOfAttention):
                    self._handles.append(module.register_forward_hook(self._on_attention))
                elif isinstance(module, TopKRouter):
                    self._handles.append(module.register_forward_hook(self._on_ffn_router))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @staticmethod
    def _reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """All-reduce on the device the process group communicates on (NCCL: the GPU)."""
        t = t.to(get_device())
        dist.all_reduce(t, op=op)
        return t.cpu()

    def _all_reduce(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        # Ranks without a kind of expert contribute nothing; agree on the shape first.
        width = self._reduce(torch.tensor([0 if t is None else t.shape[1]], dtype=torch.int64), dist.ReduceOp.MAX)
        if width.item() == 0:
            return None
        if t is None:
            t = torch.zeros(self.num_layers, int(width.item()), dtype=torch.float64)
        return self._reduce(t.clone())

    def result(self) -> Dict[str, Optional[List[List[float]]]]:
        attn = self._all_reduce(self._attn_sum)
        count = self._reduce(self._attn_count.clone())
        ffn = self._all_reduce(self._ffn)
        out: Dict[str, Optional[List[List[float]]]] = {"attention": None, "ffn": None}
        if attn is not None:
            out["attention"] = (attn / count.clamp(min=1).unsqueeze(1)).tolist()
        if ffn is not None:
            out["ffn"] = (ffn / ffn.sum(dim=1, keepdim=True).clamp(min=1)).tolist()
        return out


def _expert_labels(count: int, names: Optional[List[str]]) -> List[str]:
    """``names`` when there is one per expert, else ``0..count-1``."""
    if names and len(names) == count:
        return [str(n) for n in names]
    return [str(i) for i in range(count)]


def _heatmap(ax, data: np.ndarray, labels: List[str], title: str, first: bool):
    """One layers × experts panel; the colour scale is centred on the uniform share 1/N."""
    from matplotlib.colors import TwoSlopeNorm

    uniform = 1.0 / data.shape[1]
    norm = TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=1.0)
    im = ax.imshow(data, norm=norm, cmap="RdBu_r", aspect="auto")
    ax.set_title(title)
    ax.set_xlabel("expert (source checkpoint)")
    if first:
        ax.set_ylabel("layer")
    long = max(map(len, labels)) > 3
    ax.set_xticks(range(data.shape[1]), labels=labels, rotation=30 if long else 0, ha="right" if long else "center")
    ax.set_yticks(range(data.shape[0]), labels=[str(i + 1) for i in range(data.shape[0])])
    for (i, j), v in np.ndenumerate(data):
        dark = abs(float(norm(v)) - 0.5) > 0.28
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
    return im, uniform


def write_routing_report(
    routing: Dict[str, dict], out_dir: str, model_name: str, expert_names: Optional[List[str]] = None
) -> List[str]:
    """Write ``<out_dir>/<model>_routing.csv`` and one heatmap PNG per router kind (a panel per
    domain, layers × experts). ``routing``: ``{domain: RoutingRecorder.result()}``;
    ``expert_names``: one name per expert (the checkpoint it was upcycled from), used for the
    axis and the CSV. The colour scale is labelled and centred on the uniform share 1/N
    (white), marked on the colour bar: red = more than an even share, blue = less. Returns the
    paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    csv_path = os.path.join(out_dir, f"{model_name}_routing.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "domain", "router", "layer", "expert", "value", "expert_name"])
        for domain, kinds in routing.items():
            for kind, table in kinds.items():
                for layer, row in enumerate(table or [], start=1):
                    labels = _expert_labels(len(row), expert_names)
                    for expert, value in enumerate(row):
                        w.writerow([model_name, domain, kind, layer, expert, f"{value:.6f}", labels[expert]])
    paths.append(csv_path)

    for kind, label in (("attention", "mean attention-router weight"), ("ffn", "FFN expert load (share of routed tokens)")):
        domains = [d for d in routing if routing[d].get(kind)]
        if not domains:
            continue
        fig, axes = plt.subplots(
            1, len(domains), figsize=(3.2 * len(domains) + 1.4, 3.8), squeeze=False, constrained_layout=True
        )
        for ax, domain in zip(axes[0], domains):
            data = np.array(routing[domain][kind], dtype=float)
            labels = _expert_labels(data.shape[1], expert_names)
            im, uniform = _heatmap(ax, data, labels, domain, ax is axes[0][0])
        fig.suptitle(f"{model_name}: {label} per layer, by evaluation domain")
        bar = fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
        bar.set_label(f"{label} (white = uniform 1/N)")
        ticks = sorted({0.0, uniform, 0.5, 1.0})
        bar.set_ticks(ticks, labels=[f"1/N = {t:.2f}" if t == uniform else f"{t:.1f}" for t in ticks])
        bar.ax.axhline(uniform, color="black", linewidth=1.2)
        path = os.path.join(out_dir, f"{model_name}_{kind}_routing.png")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths
