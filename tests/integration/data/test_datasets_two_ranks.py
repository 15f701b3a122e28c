"""Datasets built by two gloo ranks in two processes: rank 0 builds (and caches) the indices, the
others read them; data-parallel ranks get different micro-batches."""

import json
import os
import subprocess
import sys
import textwrap

from support import REPO_ROOT as REPO

_DIST_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    code, math, cache = sys.argv[5], sys.argv[6], sys.argv[7]
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank,
                                         world_size=world)
    from bam_megatron.data.tokenizers import build_tokenizer
    from bam_megatron.data.datasets import build_datasets, build_data_iterator, DataConfigError
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    kw = dict(data_path=["0.4", code, "0.6", math], split="90,10,0", train_iters=6,
              global_batch_size=4, eval_iters=1, data_cache_path=cache,
              valid_sets=["c:" + code])
    ds = build_datasets(tok, 16, **kw)
    it = build_data_iterator(ds.train, micro_batch_size=2)
    batch = next(it)
    res = {"len": len(ds.train), "first": ds.train[0]["tokens"].tolist(),
           "valid_c": len(ds.valid_sets["c"]), "batch": batch["tokens"].tolist()}
    ds2 = build_datasets(tok, 16, is_built_on_rank=lambda: rank == 0, **kw)
    res["none_on_rank1"] = ds2.train is None and ds2.valid_sets["c"] is None
    try:
        build_datasets(tok, 16, is_built_on_rank=lambda: rank == 1, **kw)
        res["rank0_check"] = "no error"
    except DataConfigError as e:
        res["rank0_check"] = str(e)
    json.dump(res, open(out, "w"))
    torch.distributed.destroy_process_group()
    """
)


def test_distributed_build_gloo_two_ranks(null_data, tmp_path):
    script = tmp_path / "dist.py"
    script.write_text(_DIST_SCRIPT)
    init = f"file://{tmp_path / 'pg_init'}"
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), "2", init, str(tmp_path / f"r{r}.json"),
             null_data[("code", "train")], null_data[("math", "train")], str(cache)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(l[-3000:] for l in logs)
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2))
    assert r0["len"] == r1["len"] >= 24
    assert r0["first"] == r1["first"] and r0["valid_c"] == r1["valid_c"] > 0
    # data-parallel ranks (dp = world size here) get different micro-batches
    assert r0["batch"] != r1["batch"]
    assert r1["none_on_rank1"] is True
    for res in (r0, r1):
        assert "must be True on global rank 0" in res["rank0_check"]
    assert any(n.endswith("BlendedDataset-train-dataset_index.npy") for n in os.listdir(cache))

