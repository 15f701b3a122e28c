"""Dense checkpoints shared by the Nexus tool tests (domain embeddings, the Nexus mix, adding an
expert): five tiny models with grouped-query attention, each trained a few steps from its own
init, and a domain-embeddings file naming four of them."""

import pytest
import torch

DENSE = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--group-query-attention",
    "--num-query-groups", "2", "--seq-length", "32", "--swiglu", "--normalization", "RMSNorm",
    "--position-embedding-type", "rope", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
    "--hidden-dropout", "0", "--attention-dropout", "0", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
]
DOMAINS = ["b", "c", "d", "e"]


def train_dense(path, seed, iters=2, extra=()):
    from bam_megatron.training import pretrain

    pretrain(DENSE + list(extra) + [
        "--mock-data", "--seed", str(seed), "--train-iters", str(iters), "--micro-batch-size", "2", "--eval-iters", "1",
        "--eval-interval", "1000", "--log-interval", "100", "--lr", "1e-3", "--save", str(path),
    ])
    return str(path)


@pytest.fixture(scope="session")
def dense_models(tmp_path_factory):
    """``{"seed", "b", "c", "d", "e"}`` -> checkpoint roots."""
    root = tmp_path_factory.mktemp("dense")
    return {name: train_dense(root / name, seed) for name, seed in zip(["seed"] + DOMAINS, (11, 12, 13, 14, 15))}


@pytest.fixture(scope="session")
def domain_file(tmp_path_factory, dense_models):
    """Domain embeddings of b, c, d, e (random, D = 64), as tools/domain_embeddings.py writes them."""
    from bam_megatron.upcycle.nexus import DomainEmbeddings, save_domain_embeddings

    path = str(tmp_path_factory.mktemp("domains") / "domains.pt")
    emb = torch.randn(len(DOMAINS), 64, generator=torch.Generator().manual_seed(5))
    save_domain_embeddings(DomainEmbeddings(list(DOMAINS), emb, {"checkpoint": dense_models["seed"]}), path)
    return path
