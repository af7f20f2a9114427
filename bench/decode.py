"""One decode step of the sampler three ways: the growing KV cache (DynamicCache, as common.generate_ids runs it),
a static cache of fixed length, and that static step compiled with torch.compile. Greedy, bf16 autocast where the
machine is fast at it, the policy as an RL script holds it (fp32 weights that require grad).

    python bench/decode.py                  # batch 16, a 40-token prompt, median ms of 22 steps after 2 warm-up
    python bench/decode.py --batch 64 --no_compile

Run it on a quiet machine. Compiling takes about a minute on 2 CPU cores.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
from plumbing import models as M  # noqa: E402


@torch.no_grad()
def decode_ms(model, rt, x, steps, static=None):
    """Median ms of one decode step after prefilling x, and the (B, steps) greedy tokens; static: None (DynamicCache)
    or the forward to call on a StaticCache (model.forward or its compiled version)."""
    from transformers import DynamicCache, StaticCache
    B, P = x.shape
    if static is None:
        cache, forward = DynamicCache(config=model.config), model.forward
        position = lambda t: {}  # noqa: E731
    else:
        cache, forward = StaticCache(config=model.config, max_batch_size=B, max_cache_len=P + steps), static
        position = lambda t: {"cache_position": torch.tensor([P + t])}  # noqa: E731
    kv = {C.cache_kwarg(model): cache}
    times, tokens = [], []
    with rt.autocast():
        first = {"cache_position": torch.arange(P)} if static is not None else {}
        y = model(input_ids=x, use_cache=True, logits_to_keep=1, **first, **kv).logits[:, -1].argmax(-1)
        for t in range(steps):
            t0 = time.perf_counter()
            tokens.append(y)
            y = forward(input_ids=y[:, None], use_cache=True, **position(t), **kv).logits[:, -1].argmax(-1)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[2:]), torch.stack(tokens, 1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=M.DEFAULT_MODEL)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt_length", type=int, default=40)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--no_compile", action="store_true")
    args = p.parse_args()
    rt = C.setup(0)
    model = M.load_model(M.resolve_model(args.model, rt), rt).eval()  # weights fp32, requiring grad
    x = torch.randint(100, 1000, (args.batch, args.prompt_length))
    print(f"# batch {args.batch}, prompt {args.prompt_length} tokens, {torch.get_num_threads()} threads, {rt.dtype}")
    print(f"DynamicCache (generate_ids): {decode_ms(model, rt, x, args.steps)[0]:.1f} ms per step", flush=True)
    print(f"StaticCache:                 {decode_ms(model, rt, x, args.steps, model.forward)[0]:.1f} ms per step", flush=True)
    if not args.no_compile:
        t0 = time.perf_counter()
        compiled = torch.compile(model.forward, dynamic=False)
        decode_ms(model, rt, x, args.steps, compiled)  # compiles
        print(f"StaticCache, torch.compile:  {decode_ms(model, rt, x, args.steps, compiled)[0]:.1f} ms per step "
              f"(compiled in {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
