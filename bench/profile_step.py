"""Profile one forward+backward step of a benchmark variant and print the top operators.

    python bench/profile_step.py --variant btx [bench_model.py shape flags]
"""

from __future__ import annotations

import sys

import bench_model  # noqa: E402
import torch  # noqa: E402


def main():
    argv = sys.argv[1:]
    variant = "btx"
    if "--variant" in argv:
        i = argv.index("--variant")
        variant = argv[i + 1]
        del argv[i : i + 2]
    args = bench_model.parse_args(argv)
    from bam_megatron.parallel.distributed import destroy_distributed, init_distributed

    info = init_distributed(seed=1)
    device = info.device
    model, cfg, bam = bench_model.build(variant, args, device.type == "cuda")
    model.to(device)
    b, s = args.micro_batch_size, args.seq_length
    tokens = torch.randint(0, args.vocab_size, (b, s), device=device)
    pos = torch.arange(s, device=device).unsqueeze(0).expand(b, s)

    def step():
        model(tokens, pos, None, labels=tokens).float().mean().backward()

    for _ in range(3):
        step()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=acts) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60))
    destroy_distributed()


if __name__ == "__main__":
    main()
