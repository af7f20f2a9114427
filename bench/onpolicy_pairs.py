"""On-policy preference pairs: a model's own right and wrong answers to training problems, as data for dpo.py.

Each of the first --n training problems of a built-in task is answered --samples times at temperature 1 by the
model. A problem with at least one right and one wrong answer gives one pair, a right answer chosen and a wrong one
rejected, in TRL's explicit-prompt format with the `answer` column; problems the model always gets right, or always
wrong, give none (counted). The pairs say what this model gets wrong, not what a hand-made wrong answer looks like.

    python bench/onpolicy_pairs.py out/sft_mixed --task arithmetic_mixed --n 1024 --samples 4 --out out/onpolicy.jsonl
    python dpo.py --model out/sft_mixed --dataset out/onpolicy.jsonl
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import tasks as T  # noqa: E402
from plumbing import models as M  # noqa: E402


def pairs_from_samples(rows, texts, samples):
    """rows: problems (prompt, answer); texts: `samples` answers to each, in order. Returns the pairs and the counts
    of problems answered all right and all wrong."""
    pairs, counts = [], {"all_right": 0, "all_wrong": 0}
    for i, row in enumerate(rows):
        mine = texts[i * samples : (i + 1) * samples]
        right = [t for t in mine if T.grade(t, row["answer"])[1]]
        wrong = [t for t in mine if not T.grade(t, row["answer"])[1]]
        if right and wrong:
            pairs.append({"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": right[0]}],
                          "rejected": [{"role": "assistant", "content": wrong[0]}], "answer": row["answer"]})
        else:
            counts["all_right" if right else "all_wrong"] += 1
    return pairs, counts


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="model folder (or the default model's name)")
    p.add_argument("--task", default="arithmetic", choices=sorted(k for k in T.BUILTIN_TASKS if "preferences" not in k))
    p.add_argument("--n", type=int, default=1024, help="training problems to answer")
    p.add_argument("--samples", type=int, default=4, help="answers per problem, at temperature 1")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the .jsonl file of pairs to write")
    args = p.parse_args()
    rt = C.setup(args.seed)
    data = T.BUILTIN_TASKS[args.task]("train", args.seed)
    rows = [data[i] for i in range(args.n)]
    path = M.resolve_model(args.model, rt)
    tok, model = M.load_tokenizer(path), M.load_model(path, rt)
    _, texts = C.generate(model, tok, [r["prompt"] for r in rows for _ in range(args.samples)], rt,
                          args.max_new_tokens, batch_size=64, temperature=1.0)
    pairs, counts = pairs_from_samples(rows, texts, args.samples)
    with open(args.out + ".tmp", "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in pairs)
    os.replace(args.out + ".tmp", args.out)
    right = sum(T.grade(t, r["answer"])[1] for i, r in enumerate(rows) for t in texts[i * args.samples : (i + 1) * args.samples])
    print(f"{args.n} problems x {args.samples} samples: {right / len(texts):.1%} of the answers right; "
          f"{len(pairs)} pairs written to {args.out}; no pair from {counts['all_right']} problems answered all right "
          f"and {counts['all_wrong']} all wrong")


if __name__ == "__main__":
    main()
