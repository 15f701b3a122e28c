"""Generation with the KV cache at EP2, TP2 and PP2 (gloo workers): greedy ids equal argmax
decoding by full recomputation at that layout, and equal the one-process ids of the same weights;
multiple-choice scores (right-padded batches spread over data-parallel ranks) equal the
one-process ones.

The weights of every model kind are drawn once in one process and saved; each layout loads them.
At EP2 the two ranks are data-parallel replicas that serve different prompts while the Mixture
of Attention and the FFN experts exchange their tokens in every forward.
"""

import numpy as np
import pytest
from support.dist_harness import run_distributed

LAYOUTS = {"TP2": (2, 1, 1), "EP2": (1, 1, 2), "PP2": (1, 2, 1)}


def _task():
    """A few multiple-choice items of different lengths, tokenized one id per character."""
    from bam_megatron.evaluation.tasks import MCItem

    words = ["alpha", "beta", "gamma delta", "epsilon", "zeta eta theta", "iota"]
    return [MCItem(str(i), " ".join(words[: 1 + i % 5]) * (1 + i % 3), [" one", " two two", " three"], i % 3)
            for i in range(7)]


def _tokenize(text):
    return [ord(c) % 96 for c in text]


def generation_worker(rank, world, layout, root, save):
    """Per model kind: (cached greedy ids, recomputed ids, this rank's cache bytes per token,
    multiple-choice log-likelihoods)."""
    import torch
    from support.generation import CONTEXT, KINDS, MAX_NEW, build, greedy_by_recompute, prompts

    from bam_megatron.checkpoint.weights import load_model_weights, save_model_weights
    from bam_megatron.evaluation.multiple_choice import score_task
    from bam_megatron.inference.cache import cache_bytes_per_token, new_context
    from bam_megatron.inference.generate import generate
    from bam_megatron.inference.pipeline import forward_logits
    from bam_megatron.inference.sampling import SamplingParams
    from bam_megatron.parallel.distributed import destroy_distributed, init_distributed

    tp, pp, ep = layout
    init_distributed(tp, pp, ep, seed=11)
    out = {}
    try:
        for kind in KINDS:
            if kind == "dense" and ep > 1:
                continue  # nothing to spread over an expert-parallel group
            model = build(kind, tp, pp, ep)
            path = f"{root}/{kind.replace(' ', '_')}"
            if save:
                save_model_weights(model, path)
            else:
                load_model_weights(model, path)
            prompt_list = prompts()
            results = generate(model, prompt_list, max_new_tokens=MAX_NEW, sampling=SamplingParams(greedy=True),
                               max_sequence_length=CONTEXT, batch_size=3)
            reference = greedy_by_recompute(model, prompt_list, MAX_NEW, CONTEXT)
            context = new_context(1, CONTEXT)
            with torch.no_grad():
                forward_logits(model, torch.zeros(1, 2, dtype=torch.long), torch.arange(2).unsqueeze(0), context)
            scores = score_task(model, _task(), _tokenize, 0, max_length=CONTEXT, batch_size=2)
            out[kind] = ([r.generated_ids for r in results], reference, cache_bytes_per_token(context),
                         scores["loglikelihoods"])
    finally:
        destroy_distributed()
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("generation_weights"))
    (result,) = run_distributed(generation_worker, 1, (1, 1, 1), root, True, timeout_s=300)
    return root, result


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_cached_generation_at_layout(one_process, layout):
    root, single = one_process
    tp, pp, ep = LAYOUTS[layout]
    ranks = run_distributed(generation_worker, tp * pp * ep, LAYOUTS[layout], root, False, timeout_s=300)
    for kind, (ids, reference, _, _) in single.items():
        assert ids == reference, f"one process, {kind}"
    for rank, result in enumerate(ranks):
        for kind, (ids, reference, per_token, lls) in result.items():
            assert ids == reference, f"{layout} rank {rank}, {kind}: cache vs recomputation"
            assert ids == single[kind][0], f"{layout} rank {rank}, {kind}: layout vs one process"
            np.testing.assert_allclose(np.array(lls), np.array(single[kind][3]), atol=1e-4, err_msg=f"{layout} {kind}")
            one = single[kind][2]
            if tp > 1:  # heads (and their K, V) are split over the tensor-parallel ranks
                assert per_token == one / tp
            elif pp > 1:  # each stage caches its own layer
                assert per_token == one / pp
            elif kind == "BAM KV experts":  # each rank: its N/EP experts for the group's EP·b sequences
                assert per_token == one
            elif kind == "BAM shared KV":  # the shared K, V of the group's EP·b sequences
                assert per_token == one * ep
            else:  # BTX: dense attention on this rank's own sequences
                assert per_token == one
