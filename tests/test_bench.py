"""The evaluation helpers the README's results are computed with: intervals by hand, the plot from metrics.jsonl."""
import json
import os

import pytest

from bench import decode, heldout, memory, onpolicy_pairs, pairs, plot


def test_wilson_interval_by_hand():
    # 47 of 64: p = 0.734375, centre (p + z²/2n) / (1 + z²/n) = 0.721103, half-width 0.105934
    lo, hi = heldout.wilson(47, 64)
    assert (lo, hi) == pytest.approx((0.615169, 0.827037), abs=1e-6)
    lo, hi = heldout.wilson(0, 10)  # never below 0, and not a zero-width interval at 0
    assert lo == 0 and hi == pytest.approx(0.277540, abs=1e-6)


def test_paired_difference_by_hand():
    # d = [0, -1, 1, 1]: mean 0.25, sample sd sqrt(2.75 / 3) = 0.957427, half-width 1.96 x 0.957427 / 2 = 0.938279
    d, lo, hi = heldout.paired_difference([1, 1, 0, 0], [1, 0, 1, 1])
    assert (d, lo, hi) == pytest.approx((0.25, -0.688279, 1.188279), abs=1e-6)
    assert heldout.paired_difference([1, 0, 1], [1, 0, 1]) == (0, 0, 0)


def test_pair_accuracy_by_hand():
    import torch
    ref = torch.tensor([[-5.0, -9.0], [-4.0, -1.0], [-6.0, -6.0]])
    # Pair 1: chosen +1, rejected -1 against the reference: right (and the policy already ranked it right).
    # Pair 2: chosen -1, rejected -3: the margin rose by 2, right, though the policy still prefers the rejected.
    # Pair 3: both unchanged: a margin of exactly 0 is not counted right.
    lp = torch.tensor([[-4.0, -10.0], [-5.0, -4.0], [-6.0, -6.0]])
    assert pairs.ranked_right(lp, ref) == (2, 1)


def test_onpolicy_pairs_take_a_right_and_a_wrong_answer_of_the_same_problem():
    rows = [{"prompt": [{"role": "user", "content": f"What is {q}?"}], "answer": a} for q, a in
            (("2 + 2", "4"), ("3 + 3", "6"), ("4 + 4", "8"), ("5 + 5", "10"))]
    texts = ["\\boxed{5}", "\\boxed{4}", "\\boxed{4}",  # mixed: the first right one, the first wrong one
             "\\boxed{6}", "\\boxed{6}", "6",            # no box is wrong too
             "\\boxed{7}", "\\boxed{9}", "\\boxed{1}",  # all wrong: no pair
             "\\boxed{10}", "\\boxed{10.0}", "\\boxed{10}"]  # all right: no pair
    out, counts = onpolicy_pairs.pairs_from_samples(rows, texts, 3)
    assert [(x["chosen"][0]["content"], x["rejected"][0]["content"]) for x in out] == [("\\boxed{4}", "\\boxed{5}"),
                                                                                       ("\\boxed{6}", "6")]
    assert [x["answer"] for x in out] == ["4", "6"] and out[0]["prompt"] == rows[0]["prompt"]
    assert counts == {"all_right": 1, "all_wrong": 1}
    from plumbing import formats as D
    assert D.preference_pair(out[1]) == (rows[1]["prompt"], out[1]["chosen"], out[1]["rejected"])  # dpo.py reads it


def test_plot_reads_resumed_runs_once_and_draws(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 0, "eval/accuracy": 0.5}, {"step": 1, "reward": 0.1, "seconds_per_step": 30},
            {"step": 2, "reward": 0.2, "seconds_per_step": 30}, {"step": 2, "reward": 0.3, "seconds_per_step": 30},
            {"step": 3, "reward": 0.4, "seconds_per_step": 60, "eval/accuracy": 0.7}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    series = plot.read_metrics(str(run))
    assert series["reward"] == [(1, 30, 0.1), (2, 60, 0.3), (3, 120, 0.4)]  # step 2 drawn once: the last row
    assert series["eval/accuracy"] == [(0, 0, 0.5), (3, 120, 0.7)]
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "fig.png")
    import sys
    argv = sys.argv
    sys.argv = ["plot.py", str(run), "--metrics", "eval/accuracy,reward", "--x", "time", "--out", out]
    try:
        plot.main()
    finally:
        sys.argv = argv
    assert os.path.getsize(out) > 1000


def test_the_decode_benchmark_times_the_same_work_each_way(tiny_model_dir):
    # Growing and static caches must decode the same greedy tokens (fp32), or the timings compare different work.
    import torch
    import common as C
    from plumbing import models as M
    rt = C.Runtime(torch.device("cpu"), torch.float32)
    model = M.load_model(tiny_model_dir, rt).eval()
    x = torch.randint(100, 1000, (3, 5), generator=torch.Generator().manual_seed(0))
    ms, dynamic = decode.decode_ms(model, rt, x, 6)
    _, static = decode.decode_ms(model, rt, x, 6, model.forward)
    assert ms > 0 and dynamic.shape == (3, 6) and torch.equal(dynamic, static)
    with torch.no_grad():  # and they are the greedy continuation of the whole sequence
        full = torch.cat([x, dynamic], 1)
        assert torch.equal(model(full).logits[:, 4:-1].argmax(-1), dynamic)


def test_the_memory_benchmark_counts_what_each_mode_holds(tiny_model_dir):
    # Full training holds 16 bytes per parameter (fp32 weight, gradient, two AdamW moments) and AdamW's 4-byte step
    # count per tensor; a rank-4 adapter: 4 bytes per frozen base parameter, 16 per adapter parameter, r (d_in + d_out)
    # of them in each layer's two tensors A and B.
    import torch
    import common as C
    from plumbing import models as M
    rt = C.Runtime(torch.device("cpu"), torch.float32)
    named = dict(M.load_model(tiny_model_dir, rt).named_parameters())
    linear = {n: p for n, p in named.items() if memory.linear(n)}
    n_linear, n_other = sum(p.numel() for p in linear.values()), sum(p.numel() for n, p in named.items() if n not in linear)
    full = memory.held(tiny_model_dir, rt, "full", 4)
    assert full == {"linear": 16 * n_linear + 4 * len(linear), "other": 16 * n_other + 4 * (len(named) - len(linear))}
    adapter = sum(4 * sum(p.shape) for p in linear.values())
    assert memory.held(tiny_model_dir, rt, "lora", 4) == {"linear": 4 * n_linear + 16 * adapter + 4 * 2 * len(linear),
                                                          "other": 4 * n_other}
    ref = memory.reference(tiny_model_dir)  # bf16 linear layers, fp32 embeddings and norms, and a bf16 output layer
    assert ref == {"linear": 2 * n_linear, "other": 4 * n_other + 2 * named["model.embed_tokens.weight"].numel()}


def test_heldout_samples_a_tools_model_as_episodes(tiny_model_dir, tmp_path, monkeypatch):
    # With +tools, the sampled answers are episodes that may call the tools too (temperature 1, every prompt repeated
    # `samples` times), not plain generations; and the answers are kept for a later comparison.
    import shutil

    import torch
    import common as C
    import tools as tool_use
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "m")
    calls, real = [], tool_use.episodes
    monkeypatch.setattr(tool_use, "episodes", lambda *a: calls.append((len(a[3]), a[9])) or real(*a))
    monkeypatch.setattr(C, "generate", lambda *a, **k: pytest.fail("a plain generation for a +tools model"))
    rt = C.Runtime(torch.device("cpu"), torch.float32)
    out = heldout.answers(str(model_dir), "arithmetic_tools", "test", 2, 3, 6, rt, tools="calculator")
    assert calls == [(2, 0.0), (6, 1.0)]  # greedy episodes, then 3 sampled episodes per problem
    assert len(out) == 2 and all(o["sampled_correct"] in (0, 1 / 3, 2 / 3, 1) for o in out)
    assert heldout.answers(str(model_dir), "arithmetic_tools", "test", 2, 3, 6, rt, tools="calculator") == out
    assert len(calls) == 2  # the second time from <model>/heldout/


def test_heldout_names_which_model_got_the_discordant_problems_right(tmp_path):
    from conftest import ok, run_script
    # Cached answers (as answers() keeps them) of 4 problems: the baseline right on #0 and #1, the later model on
    # #1, #2 and #3: the later one +2 problems, 1 only the baseline got right, 2 only the later one.
    for name, correct in (("base", [1, 1, 0, 0]), ("later", [0, 1, 1, 1])):
        (tmp_path / name / "heldout").mkdir(parents=True)
        (tmp_path / name / "heldout" / "arithmetic-test-4-0-128.jsonl").write_text(
            "".join(json.dumps({"correct": c, "tool_calls": 0}) + "\n" for c in correct))
    p = ok(run_script("bench/heldout.py", tmp_path / "base", tmp_path / "later", "--n", 4))
    assert "2/4 =  50.0%" in p.stdout and "3/4 =  75.0%" in p.stdout
    assert f"(only {tmp_path / 'later'} right: 2, only {tmp_path / 'base'}: 1)" in p.stdout
    assert "+25.0 points" in p.stdout
