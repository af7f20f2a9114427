"""What training holds in memory per parameter of the model, in each mode, counted from the tensors themselves, and
the largest model each mode fits in a given memory (before activations, the KV cache and the framework's own).

For each mode the model is loaded as the scripts load it, one AdamW step is taken (so that its state exists), and
the bytes of every weight (4-bit ones with their quantization constants), gradient and optimizer tensor are summed:
    full   fp32 weights, fp32 gradients, AdamW's two fp32 moments (what the scripts train by default)
    lora   the frozen fp32 base, and an adapter of rank --lora_r with its gradients and moments (--lora_r)
    qlora  the frozen base in NF4 with double quantization (bitsandbytes), and the adapter (--load_in_4bit)
GRPO (and PPO's policy, DPO without precomputed log-probs) also holds a reference: a frozen copy with bf16 linear
layers (models.freeze) in full mode, none with an adapter (the base with the adapter off). FSDP on N devices holds
1/N of full mode's weights, gradients and moments per device; the reference is held whole on each (bf16), and while
sampling the whole policy is gathered in bf16 on each device (common.unsharded). The largest model is computed
from the bytes per parameter of the decoder's linear layers, which hold nearly all of a large model's parameters
(embeddings stay fp32 under LoRA and QLoRA: a small model's share of them weighs more).

    python bench/memory.py                          # the embedded SmolLM2-135M-Instruct; 24 and 80 GiB
    python bench/memory.py --memory_gib 24,80 --lora_r 16 --fsdp 8
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import common as C  # noqa: E402
from plumbing import models as M  # noqa: E402
from plumbing import runs as R  # noqa: E402


def tensor_bytes(t):
    """A tensor's bytes; a bitsandbytes 4-bit weight also holds its quantization constants."""
    n = t.nbytes
    qs = getattr(t, "quant_state", None)
    if qs is not None:
        n += sum(x.nbytes for x in (qs.absmax, qs.code) if torch.is_tensor(x))
        if qs.state2 is not None:  # double quantization: the constants' own constants
            n += sum(x.nbytes for x in (qs.state2.absmax, qs.state2.code) if torch.is_tensor(x))
    return n


def linear(name):
    """A weight of the decoder's linear layers (with its adapter): nearly all of a large model's parameters."""
    return "_proj." in name


def held(path, rt, mode, lora_r):
    """{"linear": bytes, "other": bytes} of weights, gradients and AdamW state after one step in this mode, split
    between the decoder's linear layers and the rest (embeddings, norms)."""
    args = argparse.Namespace(lora_r=0 if mode == "full" else lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                              lora_target_modules="all-linear", load_in_4bit=mode == "qlora",
                              gradient_checkpointing=False, learning_rate=1e-5, weight_decay=0.0, adam_beta1=0.9,
                              adam_beta2=0.95, warmup_steps=0, max_steps=1, min_lr_ratio=0.1)
    model = M.add_lora(M.load_model(path, rt, load_in_4bit=mode == "qlora"), args)
    opt, _ = R.optimizer_and_schedule(model, args)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    out = {"linear": 0, "other": 0}
    for name, p in model.named_parameters():
        state = sum(v.nbytes for v in opt.state.get(p, {}).values() if torch.is_tensor(v))
        out["linear" if linear(name) else "other"] += tensor_bytes(p) + (p.grad.nbytes if p.requires_grad else 0) + state
    return out


def reference(path):
    """A frozen reference as the scripts hold it under bf16 (models.freeze): bf16 linear layers."""
    model = M.freeze(M.load_model(path, C.Runtime(torch.device("cpu"), torch.float32)),
                     C.Runtime(torch.device("cpu"), torch.bfloat16))
    out = {"linear": 0, "other": 0}
    for name, p in model.named_parameters():
        out["linear" if linear(name) else "other"] += p.nbytes
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=M.DEFAULT_MODEL)
    p.add_argument("--memory_gib", default="24,80", help="memories to fit, comma-separated GiB")
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--fsdp", type=int, default=8, help="devices of the FSDP row")
    a = p.parse_args()
    rt = C.setup(0, "cpu", "fp32")
    path = M.resolve_model(a.model, rt)
    named = list(M.load_model(path, rt).named_parameters())
    count = {"linear": sum(p.numel() for n, p in named if linear(n)), "other": sum(p.numel() for n, p in named if not linear(n))}
    n = sum(count.values())
    ref = reference(path)
    modes = {m: held(path, rt, m, a.lora_r) for m in ("full", "lora", "qlora")}
    modes[f"FSDP on {a.fsdp}"] = {k: v / a.fsdp for k, v in modes["full"].items()}
    gibs = [float(x) for x in a.memory_gib.split(",")]
    print(f"{a.model}: {n / 1e6:.1f}M parameters, {100 * count['linear'] / n:.0f}% of them in the decoder's linear "
          f"layers; LoRA rank {a.lora_r} on all of those\n")
    print("| mode | SFT: bytes/param of this model | SFT: bytes/param of the linear layers | GRPO: bytes/param of the "
          "linear layers | " + " | ".join(f"largest model, SFT / GRPO, in {x:g} GiB" for x in gibs) + " |")
    print("|---" * (4 + len(gibs)) + "|")
    for mode, b in modes.items():
        # GRPO adds the reference (none with an adapter) and under FSDP the bf16 policy gathered while sampling
        extra = 0 if mode in ("lora", "qlora") else ref["linear"] + (2 * count["linear"] if mode != "full" else 0)
        sft_all = sum(b.values()) / n
        sft, grpo = b["linear"] / count["linear"], (b["linear"] + extra) / count["linear"]
        fits = [f"{x * 2**30 / sft / 1e9:.1f}B / {x * 2**30 / grpo / 1e9:.1f}B" for x in gibs]
        print(f"| {mode} | {sft_all:.2f} | {sft:.2f} | {grpo:.2f} | " + " | ".join(fits) + " |")


if __name__ == "__main__":
    main()
