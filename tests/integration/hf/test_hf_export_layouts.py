"""tools/hf_export.py on checkpoints saved by a 4-process gloo run: MoE models at TP2×EP2, dense
models at TP2 (×DP2; expert parallelism needs experts), and BAM shared KV at PP2×EP2.

Each model is saved at one process, loaded by the 4 workers at the layout, evaluated there and
saved again from there; the export of that checkpoint must give the 4-process logits (the
one-process logits for the pipeline, whose stages hold no full model).
"""

from support.checkpoints import index_of
from support.dist_harness import run_distributed
from support.hf import hf_logits, our_logits, tokens
from support.hf_cases import EXPORT_CASES, build_and_save, load_export

from bam_megatron.hf.exporter import ExportOptions, hf_export

TOL = 1e-4
DENSE = ["dense-sequential", "dense-parallel"]
MOE = ["btx-sequential", "bam-kv-experts", "bam-shared-kv"]
PROJ = "decoder.layers.self_attention.linear_proj.weight"


def layout_worker(rank, world, runs):
    """For each ``((tp, pp, ep), [(case, src, dst), ...])``: load ``src`` at that layout, save it
    to ``dst`` and return the logits (rank 0; without pipeline parallelism)."""
    import torch.distributed as dist
    from support.hf import save_ours
    from support.hf_cases import build

    from bam_megatron.checkpoint.weights import load_model_weights
    from bam_megatron.parallel.distributed import destroy_distributed, init_distributed

    dist.init_process_group("gloo")  # kept across the layouts below
    logits = {}
    for (tp, pp, ep), cases in runs:
        init_distributed(tp, pp, ep, seed=7)
        try:
            for case, src, dst in cases:
                model, args = build(case, tp, ep, pp)
                load_model_weights(model, src + "/iter_0000000")
                model.eval()
                save_ours(model, dst, args)
                if pp == 1:
                    logits[case] = our_logits(model, tokens(seq=16))
        finally:
            destroy_distributed()
    return logits if rank == 0 else None


def test_export_of_checkpoints_saved_at_tp2_ep2_and_pp2(single_process, tmp_path):
    one_process = {}
    for case in DENSE + MOE:
        one_process[case] = our_logits(build_and_save(case, str(tmp_path / f"{case}-1")), tokens(seq=16))
    runs = [((2, 1, 1), [(c, str(tmp_path / f"{c}-1"), str(tmp_path / f"{c}-4")) for c in DENSE]),
            ((2, 1, 2), [(c, str(tmp_path / f"{c}-1"), str(tmp_path / f"{c}-4")) for c in MOE]),
            ((1, 2, 2), [("bam-shared-kv", str(tmp_path / "bam-shared-kv-1"), str(tmp_path / "pp2"))])]
    four = run_distributed(layout_worker, 4, runs, timeout_s=600)[0]
    hf_export(str(tmp_path / "pp2"), str(tmp_path / "pp2-hf"), ExportOptions())
    got = hf_logits(load_export(str(tmp_path / "pp2-hf")), tokens(seq=16))
    assert (got - one_process["bam-shared-kv"]).abs().max().item() <= TOL
    for case in DENSE + MOE:
        assert (four[case] - one_process[case]).abs().max().item() <= TOL, case
        chunks = index_of(str(tmp_path / f"{case}-4" / "iter_0000000")).state_dict_metadata[PROJ].chunks
        assert len(chunks) >= 2 * 2, case  # 2 layers, each split over TP (and EP) by the 4-process save
        result = hf_export(str(tmp_path / f"{case}-4"), str(tmp_path / f"{case}-hf"), ExportOptions())
        assert result.architecture == EXPORT_CASES[case][3]
        got = hf_logits(load_export(str(tmp_path / f"{case}-hf")), tokens(seq=16))
        assert (got - four[case]).abs().max().item() <= TOL, case
