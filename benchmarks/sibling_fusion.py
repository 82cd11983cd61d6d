"""Would fusing sibling projections pay? One A matmul for q/k/v instead of three.

    python benchmarks/sibling_fusion.py

q, k and v read the same input, so their LoRA ``A`` products could be one matmul of
the stacked ``A`` rows. This times both, forward + backward, for 1024 tokens, d 512,
against the training step they sit in (random Llama hidden 512, 8 layers: about
0.7 s on 2 cores). Measured here: fusing saves 0.3-0.7 ms per attention block at r8
and ~1 ms at 8 x r8, about 1% of a step, so modulora keeps one matmul per projection.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def separate(x, As):
    return sum(F.linear(x, A).sum() for A in As)


def fused(x, As):
    u = F.linear(x, torch.cat(As))  # (T, 3R)
    return sum(part.sum() for part in u.split(As[0].shape[0], dim=-1))


def main() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 512, generator=g, requires_grad=True)
    print(f"# {torch.get_num_threads()} threads, torch {torch.__version__}; 1024 x 512")
    print("| total rank per projection | 3 matmuls (ms) | 1 fused (ms) | saved per block (ms) |")
    print("|---:|---:|---:|---:|")
    for rank in (8, 64):
        As = [torch.randn(rank, 512, generator=g, requires_grad=True) for _ in range(3)]
        times = {separate: [], fused: []}
        for _ in range(5):
            for fn, ts in times.items():
                start = time.perf_counter()
                for _ in range(20):
                    fn(x, As).backward()
                ts.append((time.perf_counter() - start) / 20 * 1e3)
        s, f = statistics.median(times[separate]), statistics.median(times[fused])
        print(f"| {rank} | {s:.2f} | {f:.2f} | {s - f:.2f} |")


if __name__ == "__main__":
    main()
