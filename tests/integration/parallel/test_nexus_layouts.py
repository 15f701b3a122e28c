"""The Nexus MoE (Nexus FFN router, shared FFN expert, z-loss) trains at TP2,
EP2 and PP2 with the loss and the full gradients of one process; its checkpoint keys do not
depend on the layout: each layout loads what the previous one saved (1 → TP2 → EP2 → PP2).

The training step is the layout tests' (``test_parallel_layouts.train_step_worker``): a real
megatron-core step with DDP, the pipeline schedule and ``finalize_model_grads``.
"""

import pytest
import torch
from support.dist_harness import run_distributed
from test_parallel_layouts import _loss, train_step_worker

from bam_megatron.checkpoint.weights import read_global_tensors

LP = "decoder.layers.mlp."


def test_nexus_moe_matches_one_process_at_tp2_ep2_pp2(tmp_path):
    weights, grads = str(tmp_path / "w1"), str(tmp_path / "g1")
    ref_loss = _loss(run_distributed(train_step_worker, 1, (1, 1, 1), None, grads, save_dir=weights, nexus=True))
    ref_weights, ref_grads = read_global_tensors(weights), read_global_tensors(grads)
    assert ref_weights[LP + "router.domain_embeddings"].shape == (2, 4, 32)
    assert LP + "router.weight" not in ref_weights
    for key in ("router.projection_fc1.weight", "router.projection_fc2.weight", "shared_experts.linear_fc1.weight"):
        assert ref_grads[LP + key].abs().sum() > 0, key

    load = weights
    for name, layout in (("tp2", (2, 1, 1)), ("ep2", (1, 1, 2)), ("pp2", (1, 2, 1))):
        tp, pp, ep = layout
        saved, got = str(tmp_path / f"w_{name}"), str(tmp_path / f"g_{name}")
        loss = _loss(run_distributed(train_step_worker, tp * pp * ep, layout, load, got, save_dir=saved, nexus=True))
        assert loss == pytest.approx(ref_loss, abs=1e-5), name
        got_grads = read_global_tensors(got)
        assert set(got_grads) == set(ref_grads)
        for key in ref_grads:
            torch.testing.assert_close(got_grads[key], ref_grads[key], atol=2e-6, rtol=1e-4, msg=f"{name}: {key}")
        # What this layout saved is the reference model, key for key and bit for bit.
        resaved = read_global_tensors(saved)
        assert set(resaved) == set(ref_weights)
        for key, value in ref_weights.items():
            assert torch.equal(resaved[key], value), f"{name}: {key}"
        load = saved
