"""Training-step speed and memory: PEFT LoRA vs modulora's lora, molora and modula-res.

    python benchmarks/train_step.py            # full size (about 3 minutes on 2 cores)
    python benchmarks/train_step.py --quick    # tiny, for a smoke run

Same random Llama for every run (hidden 512, 8 layers, all projections adapted),
batch 8 x 128, fp32 on CPU, AdamW. Runs are interleaved (round robin) so a noisy
machine slows every configuration alike; the figure reported is the median over
rounds, with its ratio to PEFT LoRA r8 measured in the same process.

Memory is shown two ways: "peak RSS", the measured peak resident memory of a
fresh process that builds the model and runs two training steps (one process
per configuration, so peaks do not mix), and "training bytes", counted exactly:
parameters + gradients + AdamW state + the tensors autograd saves for backward.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import modulora


def build_base(args) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=max(256, args.seq),
    )
    return LlamaForCausalLM(cfg).float()


def configurations(args):
    """name -> (model factory, forward kwargs)."""

    def peft_lora():
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
        return get_peft_model(build_base(args), cfg), {}

    def ours(method, stage=None, **kw):
        def make():
            model = modulora.attach(build_base(args), modulora.MixtureConfig(method=method, **kw))
            if stage:
                model.set_stage(stage)
            return model, {}

        return make

    tasks = ["t0", "t1", "t2", "t3"]
    return {
        "PEFT LoRA r8": peft_lora,
        "modulora lora r8": ours("lora", rank=8),
        "modulora molora 8 x r8": ours("molora", rank=8, num_experts=8),
        "modulora modula-res u16+4x r8 (router)": ours(
            "modula-res", "router", tasks=tasks, rank=8, universal_rank=16
        ),
    }


def memory_bytes(model, batch) -> int:
    """Params + grads + AdamW state of trainable params + tensors saved for backward.

    A saved tensor counts once per storage (the same input saved by two matmuls is
    one buffer), and not at all when it is a parameter (counted already).
    """
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = 0

    def pack(t):
        nonlocal saved
        ptr = t.untyped_storage().data_ptr()
        if ptr not in storages:
            storages.add(ptr)
            saved += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return params + 3 * trainable + saved  # grad + two Adam moments per trainable value


def step_time(model, opt, batch, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def peak_rss_mib(script: str, argv: list[str], name: str) -> float:
    """Peak RSS of a fresh process running ``script --child name`` (see ``child``)."""
    cmd = [sys.executable, script, *argv, "--child", name]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def child(factory, batch) -> None:
    """Build one configuration, train two steps, print this process's peak RSS (MiB)."""
    model, extra = factory()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    step_time(model, opt, {**batch, **extra}, 2)
    print(peak_rss_of_this_process())


def measure(configs: dict, batch: dict, rounds: int, steps: int = 1, rss=None) -> dict:
    """Interleaved medians: name -> {tokens_s, train_mib, rss_mib}.

    ``configs`` maps names to factories returning (model, extra forward kwargs); each
    round times every configuration once, so a noisy machine slows all alike.
    ``rss(name)`` gives a configuration's peak RSS (None: not measured).
    """
    runs = {}
    for name, factory in configs.items():
        model, extra = factory()
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        step = {**batch, **extra}
        runs[name] = {
            "model": model,
            "opt": opt,
            "batch": step,
            "train_mib": memory_bytes(model, step) / 2**20,
            "rss_mib": rss(name) if rss else None,
            "times": [],
        }
        step_time(model, opt, step, 1)  # warm-up
    for _ in range(rounds):
        for run in runs.values():
            run["times"].append(step_time(run["model"], run["opt"], run["batch"], steps))
    tokens = batch["input_ids"].numel()
    return {
        name: {
            "tokens_s": tokens / statistics.median(run["times"]),
            "train_mib": run["train_mib"],
            "rss_mib": run["rss_mib"],
        }
        for name, run in runs.items()
    }


def peak_rss_of_this_process() -> float:
    """VmHWM (MiB): this process's own peak. Not ru_maxrss, which a child started by
    fork + exec inherits from its parent's peak (Linux keeps it across exec)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    argv = list(sys.argv[1:])
    if args.quick:
        args.hidden, args.layers, args.vocab, args.batch, args.seq = 64, 2, 256, 2, 16
        args.rounds, args.steps = 2, 1

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    if args.child:
        return child(configurations(args)[args.child], batch)
    runs = measure(
        configurations(args),
        batch,
        args.rounds,
        args.steps,
        lambda n: peak_rss_mib(__file__, argv, n),
    )

    print(
        f"# train step: Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
        f"batch {args.batch} x {args.seq}, fp32"
    )
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps, medians\n"
    )
    base = runs["PEFT LoRA r8"]
    print(
        f"| {'configuration':<40} | tokens/s | vs PEFT | peak RSS MiB | vs PEFT "
        "| training MiB | vs PEFT |"
    )
    print(f"|{'-' * 42}|---------:|--------:|-------------:|--------:|-------------:|--------:|")
    for name, run in runs.items():
        print(
            f"| {name:<40} | {run['tokens_s']:8.1f} | {run['tokens_s'] / base['tokens_s']:6.2f}x "
            f"| {run['rss_mib']:12.1f} | {run['rss_mib'] / base['rss_mib']:6.2f}x "
            f"| {run['train_mib']:12.1f} | {run['train_mib'] / base['train_mib']:6.2f}x |"
        )


if __name__ == "__main__":
    main()
