"""Blends, named validation sets, megatron-core GPT datasets, the sampler and the loaders."""

import json
import os

import pytest
import torch
from support.data import EOD, _domain_of

from bam_megatron.data.datasets import (  # noqa: E402
    DataConfigError,
    PretrainingSampler,
    build_data_iterator,
    build_data_loader,
    build_datasets,
    parse_data_path,
    parse_named_data_paths,
    train_valid_test_num_samples,
)

# --------------------------------------------------------------------------------------------


def test_parse_data_path(null_data):
    code, math = null_data[("code", "train")], null_data[("math", "train")]
    assert parse_data_path([code]) == ([code], None)
    assert parse_data_path([code, math]) == ([code, math], None)
    assert parse_data_path(["0.3", code, "0.7", math]) == ([code, math], [0.3, 0.7])
    assert parse_data_path(f"3 {code} 7 {math}") == ([code, math], [3.0, 7.0])
    with pytest.raises(DataConfigError, match=r"odd number of items \(3\)"):
        parse_data_path(["0.3", code, "0.7"])
    with pytest.raises(DataConfigError, match=r"expected a weight at position 3, got 'x'"):
        parse_data_path(["0.3", code, "x", math])
    with pytest.raises(DataConfigError, match=r"'0.5' at position 2 looks like a weight"):
        parse_data_path([code, "0.5"])
    with pytest.raises(DataConfigError, match=r"must be > 0"):
        parse_data_path(["0", code])
    with pytest.raises(DataConfigError, match=r"--data-path: .*nowhere_text_document\.bin not "
                                              r"found; make it with: python tools/preprocess"):
        parse_data_path(["/nowhere_text_document"])
    with pytest.raises(DataConfigError, match=r"without '\.bin'"):
        parse_data_path([code + ".bin"])
    os.rename(code + ".idx", code + ".idx.moved")
    try:
        with pytest.raises(DataConfigError, match=r"code_train_text_document\.idx not found"):
            parse_data_path([code])
    finally:
        os.rename(code + ".idx.moved", code + ".idx")


def test_parse_named_data_paths(null_data, tmp_path):
    code, math = null_data[("code", "valid")], null_data[("math", "valid")]
    named = parse_named_data_paths([f"code:{code}", math])
    assert list(named.items()) == [("code", code), ("math_valid_text_document", math)]
    with pytest.raises(DataConfigError, match=r"duplicate validation set name 'x'"):
        parse_named_data_paths([f"x:{code}", f"x:{math}"])
    with pytest.raises(DataConfigError, match=r"no weights"):
        parse_named_data_paths(["0.5", code])
    with pytest.raises(DataConfigError, match=r"--valid-sets: .*nope\.bin not found"):
        parse_named_data_paths([f"a:{tmp_path / 'nope'}"])


def test_num_samples_megatron_rule():
    assert train_valid_test_num_samples(global_batch_size=8, train_iters=100, eval_iters=5,
                                        eval_interval=20) == (800, (100 // 20 + 1) * 5 * 8, 40)
    assert train_valid_test_num_samples(global_batch_size=8, train_samples=1000, eval_iters=2,
                                        full_validation=True) == (1000, None, 16)
    with pytest.raises(DataConfigError, match="train_iters"):
        train_valid_test_num_samples(global_batch_size=8)


# --------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------

SEQ = 32


def test_blended_dataset_proportions_shapes_and_cache(null_data, null_tok, tmp_path):
    code, math = null_data[("code", "train")], null_data[("math", "train")]
    kwargs = dict(data_path=["0.3", code, "0.7", math], split="90,5,5", train_iters=50,
                  global_batch_size=8, eval_iters=2, eval_interval=25, seed=7,
                  data_cache_path=str(tmp_path / "cache"))
    ds = build_datasets(null_tok, SEQ, **kwargs)
    assert ds.num_samples == (400, 48, 16)
    assert len(ds.train) >= 400 and len(ds.valid) >= 48 and len(ds.test) >= 16
    counts = {"code": 0, "math": 0}
    for i in range(len(ds.train)):
        sample = ds.train[i]
        assert sample["tokens"].shape == (SEQ,) and sample["tokens"].dtype == torch.int64
        assert sample["labels"].shape == (SEQ,) and sample["loss_mask"].shape == (SEQ,)
        assert torch.equal(sample["position_ids"], torch.arange(SEQ))
        assert "attention_mask" not in sample  # not needed without reset_attention_mask
        assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])
        domain = _domain_of(sample["tokens"])
        assert domain == {["code", "math"][int(sample["dataset_id"])]}
        counts[domain.pop()] += 1
    share = counts["code"] / len(ds.train)
    assert 0.27 <= share <= 0.33 and counts["math"] > 0
    # the single-process cache (megatron-core's BlendedDataset needs a process group there)
    names = os.listdir(tmp_path / "cache")
    assert any(n.endswith("BlendedDataset-train-dataset_index.npy") for n in names)
    again = build_datasets(null_tok, SEQ, **kwargs)
    for i in (0, 17, len(ds.train) - 1):
        assert torch.equal(again.train[i]["tokens"], ds.train[i]["tokens"])


def test_named_validation_sets(null_data, null_tok):
    code_v, math_v = null_data[("code", "valid")], null_data[("math", "valid")]
    ds = build_datasets(
        null_tok, SEQ, data_path=[null_data[("code", "train")], null_data[("math", "train")]],
        split="100,0,0", train_iters=10, global_batch_size=4, eval_iters=3,
        valid_sets=[f"code:{code_v}", math_v],
    )
    assert ds.valid is None and ds.test is None  # split gives no valid/test part
    assert list(ds.valid_sets) == ["code", "math_valid_text_document"]
    for name, domain in (("code", "code"), ("math_valid_text_document", "math")):
        vset = ds.valid_sets[name]
        assert len(vset) >= 12
        for i in range(len(vset)):
            assert _domain_of(vset[i]["tokens"]) == {domain}
    # a single named set is still a dict of one dataset
    one = build_datasets(null_tok, SEQ, valid_sets=[f"m:{math_v}"], train_iters=1,
                         global_batch_size=2, eval_iters=1)
    assert one.train is None and list(one.valid_sets) == ["m"]
    assert _domain_of(one.valid_sets["m"][0]["tokens"]) == {"math"}


def test_per_split_paths_and_args_file(null_data, null_tok, tmp_path):
    code, math = null_data[("code", "train")], null_data[("math", "train")]
    ds = build_datasets(null_tok, SEQ, train_data_path=[code], valid_data_path=[math],
                        train_iters=5, global_batch_size=4, eval_iters=1)
    assert _domain_of(ds.train[0]["tokens"]) == {"code"}
    assert _domain_of(ds.valid[0]["tokens"]) == {"math"}
    assert ds.test is None
    # without data_cache_path megatron-core caches beside the data, in a folder named
    # after the prefix
    assert os.path.isdir(os.path.join(code, "cache", "GPTDataset_indices"))
    spec = tmp_path / "splits.json"
    spec.write_text(json.dumps({"train": f"1 {math} 1 {code}", "valid": [code], "test": []}))
    ds2 = build_datasets(null_tok, SEQ, per_split_data_args_path=str(spec), train_iters=5,
                         global_batch_size=4, eval_iters=1)
    assert _domain_of(ds2.valid[0]["tokens"]) == {"code"}
    domains = set()
    for i in range(len(ds2.train)):
        domains |= _domain_of(ds2.train[i]["tokens"])
    assert domains == {"code", "math"}


def test_mock_data(null_tok):
    ds = build_datasets(null_tok, SEQ, mock_data=True, train_iters=3, global_batch_size=2,
                        eval_iters=1)
    assert len(ds.train) >= 6
    batch = next(build_data_iterator(ds.train, micro_batch_size=2))
    assert batch["tokens"].shape == (2, SEQ) and batch["tokens"].max() < null_tok.vocab_size


def test_reset_position_ids_attention_mask_and_eod_loss_mask(null_data, null_tok):
    ds = build_datasets(null_tok, SEQ, data_path=[null_data[("code", "train")]], split="1,0,0",
                        train_iters=20, global_batch_size=4, reset_position_ids=True,
                        reset_attention_mask=True, eod_mask_loss=True)
    checked = 0
    for i in range(len(ds.train)):
        s = ds.train[i]
        eods = (s["tokens"] == EOD).nonzero().flatten().tolist()
        if not eods or eods[0] == SEQ - 1:
            continue
        e = eods[0]
        assert s["loss_mask"][e] == 0 and bool((s["loss_mask"][:e] == 1).all())
        assert s["position_ids"][e + 1] == 0 and s["position_ids"][e] == e
        mask = s["attention_mask"]
        assert mask.shape == (1, SEQ, SEQ) and mask.dtype == torch.bool
        assert bool(mask[0, e + 1, e]) and not bool(mask[0, e, e])  # True = masked
        checked += 1
    assert checked > 5


def test_build_datasets_errors(null_data, null_tok, tmp_path):
    code = null_data[("code", "train")]
    base = dict(train_iters=2, global_batch_size=2)
    with pytest.raises(DataConfigError, match="only one data source"):
        build_datasets(null_tok, SEQ, data_path=[code], train_data_path=[code], **base)
    with pytest.raises(DataConfigError, match=r"missing_text_document\.bin not found"):
        build_datasets(null_tok, SEQ, data_path=[str(tmp_path / "missing_text_document")],
                       **base)
    with pytest.raises(DataConfigError, match="--split must be"):
        build_datasets(null_tok, SEQ, data_path=[code], split="a,b", **base)
    with pytest.raises(DataConfigError, match="no data"):
        build_datasets(null_tok, SEQ, **base)
    # 200 documents: 969,30,1 leaves the test split empty; megatron-core would loop forever
    with pytest.raises(DataConfigError, match=r"the test split of .*code_train_text_document "
                                              r"gets 0 of its 200 documents and no tokens"):
        build_datasets(null_tok, SEQ, data_path=[code], split="969,30,1", eval_iters=1, **base)


# --------------------------------------------------------------------------------------------
# sampler / loader
# --------------------------------------------------------------------------------------------


def _batches(dataset, **kwargs):
    return [b["tokens"] for b in build_data_loader(dataset, **kwargs)]


def test_sampler_resume_and_data_parallel(null_data, null_tok):
    ds = build_datasets(null_tok, SEQ, data_path=[null_data[("math", "train")]], split="1,0,0",
                        train_iters=10, global_batch_size=4).train
    full = _batches(ds, micro_batch_size=2, data_parallel_rank=0, data_parallel_size=1)
    assert len(full) == len(ds) // 2 and full[0].shape == (2, SEQ)
    for consumed in (2, 6, 10):
        resumed = _batches(ds, micro_batch_size=2, consumed_samples=consumed,
                           data_parallel_rank=0, data_parallel_size=1)
        assert len(resumed) == len(full) - consumed // 2
        assert all(torch.equal(a, b) for a, b in zip(resumed, full[consumed // 2:]))
    # two data-parallel ranks split each global micro-step; together they see the dp=1 order
    ranks = [_batches(ds, micro_batch_size=2, data_parallel_rank=r, data_parallel_size=2)
             for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(ds) // 4
    for k in range(len(ranks[0])):
        assert torch.equal(torch.cat([ranks[0][k], ranks[1][k]]),
                           torch.cat([full[2 * k], full[2 * k + 1]]))
    resumed = _batches(ds, micro_batch_size=2, consumed_samples=8, data_parallel_rank=1,
                       data_parallel_size=2)
    assert all(torch.equal(a, b) for a, b in zip(resumed, ranks[1][2:]))
    # re-iterating a loader restarts at its consumed_samples (fixed validation batches)
    loader = build_data_loader(ds, micro_batch_size=2, consumed_samples=4,
                               data_parallel_rank=0, data_parallel_size=1)
    first, second = [b["tokens"] for b in loader], [b["tokens"] for b in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    with pytest.raises(DataConfigError, match="past the end of its data"):
        PretrainingSampler(len(ds), len(ds), 2, 0, 1)
    sampler = PretrainingSampler(10, 0, 3, 0, 1, drop_last=False)
    assert list(sampler) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]] and len(sampler) == 4


def test_cyclic_iterator_wraps_to_start(null_data, null_tok):
    ds = build_datasets(null_tok, SEQ, data_path=[null_data[("code", "valid")]], split="1,0,0",
                        train_iters=1, global_batch_size=2).train
    n = len(ds) // 2
    it = build_data_iterator(ds, micro_batch_size=2, consumed_samples=2, cyclic=True,
                             data_parallel_rank=0, data_parallel_size=1)
    seen = [next(it)["tokens"] for _ in range(n)]  # n - 1 batches, then the wrap
    assert torch.equal(seen[-1], _batches(ds, micro_batch_size=2, data_parallel_rank=0,
                                          data_parallel_size=1)[0])


# --------------------------------------------------------------------------------------------
# torch.distributed (gloo, 2 processes)
# --------------------------------------------------------------------------------------------
