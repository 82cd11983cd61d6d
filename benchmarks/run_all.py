"""Every speed and memory figure in one command: writes benchmarks/RESULTS.md and results.png.

    python benchmarks/run_all.py            # about 10 minutes on 2 cores
    python benchmarks/run_all.py --quick    # tiny sizes, a smoke run (writes to --out)

Training (random Llama hidden 512, 8 layers, all projections, batch 8 x 128, fp32,
AdamW): tokens/s and memory of PEFT LoRA r8 / r16 / r64, a naive per-expert-loop
mixture (the reference implementation from the tests), and modulora's lora, molora
8 x r8, modula-res (u16 + 4 x r8, router stage) and cgc-lora; the same on the embedded
SmolLM2-135M when it is cached (smaller batch); greedy generation latency of the base
model, a merged task and the routed mixtures; tokens/s of molora r8 with 1 to 16
experts. Every figure is a median over interleaved rounds (each round runs every
configuration once, so a noisy machine slows all alike), with its ratio to PEFT LoRA
measured in the same process. Memory: "training MiB" counts parameters, gradients,
AdamW state and the tensors autograd saves, exactly; "peak RSS" is measured in a fresh
child process per configuration.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the naive reference implementation

import generate_latency  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
import train_step  # noqa: E402
from reference import use_reference  # noqa: E402

import modulora  # noqa: E402

TASKS = ["t0", "t1", "t2", "t3"]
SCALING = (1, 2, 4, 8, 16)


def _base(args) -> torch.nn.Module:
    if args.embedded:
        from modulora.models import load_base

        return load_base("smollm2-135m")[0]
    return train_step.build_base(args)


def _peft(args, r: int):
    def make():
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0)
        return get_peft_model(_base(args), cfg), {}

    return make


def _ours(args, method: str, stage: str | None = None, naive: bool = False, **kw):
    def make():
        cfg = modulora.MixtureConfig(method=method, **kw)
        model = modulora.attach(_base(args), cfg)
        if stage:
            model.set_stage(stage)
        if naive:
            use_reference(model)
        task = {"task": [TASKS[i % len(TASKS)] for i in range(args.batch)]}
        return model, task if model.method.task_gated else {}

    return make


def training_configs(args) -> dict:
    """name -> factory returning (model, extra forward kwargs)."""
    configs = {
        "PEFT LoRA r8": _peft(args, 8),
        "PEFT LoRA r16": _peft(args, 16),
        "PEFT LoRA r64": _peft(args, 64),
        "naive loop molora 8 x r8": _ours(args, "molora", naive=True, rank=8, num_experts=8),
        "modulora lora r8": _ours(args, "lora", rank=8),
        "modulora molora 8 x r8": _ours(args, "molora", rank=8, num_experts=8),
        "modulora modula-res u16+4 x r8 (router)": _ours(
            args, "modula-res", "router", tasks=TASKS, rank=8, universal_rank=16
        ),
        "modulora cgc-lora r8 (2 common + 1 specific)": _ours(
            args, "cgc-lora", tasks=TASKS, rank=8, num_experts=2, expert_rank=8
        ),
    }
    if args.embedded:  # keep the real-model section short: the headline comparisons only
        keep = ("PEFT LoRA r8", "PEFT LoRA r16", "modulora lora r8", "modulora molora 8 x r8")
        configs = {k: v for k, v in configs.items() if k in keep}
    return configs


def scaling_configs(args) -> dict:
    return {f"molora {e} x r8": _ours(args, "molora", rank=8, num_experts=e) for e in SCALING}


def _batch(args) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    return {"input_ids": ids, "labels": ids}


def measure_training(args, configs: dict, rss: bool) -> dict:
    """name -> {tokens_s, train_mib, rss_mib}: ``train_step.measure`` on these configs."""
    peak = (lambda name: train_step.peak_rss_mib(__file__, sys.argv[1:], name)) if rss else None
    return train_step.measure(configs, _batch(args), args.rounds, 1, peak)


def measure_generation(args) -> list[tuple[str, int, float]]:
    """(configuration, batch, median latency s) from benchmarks/generate_latency.py."""
    gen_args = argparse.Namespace(
        hidden=args.hidden, layers=args.layers, vocab=args.vocab, prompt_len=64,
        new_tokens=args.new_tokens, rounds=args.rounds, embedded=False,
    )  # fmt: skip
    return generate_latency.measure(gen_args)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else cpu
    return f"{cpu}; {torch.get_num_threads()} threads; torch {torch.__version__}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", default=str(HERE), help="folder for RESULTS.md and results.png")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--embedded", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.hidden, args.layers, args.vocab, args.batch, args.seq = 64, 2, 256, 2, 16
        args.rounds, args.new_tokens = 2, 4
    if args.child:
        configs = {**training_configs(args), **scaling_configs(args)}
        return train_step.child(configs[args.child], _batch(args))
    from results import write_results  # the Markdown and the plot

    print(f"# {machine()}", flush=True)
    train = measure_training(args, training_configs(args), rss=True)
    print("training done", flush=True)
    scaling = measure_training(args, scaling_configs(args), rss=False)
    print("scaling done", flush=True)
    generation = measure_generation(args)
    print("generation done", flush=True)
    embedded = None
    if not args.quick and embedded_cached():
        emb = argparse.Namespace(**{**vars(args), "embedded": True, "batch": 4, "seq": 64})
        emb.vocab, emb.rounds = 49152, 3
        embedded = measure_training(emb, training_configs(emb), rss=False)
        print("embedded done", flush=True)
    write_results(Path(args.out), args, machine(), train, scaling, generation, embedded)


def embedded_cached() -> bool:
    from modulora.models.embedded import cache_dir

    return (cache_dir() / "models" / "smollm2-135m" / "config.json").is_file()


if __name__ == "__main__":
    main()
