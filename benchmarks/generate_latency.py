"""Greedy generation latency: base model vs a merged task vs the routed mixtures.

    python benchmarks/generate_latency.py            # random Llama, hidden 512, 8 layers
    python benchmarks/generate_latency.py --embedded # SmolLM2-135M if cached (modulora quickstart)
    python benchmarks/generate_latency.py --quick    # tiny, for a smoke run

Every configuration generates the same prompts (batch 1 and batch 8, 32 new tokens,
KV cache on, fp32 CPU) with randomised adapter weights (as if trained, so nothing is
skipped as zero). Runs are interleaved round robin and the median over rounds is
reported with its ratio to the base model measured in the same process:

* base: the Hugging Face model alone;
* merged: cgc-lora's task folded into the weights by ``model.merge(task=...)``;
* routed cgc-lora: the unmerged task-gated mixture (per-row gate, stacked experts);
* routed modula-res: universal + 4 domain experts, token router on every new token.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from train_step import build_base as random_llama  # benchmarks/ is on sys.path

import modulora
from modulora.generate import generate_batch

TASKS = ["t0", "t1", "t2", "t3"]


class _Tok:
    pad_token_id = 0
    eos_token_id = None  # never stop early: every run makes the same number of tokens


def build_base(args) -> torch.nn.Module:
    if args.embedded:
        from modulora.models import load_base

        model = load_base("smollm2-135m")[0]
    else:
        args.seq = args.prompt_len + args.new_tokens
        model = random_llama(args)  # the training benchmark's model
    model.generation_config.eos_token_id = None  # every run makes the same number of tokens
    return model.eval()


def _mixture(args, method: str, **kw) -> modulora.MixtureModel:
    model = modulora.attach(build_base(args), modulora.MixtureConfig(method=method, **kw))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.adapter_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.set_stage("inference")
    return model.eval()


def configurations(args) -> dict:
    """name -> (model, task or None)."""
    cgc = _mixture(args, "cgc-lora", tasks=TASKS, rank=8, num_experts=2)
    res = _mixture(args, "modula-res", tasks=TASKS, rank=8, universal_rank=16)
    return {
        "base": (build_base(args), None),
        "merged task (cgc-lora)": (cgc.merge(task="t1"), None),
        "routed cgc-lora (task gate)": (cgc, "t1"),
        "routed modula-res (token router)": (res, None),
    }


def time_generate(model, task, prompts, new_tokens: int) -> float:
    tasks = [task] * len(prompts) if task else None
    start = time.perf_counter()
    generate_batch(model, _Tok(), prompts, tasks, new_tokens)
    return time.perf_counter() - start


@torch.no_grad()
def measure(args, sizes=(1, 8)) -> list[tuple[str, int, float]]:
    """(configuration, batch, median latency s) over interleaved rounds, by batch size."""
    configs = configurations(args)
    vocab = configs["base"][0].config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = {
        b: [torch.randint(1, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(b)]
        for b in sizes
    }
    for model, task in configs.values():  # warm-up
        time_generate(model, task, prompts[1], 2)
    times = {(name, b): [] for b in sizes for name in configs}
    for _ in range(args.rounds):
        for b in sizes:
            for name, (model, task) in configs.items():
                times[(name, b)].append(time_generate(model, task, prompts[b], args.new_tokens))
    return [(name, b, statistics.median(t)) for (name, b), t in times.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--embedded", action="store_true", help="SmolLM2-135M instead of random")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.hidden, args.layers, args.vocab, args.rounds, args.new_tokens = 64, 2, 256, 2, 8
    torch.set_grad_enabled(False)
    timed = measure(args)
    model_name = "SmolLM2-135M" if args.embedded else f"random Llama h{args.hidden} x{args.layers}"
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; {model_name}, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, median of {args.rounds} interleaved rounds"
    )
    print("| configuration | batch | latency (s) | tokens/s | vs base |")
    print("|---|---:|---:|---:|---:|")
    base = {b: t for name, b, t in timed if name == "base"}
    for name, b, t in timed:
        print(f"| {name} | {b} | {t:.3f} | {b * args.new_tokens / t:.1f} | {t / base[b]:.3f}x |")


if __name__ == "__main__":
    main()
