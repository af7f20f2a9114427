"""Held-out pair accuracy of preference-trained models, the same measure for every dpo.py variant.

A pair is ranked right when the trained model raised the chosen response's likelihood relative to the rejected
one's more than the starting model did: the DPO implicit reward (Rafailov et al. 2023, §5)

    [log π(y_w|x) - log π_ref(y_w|x)] - [log π(y_l|x) - log π_ref(y_l|x)] > 0

with π_ref the starting model (--ref). KTO, ORPO and SimPO do not optimise this margin directly, but each of them
is meant to make chosen answers relatively more likely than rejected ones, so it compares them on one scale. The
policy's own ranking, log π(y_w|x) > log π(y_l|x) (summed log-probs), is printed beside it.

    python bench/pairs.py --ref out/sft out/dpo out/kto out/orpo --n 512

Each share comes with its 95% Wilson interval (bench/heldout.py's).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import tasks as T  # noqa: E402
from plumbing import formats as F  # noqa: E402
from plumbing import models as M  # noqa: E402
import dpo  # noqa: E402
from bench.heldout import wilson  # noqa: E402


@torch.no_grad()
def pair_logps(model_dir, pairs, rt, batch_size=16):
    """(N, 2) summed response log-probs [chosen, rejected] of every tokenized pair under a model."""
    path = M.resolve_model(model_dir, rt)
    model = M.load_model(path, rt)
    tok = M.load_tokenizer(path)
    return dpo.reference_logps(model, pairs, rt, tok.pad_token_id, batch_size)


def ranked_right(lp, ref):
    """(N, 2) log-probs [chosen, rejected] of a model and of the reference -> how many pairs the implicit reward ranks
    right, and how many the model's own log-probs do."""
    margin = (lp[:, 0] - ref[:, 0]) - (lp[:, 1] - ref[:, 1])
    return int((margin > 0).sum()), int((lp[:, 0] > lp[:, 1]).sum())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="dpo.py output folders")
    p.add_argument("--ref", required=True, help="the model they started from")
    p.add_argument("--task", default="arithmetic_preferences")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=512, help="held-out pairs")
    a = p.parse_args()
    rt = C.setup(0, "cpu")
    data = T.BUILTIN_TASKS[a.task](a.split)
    tok = M.load_tokenizer(M.resolve_model(a.ref, rt))
    pairs = F.tokenize_preferences([data[i] for i in range(a.n)], tok, 10**6, f"{a.task}/{a.split}")
    ref = pair_logps(a.ref, pairs, rt)
    print(f"{'model':<28} {'implicit-reward accuracy':>36} {'policy accuracy':>30}")
    for m in [a.ref] + a.models:
        lp = ref if m == a.ref else pair_logps(m, pairs, rt)
        (k_implicit, k_policy), n = ranked_right(lp, ref), len(pairs)
        lo, hi = wilson(k_implicit, n)
        plo, phi = wilson(k_policy, n)
        implicit = "—" if m == a.ref else f"{k_implicit / n:.1%} [{lo:.1%}, {hi:.1%}]"
        print(f"{m:<28} {implicit:>36} {f'{k_policy / n:.1%} [{plo:.1%}, {phi:.1%}]':>30}", flush=True)


if __name__ == "__main__":
    main()
