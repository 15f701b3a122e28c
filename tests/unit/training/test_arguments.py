"""Argument checks that answer before any heavy import or process start-up: the model and the
parallel layout against each other and the launched world (the MoE + TP rule among them), the
global batch over the data-parallel ranks, Megatron-LM's weight-decay schedule flags; one line
per job (once per node); and perplexity of a NaN loss."""

import math

import pytest

from bam_megatron.errors import BAMConfigError, LayoutError
from bam_megatron.training import arguments
from bam_megatron.training.metrics import perplexity, validation_line

MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
         "--vocab-size", "128", "--mock-data", "--train-iters", "4", "--disable-bias-linear"]
MOE = ["--num-experts", "2", "--moe-router-topk", "1", "--moe-router-pre-softmax"]


def _finalize(argv):
    parser = arguments.build_parser()
    return arguments.finalize_args(parser.parse_args(argv), parser)


def test_ffn_experts_with_tp_need_sequence_parallel_at_argument_time(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(BAMConfigError, match="need --sequence-parallel"):
        _finalize(MODEL + MOE + ["--tensor-model-parallel-size", "2"])
    args = _finalize(MODEL + MOE + ["--tensor-model-parallel-size", "2", "--sequence-parallel"])
    assert args.sequence_parallel


@pytest.mark.parametrize("world,argv,error,words", [
    ("1", ["--tensor-model-parallel-size", "2"], LayoutError, "world size 1 is not divisible"),
    ("4", MOE + ["--expert-model-parallel-size", "4"], BAMConfigError, "--num-experts 2 is not divisible"),
    ("2", ["--pipeline-model-parallel-size", "2", "--num-layers", "3"], BAMConfigError, "--num-layers 3"),
    ("2", ["--micro-batch-size", "2", "--global-batch-size", "6"], LayoutError, "pick a multiple of 4"),
    ("1", ["--bam-attn-experts", "3", "--expert-model-parallel-size", "1", "--bam-kv-sharing",
           "--num-query-groups", "3", "--group-query-attention"], BAMConfigError, "--num-attention-heads 4"),
])
def test_layout_errors_at_argument_time(world, argv, error, words, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(error, match=words):
        _finalize(MODEL + argv)


@pytest.mark.parametrize("local_rank,printed", [("0", True), ("1", False)])
def test_a_command_line_error_is_printed_once_per_node(local_rank, printed, monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    with pytest.raises(SystemExit) as exit_:
        _finalize(MODEL + ["--min-lr", "1", "--lr", "0.1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert ("--min-lr 1.0 is larger than --lr 0.1" in err) == printed, err


def test_weight_decay_schedule_flags():
    args = _finalize(MODEL + ["--weight-decay", "0.05"])
    assert (args.start_weight_decay, args.end_weight_decay, args.weight_decay_incr_style) == (0.05, 0.05, "constant")
    args = _finalize(MODEL + ["--weight-decay-incr-style", "cosine", "--start-weight-decay", "0",
                              "--end-weight-decay", "0.1"])
    assert (args.start_weight_decay, args.end_weight_decay) == (0.0, 0.1)
    for bad in (["--start-weight-decay", "0.1"], ["--weight-decay-incr-style", "linear", "--end-weight-decay", "0.1"],
                ["--weight-decay-incr-style", "linear", "--start-weight-decay", "0.2", "--end-weight-decay", "0.1"]):
        with pytest.raises(SystemExit):
            _finalize(MODEL + bad)


def test_perplexity_of_a_nan_loss_is_nan():
    assert math.isnan(perplexity(float("nan")))
    assert perplexity(float("inf")) == float("inf")
    assert perplexity(2.0) == pytest.approx(math.exp(2.0))
    assert perplexity(30.0) == pytest.approx(math.exp(20.0))  # Megatron-LM's cap
    line = validation_line(8, float("nan"))
    assert "lm loss value: NAN | lm loss PPL: NAN |" in line, line
