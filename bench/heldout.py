"""Held-out accuracy of trained models, with 95% intervals, and the paired difference between them.

Every model answers the same held-out problems of a built-in task greedily (pass@1, as the scripts' eval/accuracy),
optionally also sampled at temperature 1 (the mean over k samples, episodes with +tools: the policy's own success
rate, which is what GRPO and PPO push up). Each model's answers are kept in <model>/heldout/ so a later comparison reuses them.

    python bench/heldout.py out/sft out/grpo out/sft_more --task arithmetic_hard --split test,reworded --n 512

For one model: the share correct with its Wilson score interval. For each later model against the first: the
difference on the same problems, with the paired interval d +- 1.96 sd(d_i) / sqrt(n) (d_i = correct_i(later) -
correct_i(first) in {-1, 0, 1}), and the discordant counts (b: only the first right, c: only the later right) that
McNemar's test compares.
"""
import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import tasks as T  # noqa: E402
from plumbing import models as M  # noqa: E402
from plumbing import runs as R  # noqa: E402


def wilson(k, n, z=1.96):
    """95% Wilson score interval of a share k / n."""
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(a, b, z=1.96):
    """Mean of b_i - a_i over paired 0/1 outcomes and its 95% interval (normal approximation)."""
    d = [y - x for x, y in zip(a, b)]
    n, mean = len(d), sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    return mean, mean - z * sd / math.sqrt(n), mean + z * sd / math.sqrt(n)


def answers(model_dir, task, split, n, samples, max_new_tokens, rt, offset=0, tools=None):
    """Per held-out problem: greedy correct (0/1) and the share of `samples` sampled answers that are correct. With
    tools (a --tools spec), greedy episodes that may call them (tools.episodes, at most 4 turns with calls), graded
    on what the model wrote."""
    name = (f"{task}-{split}-{n}-{samples}-{max_new_tokens}" + (f"-from{offset}" if offset else "")
            + (f"-tools-{tools.replace('/', '_').replace(':', '_')}" if tools else ""))
    cache = os.path.join(model_dir, "heldout", f"{name}.jsonl")
    if os.path.exists(cache):
        with open(cache) as f:
            return [json.loads(line) for line in f]
    data = T.BUILTIN_TASKS[task](split)
    rows = [data[i] for i in range(offset, offset + n)]
    path = M.resolve_model(model_dir, rt)
    tok, model = M.load_tokenizer(path), M.load_model(path, rt)
    prompts = [r["prompt"] for r in rows]
    calls = [0] * len(rows)
    if tools:
        import tools as tool_use
        box = tool_use.Tools(tools)
        kw = box.template_kwargs(tok)
        ids = C.encode_prompts(tok, [box.prompt(tok, p)[0] for p in prompts], **kw)
        episodes = tool_use.episodes(C.generate_ids, model, tok, ids, box, kw, rt, max_new_tokens, 64, 0.0, 1.0, 4)
        greedy, calls = [e["text"] for e in episodes], [e["calls"] for e in episodes]
    else:
        _, greedy = C.generate(model, tok, prompts, rt, max_new_tokens, batch_size=64)
    out = [{"prompt": r["prompt"][0]["content"], "answer": r["answer"], "completion": g,
            "correct": int(T.grade(g, r["answer"])[1]), "tool_calls": c} for r, g, c in zip(rows, greedy, calls)]
    if samples and tools:  # sampled episodes, calling the tools as the greedy ones may
        sampled = [e["text"] for e in tool_use.episodes(C.generate_ids, model, tok, [x for x in ids for _ in range(samples)],
                                                        box, kw, rt, max_new_tokens, 64, 1.0, 1.0, 4)]
    elif samples:
        _, sampled = C.generate(model, tok, [p for p in prompts for _ in range(samples)], rt, max_new_tokens,
                                batch_size=64, temperature=1.0)
    if samples:
        for i, o in enumerate(out):
            o["sampled_correct"] = sum(T.grade(s, o["answer"])[1] for s in sampled[i * samples : (i + 1) * samples]) / samples
    if os.path.isdir(model_dir):
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with open(cache + ".tmp", "w") as f:
            f.writelines(json.dumps(o) + "\n" for o in out)
        os.replace(cache + ".tmp", cache)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="model folders (or the default model's name); the first is the baseline; "
                   "a folder followed by +tools answers with --tools (episodes that may call them)")
    p.add_argument("--tools", default="calculator", help="the tools of the +tools models (as grpo.py --tools)")
    p.add_argument("--task", default="arithmetic", choices=sorted(k for k in T.BUILTIN_TASKS if "preferences" not in k))
    p.add_argument("--split", default="test", help="comma-separated: test (held-out problems), reworded (the same "
                   "problems asked in wordings training never uses)")
    p.add_argument("--n", type=int, default=512, help="held-out problems per split")
    p.add_argument("--offset", type=int, default=0, help="skip this many held-out problems first (the scripts' "
                   "own --eval_size evaluations use the first ones: an offset keeps a test set apart from them)")
    p.add_argument("--samples", type=int, default=0, help="also sample this many answers per problem at T=1")
    p.add_argument("--max_new_tokens", type=int, default=128)
    args = p.parse_args()
    rt = C.setup(0)
    for split in args.split.split(","):
        results = [answers(m.removesuffix("+tools"), args.task, split, args.n, args.samples, args.max_new_tokens, rt,
                           args.offset, args.tools if m.endswith("+tools") else None)
                   for m in args.models]
        print(f"\n{args.task} / {split}: {args.n} held-out problems from #{args.offset}, greedy (pass@1)"
              + (f"; sampled: mean over {args.samples} answers at T=1" if args.samples else ""))
        for m, r in zip(args.models, results):
            k = sum(o["correct"] for o in r)
            lo, hi = wilson(k, len(r))
            line = f"  {m:40s} {k:4d}/{len(r)} = {100 * k / len(r):5.1f}%  [{100 * lo:.1f}, {100 * hi:.1f}]"
            if m.endswith("+tools"):
                line += f"   tool calls per problem {sum(o['tool_calls'] for o in r) / len(r):.2f}"
            if args.samples:
                line += (f"   sampled {100 * sum(o['sampled_correct'] for o in r) / len(r):5.1f}%, at least one of "
                         f"{args.samples} right {100 * sum(o['sampled_correct'] > 0 for o in r) / len(r):5.1f}%")
            print(line)
        for m, r in zip(args.models[1:], results[1:]):
            a, b = [o["correct"] for o in results[0]], [o["correct"] for o in r]
            d, lo, hi = paired_difference(a, b)
            only_a, only_b = sum(x > y for x, y in zip(a, b)), sum(y > x for x, y in zip(a, b))
            print(f"  {m} - {args.models[0]}: {100 * d:+.1f} points, 95% interval [{100 * lo:+.1f}, {100 * hi:+.1f}]"
                  f" (only {m} right: {only_b}, only {args.models[0]}: {only_a})")
    R.finish(rt)


if __name__ == "__main__":
    main()
