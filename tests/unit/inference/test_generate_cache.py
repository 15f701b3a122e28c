"""Generation with the KV cache equals greedy decoding by full recomputation, for dense, BTX,
BAM KV experts and BAM shared KV (one process); the caches have the sizes the method promises."""

import pytest
import torch
from support.generation import CONTEXT, KINDS, MAX_NEW, N_EXPERTS, build, greedy_by_recompute, kind_configs, prompts

from bam_megatron.errors import InferenceError
from bam_megatron.inference.cache import cache_bytes_per_token, expected_bytes_per_token, new_context
from bam_megatron.inference.generate import GenerationStats, check_prompts, generate
from bam_megatron.inference.sampling import SamplingParams, sample


@pytest.fixture(scope="module")
def one_process():
    from support.cpu_runtime import cpu_runtime_scope

    from bam_megatron.parallel.distributed import destroy_distributed, init_distributed

    with cpu_runtime_scope():
        init_distributed(seed=1234)
        yield
        destroy_distributed()


@pytest.mark.parametrize("kind", KINDS)
def test_cached_greedy_equals_recompute(one_process, kind):
    model = build(kind)
    prompt_list = prompts()
    stats = GenerationStats()
    results = generate(model, prompt_list, max_new_tokens=MAX_NEW, sampling=SamplingParams(greedy=True),
                       max_sequence_length=CONTEXT, batch_size=3, stats=stats)
    reference = greedy_by_recompute(model, prompt_list, MAX_NEW, CONTEXT)
    assert [r.generated_ids for r in results] == reference
    assert [r.prompt_ids for r in results] == prompt_list
    # The prompt of 20 tokens stops at the context of 24; the others get MAX_NEW new tokens.
    assert [len(r.generated_ids) for r in results] == [min(MAX_NEW, CONTEXT - len(p)) for p in prompt_list]
    for r in results:  # greedy: each token is the most likely one; its log-probability is its own
        assert all(lp <= 0 for lp in r.logprobs) and len(r.logprobs) == len(r.generated_ids)
    assert stats.prefill_tokens > 0 and stats.decode_steps > 0


def test_logprobs_are_the_models(one_process):
    model = build("BAM shared KV")
    prompt = prompts()[1]
    (res,) = generate(model, [prompt], max_new_tokens=3, sampling=SamplingParams(greedy=True), max_sequence_length=CONTEXT)
    seq = prompt + res.generated_ids
    with torch.no_grad():
        logits = model(torch.tensor([seq]), torch.arange(len(seq)).unsqueeze(0), None)
    ref = torch.log_softmax(logits[0].float(), -1)
    expected = [ref[len(prompt) - 1 + i, t].item() for i, t in enumerate(res.generated_ids)]
    assert res.logprobs == pytest.approx(expected, abs=1e-4)


def _cache_per_token(kind):
    model = build(kind)
    context = new_context(2, CONTEXT)
    tokens = torch.randint(0, 96, (2, 5))
    with torch.no_grad():
        model(tokens, torch.arange(5).unsqueeze(0).expand(2, -1), None, inference_context=context, runtime_gather_output=True)
    return cache_bytes_per_token(context)


@pytest.mark.parametrize("kind", KINDS)
def test_cache_size_is_exact(one_process, kind):
    cfg, bam = kind_configs(kind)
    assert _cache_per_token(kind) == expected_bytes_per_token(cfg, bam, dtype_bytes=4, layers=2)


def test_shared_kv_cache_is_the_dense_models(one_process):
    dense = _cache_per_token("dense")
    assert dense == 2 * 2 * 2 * 16 * 4  # layers x (K, V) x query groups x head dim x fp32
    assert _cache_per_token("BTX") == dense
    assert _cache_per_token("BAM shared KV") == dense  # one K, V for all attention experts
    assert _cache_per_token("BAM KV experts") == N_EXPERTS * dense


def test_prompt_checks():
    with pytest.raises(InferenceError, match="prompt 1 has 24 tokens but the model's context is 24"):
        check_prompts([[1], [2] * 24], 24)
    with pytest.raises(InferenceError, match="prompt 0 is empty"):
        check_prompts([[]], 24)
    with pytest.raises(InferenceError, match="outside the vocabulary"):
        check_prompts([[1, 99]], 24, vocab_size=96)


def test_sampling_filters_and_settings():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # top-k 2: only the two most likely tokens
        ids, _ = sample(logits, SamplingParams(top_k=2), g)
        assert ids.item() in (0, 1)
    # top-p 0.5: the most likely token alone already holds 63% of the mass
    ids, lp = sample(logits, SamplingParams(top_p=0.5), g)
    assert ids.item() == 0
    assert lp.item() == pytest.approx(torch.log_softmax(logits, -1)[0, 0].item())
    # padded vocabulary entries beyond the tokenizer's are never chosen
    padded = torch.tensor([[0.0, 0.0, 50.0]])
    assert sample(padded, SamplingParams(greedy=True), vocab_size=2)[0].item() in (0, 1)
    with pytest.raises(InferenceError, match="--temperature"):
        SamplingParams(temperature=0)
    with pytest.raises(InferenceError, match="--top-p"):
        SamplingParams(top_p=1.5)
