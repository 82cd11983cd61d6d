import torch
from transformers import LlamaConfig, LlamaForCausalLM

import modulora

base = LlamaForCausalLM(
    LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
)
cfg = modulora.MixtureConfig(
    method="modula-res", tasks=["math", "medical"], rank=8, universal_rank=16
)
model = modulora.attach(base, cfg)  # base frozen, stage "universal"
ids = torch.randint(0, 1000, (2, 16))
for stage, task in [("universal", None), ("domain:math", "math"), ("router", None)]:
    model.set_stage(stage)  # what trains + what the forward computes
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(input_ids=ids, labels=ids, task=task).loss.backward()
    opt.step()
    opt.zero_grad()
model.add_task("finance", rank=8)  # old experts stay bit-identical
model.save_pretrained("runs/demo")  # manifest.json + one file per expert
model = modulora.load(model.detach(), "runs/demo")  # checks the base, then loads
