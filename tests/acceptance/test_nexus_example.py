"""A reduced run of examples/nexus.sh end to end: mix three domains with the Nexus and the linear
router, add the fourth domain's expert, fine-tune with and without it, print the table."""

import os
import re
import subprocess
import sys

import pytest
from support import REPO_ROOT as ROOT  # noqa: E402
from support.checkpoints import common_state

from bam_megatron.checkpoint.opener import resolve_checkpoint_dir

STAGES = ["mixed and trained (before adding)", "+ math expert (after adding)", "+ math expert, fine-tuned",
          "fine-tuned without the new expert"]
ROWS = ["seed", "math expert"] + [f"{r}: {s}" for r in ("linear", "nexus") for s in STAGES]
# Validation perplexity (code, legal, english, old avg, math) of this reduced run: deterministic on
# CPU (two runs gave identical tables); RTOL lets another CPU or torch build round differently
# while a change that makes the models learn worse, or evaluate differently, fails.
GOLDEN_PPL = {
    "seed":                                      (2590.50, 2027.01, 1567.82, 2061.78, 1256.27),
    "math expert":                               (2440.91, 1751.78, 1352.56, 1848.42, 718.56),
    "linear: mixed and trained (before adding)": (2208.34, 1498.14, 1122.06, 1609.52, 857.89),
    "linear: + math expert (after adding)":      (2232.69, 1530.10, 1152.39, 1638.39, 820.73),
    "linear: + math expert, fine-tuned":         (2095.86, 1388.37, 1065.33, 1516.52, 588.75),
    "linear: fine-tuned without the new expert": (2068.75, 1349.78, 1034.44, 1484.32, 615.92),
    "nexus: mixed and trained (before adding)":  (2209.39, 1498.17, 1123.10, 1610.22, 857.65),
    "nexus: + math expert (after adding)":       (2232.14, 1529.86, 1152.79, 1638.26, 820.20),
    "nexus: + math expert, fine-tuned":          (2095.03, 1387.04, 1065.27, 1515.78, 588.92),
    "nexus: fine-tuned without the new expert":  (2070.43, 1349.52, 1034.36, 1484.77, 616.16),
}
RTOL = 0.02


def test_nexus_example_runs_and_prints_its_table(tmp_path):
    out = tmp_path / "nexus"
    env = dict(
        os.environ, BAM_PYTHON=sys.executable, OUT=str(out), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
        WANDB_MODE="disabled", LAYERS="1", HIDDEN="64", HEADS="4", SEQ="64", MBS="8", GBS="8",
        SEED_ITERS="12", BRANCH_ITERS="6", MOE_ITERS="6", FT_ITERS="4", EVAL_ITERS="1", EMBED_TOKENS="2048",
    )
    run = subprocess.run(["bash", "examples/nexus.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    def args(name):
        return common_state(resolve_checkpoint_dir(str(out / name)))["args"]

    # The mixes differ only in the FFN router; adding the math expert grows both kinds of experts.
    for router in ("nexus", "linear"):
        mixed, added = args(f"mix_{router}"), args(f"moe_{router}_plus_math")
        assert mixed["moe_router_type"] == router and mixed["moe_shared_expert_intermediate_size"] == mixed["ffn_hidden_size"]
        assert (mixed["num_experts"], mixed["bam_attn_experts"]) == (3, 4)
        assert (added["num_experts"], added["bam_attn_experts"]) == (4, 5)
        for name, iters in ((f"moe_{router}", 6), (f"ft_{router}_plus_math", 4), (f"ft_{router}", 4)):
            assert common_state(resolve_checkpoint_dir(str(out / name)))["iteration"] == iters, name
    assert (out / "domain_embeddings.pt").is_file()

    # The table: every row, finite perplexities, and the comparisons.
    table = (out / "results" / "nexus.md").read_text()
    assert "| nexus: + math expert, fine-tuned |" in run.stdout  # printed at the end of the run
    for row in ROWS:
        match = re.search(rf"^\| {re.escape(row)} \| (.+) \|$", table, re.M)
        assert match, row
        values = tuple(float(v) for v in match.group(1).split(" | "))
        assert values == pytest.approx(GOLDEN_PPL[row], rel=RTOL), (row, values)
    assert "initial mix, old domains (avg ppl): Nexus" in table and "paper: up to +2.1%" in table
    assert "for the same fine-tune without the new expert" in table and "+18.8%" in table
