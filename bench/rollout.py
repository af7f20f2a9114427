"""Rollout speed: common.generate_ids (the sampler every RL script uses) against the way it sampled before,
transformers' model.generate under bf16 autocast, at the same batch, interleaved, in one process.

    python bench/rollout.py                      # 2 prompts x 8 completions and 8 x 8, at most 64 new tokens

Also prints the machine's bf16 and fp32 matmul rates. Prints generated tokens per second (only real tokens: each completion is cut after its first EOS) and their ratio.
The two paths draw from the same distribution but not the same random numbers, so their completions differ; the
token counts are printed so that a reader can see the lengths are comparable. Run it on a quiet machine.
"""
import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import tasks as T  # noqa: E402
from plumbing import models as M  # noqa: E402


@torch.no_grad()
def hf_generate(model, tok, prompt_ids, rt, max_new_tokens, temperature):
    """The previous sampler: model.generate on the left-padded batch, under autocast, cut after the first EOS."""
    x, mask = C.pad(prompt_ids, tok.pad_token_id, side="left")
    with rt.autocast():
        out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
                             temperature=temperature, top_p=1.0, top_k=None, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    rows = [r[: r.index(tok.eos_token_id) + 1] if tok.eos_token_id in r else r for r in out[:, x.shape[1] :].tolist()]
    return rows


def matmul_gflops(dtype, n=2048, reps=10):
    """The machine's matmul rate: the yardstick for how close a training step comes to the hardware."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=M.DEFAULT_MODEL)
    p.add_argument("--shapes", default="2x8,8x8", help="prompts x completions per prompt, comma-separated")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    rt = C.setup(0)
    path = M.resolve_model(args.model, rt)
    tok = M.load_tokenizer(path)
    model = M.load_model(path, rt).train()  # as in an RL script: the trained policy, weights fp32, requires grad
    task = T.Arithmetic("train")
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"precision {rt.dtype}, {args.max_new_tokens} new tokens at most, temperature {args.temperature}; "
          f"matmul 2048^3: bf16 {matmul_gflops(torch.bfloat16):.0f} GFLOP/s, fp32 {matmul_gflops(torch.float32):.0f}")
    print("| prompts x completions | model.generate tokens/s | generate_ids tokens/s | ratio | tokens (generate / ids) |")
    print("|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        n_prompts, g = (int(v) for v in shape.split("x"))
        prompts = C.encode_prompts(tok, [task[i]["prompt"] for i in range(n_prompts)])
        prompt_ids = [q for q in prompts for _ in range(g)]  # groups contiguous, as grpo.py lays them out
        C.generate_ids(model, tok, prompt_ids[:2], rt, 4, temperature=1.0)  # warm-up
        rates = {"hf": [], "ids": []}
        counts = {"hf": [], "ids": []}
        for r in range(args.repeats):
            for name in ("hf", "ids"):
                torch.manual_seed(r)
                t = time.perf_counter()
                if name == "hf":
                    out = hf_generate(model, tok, prompt_ids, rt, args.max_new_tokens, args.temperature)
                else:
                    out = C.generate_ids(model, tok, prompt_ids, rt, args.max_new_tokens, len(prompt_ids),
                                         args.temperature)
                seconds = time.perf_counter() - t
                n = sum(len(o) for o in out)
                rates[name].append(n / seconds)
                counts[name].append(n)
        hf, ids = statistics.median(rates["hf"]), statistics.median(rates["ids"])
        print(f"| {n_prompts} x {g} | {hf:.0f} | {ids:.0f} | {ids / hf:.2f}x | {sum(counts['hf'])} / {sum(counts['ids'])} |",
              flush=True)


if __name__ == "__main__":
    main()
