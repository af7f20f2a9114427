"""grpo.py: advantages and every loss type against hand-computed values, where the clip engages, the k3 KL, the
log-probs and the loss mask of sampled completions, rewards that raise, and tiny-model runs that learn a rule
reward, resume exactly and run under torchrun."""
import math
import os
import re
import sys

import pytest
import torch

import common as C
import tasks as T
from plumbing import engine
from plumbing import errors as E
from plumbing import models as M
import grpo
from conftest import PETS, RULES, ok, read_metrics, run_script, write_jsonl


# ----------------------------------------------------------------------------------------------------------------
# Advantages (Shao et al. 2024, §4.1.2)
def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0])  # two groups of G = 4
    # Seed 002's worked example: mean 0.5, population std 0.5 -> A = ±1 (up to ε = 1e-4); an all-equal group -> 0.
    a = grpo.group_advantages(r, 4, "group")
    assert a.tolist() == pytest.approx([0.5 / 0.5001, -0.5 / 0.5001] * 2 + [0.0] * 4)
    assert grpo.group_advantages(r, 4, "none").tolist() == [0.5, -0.5, 0.5, -0.5, 0, 0, 0, 0]
    # batch: the group mean, the std of all eight rewards (mean 1.25, population variance 0.6875)
    s = math.sqrt(0.6875) + 1e-4
    assert grpo.group_advantages(r, 4, "batch").tolist() == pytest.approx([0.5 / s, -0.5 / s] * 2 + [0.0] * 4)
    assert grpo.group_advantages(r, 4, "batch", batch_std=torch.tensor(2.0)).tolist() == \
        pytest.approx([0.5 / 2.0001, -0.5 / 2.0001] * 2 + [0.0] * 4)
    # a group with rewards (3, 1): mean 2, std 1
    assert grpo.group_advantages(torch.tensor([3.0, 1.0]), 2).tolist() == pytest.approx([1 / 1.0001, -1 / 1.0001])


# ----------------------------------------------------------------------------------------------------------------
# The per-token objective and its aggregation
# Two completions of lengths 2 and 3 (the first padded): ratios ρ and advantages A = (+1, -1).
RATIO = torch.tensor([[1.0, 1.5, 7.0], [0.5, 1.0, 1.1]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
ADV = torch.tensor([1.0, -1.0])
# -min(ρA, clip(ρ, 0.8, 1.2)A) per token:
#   A = +1: ρ = 1 -> -1;  ρ = 1.5 -> -min(1.5, 1.2) = -1.2 (clipped above)
#   A = -1: ρ = 0.5 -> -min(-0.5, -0.8) = 0.8 (clipped below);  ρ = 1 -> 1;  ρ = 1.1 -> 1.1
EXPECTED = torch.tensor([[-1.0, -1.2], [0.8, 1.0]])


def losses(epsilon=0.2, epsilon_high=0.2, ref_logp=None, beta=0.0):
    old = torch.zeros(2, 3)
    logp = torch.log(RATIO).requires_grad_(True)
    return logp, grpo.per_token_loss(logp, old, ref_logp, ADV, epsilon, epsilon_high, beta)


def test_sampler_weights_by_hand():
    # Two completions, three token slots, the last of the second is padding. log π_old - log π_sampler:
    #   [ln 2, -ln 4, ln 5]  and  [ln 3, ln 0.5, (pad)]
    old = torch.tensor([[math.log(2), -math.log(4), math.log(5)], [math.log(3), math.log(0.5), 7.0]])
    sampled = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    w = C.sampler_weights(old, sampled, mask, "token_truncate", clip_max=3.0, clip_min=0.0)
    assert torch.allclose(w, torch.tensor([[2, 0.25, 3], [3, 0.5, 1.0]]))  # 5 truncated to 3; padding exp(0) = 1
    w = C.sampler_weights(old, sampled, mask, "token_truncate", clip_max=3.0, clip_min=0.5)
    assert torch.allclose(w, torch.tensor([[2, 0.5, 3], [3, 0.5, 1]]))
    w = C.sampler_weights(old, sampled, mask, "token_mask", clip_max=3.0, clip_min=0.5)
    assert torch.allclose(w, torch.tensor([[2, 0, 0], [3, 0.5, 1]]))  # 0.25 < 0.5 and 5 > 3 masked, 3 kept
    # sequence level: the completions' ratios 2 * 0.25 * 5 = 2.5 and 3 * 0.5 = 1.5, one per row
    w = C.sampler_weights(old, sampled, mask, "sequence_truncate", clip_max=2.0)
    assert w.shape == (2, 1) and w.flatten().tolist() == pytest.approx([2.0, 1.5])
    w = C.sampler_weights(old, sampled, mask, "sequence_mask", clip_max=2.0)
    assert w.flatten().tolist() == pytest.approx([0.0, 1.5])
    # Where the sampler is the trainer, every weight is exactly 1.
    for mode in C.SAMPLER_WEIGHT_MODES:
        assert torch.equal(C.sampler_weights(old, old, mask, mode), torch.ones_like(old[:, : 3 if "token" in mode else 1]))
    # Their metrics, over the real tokens only: |log π_old - log π_sampler| = ln 2, ln 4, ln 5, ln 3, ln 2.
    rt = C.Runtime(torch.device("cpu"), torch.float32)
    w = C.sampler_weights(old, sampled, mask, "token_truncate", clip_max=3.0, clip_min=0.5)
    got = engine.sampler_metrics(old, sampled, w, mask, rt)
    assert got["sampling/sampling_logp_difference/mean"] == pytest.approx(math.log(2 * 4 * 5 * 3 * 2) / 5)
    assert got["sampling/sampling_logp_difference/max"] == pytest.approx(math.log(5))
    assert [got[f"sampling/importance_sampling_ratio/{k}"] for k in ("min", "mean", "max")] == pytest.approx(
        [0.5, (2 + 0.5 + 3 + 3 + 0.5) / 5, 3])  # the padding's weight 1 is not counted
    w = C.sampler_weights(old, sampled, mask, "sequence_truncate", clip_max=2.0)
    got = engine.sampler_metrics(old, sampled, w, mask, rt)
    assert [got[f"sampling/importance_sampling_ratio/{k}"] for k in ("min", "mean", "max")] == pytest.approx([1.5, 1.75, 2])
    assert "sampling/importance_sampling_ratio/mean" not in engine.sampler_metrics(old, sampled, None, mask, rt)
    # The weight scales the clipped policy term of its token, not the KL: A = 1, ratio 1, β = 0.1, k3 = 0.5 - ln 2 + ...
    logp, ref = torch.zeros(1, 2), torch.tensor([[math.log(2), 0.0]])
    loss, kl, _, _ = grpo.per_token_loss(logp, logp, ref, torch.tensor([1.0]), 0.2, 0.2, 0.1, weights=torch.tensor([[0.5, 2.0]]))
    assert torch.allclose(kl, torch.tensor([[1 - math.log(2), 0.0]]))
    assert torch.allclose(loss, torch.tensor([[-0.5 + 0.1 * (1 - math.log(2)), -2.0]]))


def test_per_token_loss_and_clip_flags_by_hand():
    logp, (loss, kl, low, high) = losses()
    assert loss[0, :2].tolist() == pytest.approx([-1.0, -1.2])
    assert loss[1].tolist() == pytest.approx([0.8, 1.0, 1.1])
    assert kl.abs().sum() == 0  # no reference
    assert low.tolist() == [[False, False, False], [True, False, False]]
    assert high.tolist() == [[False, True, True], [False, False, False]]
    # Where the clip engages the token has no gradient; elsewhere d(-ρA)/d log π = -ρA.
    (loss * MASK).sum().backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-1.0, 0.0, 0.0, 0.0, 1.0, 1.1])


def test_clip_engages_only_on_the_side_that_limits_the_update():
    # A ratio below 1-ε with A > 0, or above 1+ε with A < 0, is NOT clipped: the min keeps the unclipped, worse term.
    logp = torch.log(torch.tensor([[0.5, 1.5]])).requires_grad_(True)
    for A, grad in ((1.0, [-0.5, 0.0]), (-1.0, [0.0, 1.5])):
        logp.grad = None
        loss, _, low, high = grpo.per_token_loss(logp, torch.zeros(1, 2), None, torch.tensor([A]), 0.2, 0.2, 0.0)
        loss.sum().backward()
        assert logp.grad.tolist()[0] == pytest.approx(grad)
        assert (low | high).tolist() == [[False, True] if A > 0 else [True, False]]


def test_gspo_sequence_ratio_by_hand():
    # Tokens of one completion with log-ratios 0.2 and -0.4 (a third position is padding): s = exp((0.2 - 0.4) / 2).
    logp = torch.tensor([[0.2, -0.4, 5.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    s = math.exp(-0.1)
    for A in (1.0, -1.0):
        loss, _, low, high = grpo.per_token_loss(logp, torch.zeros(1, 3), None, torch.tensor([A]), 0.2, 0.2, 0.0, mask,
                                                 "sequence")
        assert loss[0, :2].tolist() == pytest.approx([-s * A, -s * A])  # 0.905 is inside [0.8, 1.2]: no clip
        assert not (low | high).any()
    # Its gradient: d(-s A)/d log π_t = -s A / |y| on each real token, 0 on padding (the loss there is masked).
    logp.grad = None
    loss, *_ = grpo.per_token_loss(logp, torch.zeros(1, 3), None, torch.tensor([1.0]), 0.2, 0.2, 0.0, mask, "sequence")
    grpo.aggregate(loss, mask, "grpo", 1, 2, 3).backward()  # the completion's token mean: -s
    assert logp.grad.tolist()[0] == pytest.approx([-s / 2, -s / 2, 0.0])


def test_gspo_equals_the_token_form_when_every_token_has_the_same_ratio():
    torch.manual_seed(0)
    logp = torch.randn(3, 5)
    old = logp - torch.tensor([[0.1], [-0.3], [0.25]])  # one ratio per completion: e^0.1, e^-0.3 (clipped), e^0.25 (clipped)
    mask = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2, [1.0] * 4 + [0.0]])
    A = torch.tensor([1.0, -1.0, 0.5])
    out = {}
    for level in ("token", "sequence"):
        x = logp.clone().requires_grad_(True)
        loss, _, low, high = grpo.per_token_loss(x, old, None, A, 0.2, 0.2, 0.0, mask, level)
        grpo.aggregate(loss, mask, "grpo", 3, mask.sum(), 5).backward()
        out[level] = (loss * mask, x.grad * mask, (low | high) & mask.bool())
    for a, b in zip(out["token"], out["sequence"]):
        assert torch.allclose(a, b, atol=1e-6) if a.dtype != torch.bool else torch.equal(a, b)


def test_gspo_clips_the_whole_sequence():
    # Token ratios 1.0 and 2.25 (each alone: one inside, one outside [0.8, 1.2]); the sequence ratio is their
    # geometric mean 1.5 > 1.2, so with A > 0 the whole completion is clipped: every token flagged, no gradient.
    logp = torch.log(torch.tensor([[1.0, 2.25]])).requires_grad_(True)
    mask = torch.ones(1, 2)
    loss, _, low, high = grpo.per_token_loss(logp, torch.zeros(1, 2), None, torch.tensor([1.0]), 0.2, 0.2, 0.0, mask,
                                             "sequence")
    assert loss.tolist()[0] == pytest.approx([-1.2, -1.2]) and high.all() and not low.any()
    loss.sum().backward()
    assert logp.grad.abs().sum() == 0
    token_loss, _, _, token_high = grpo.per_token_loss(logp, torch.zeros(1, 2), None, torch.tensor([1.0]), 0.2, 0.2,
                                                       0.0)
    assert token_high.tolist() == [[False, True]]  # per token, only the second is clipped


def test_clip_higher():
    _, (loss, _, _, high) = losses(epsilon_high=0.6)  # 1.5 < 1.6: no longer clipped
    assert loss[0, 1].item() == pytest.approx(-1.5)
    assert not high[0, 1]


def test_loss_types_by_hand():
    loss = torch.cat([EXPECTED, torch.tensor([[99.0], [1.1]])], 1)  # 99 sits under the mask
    # grpo: per completion (-1 - 1.2)/2 = -1.1 and (0.8 + 1 + 1.1)/3 = 0.9667, then their mean
    assert grpo.aggregate(loss, MASK, "grpo", 2, 5, 3).item() == pytest.approx((-1.1 + 2.9 / 3) / 2)
    # dapo: all five tokens weigh the same: 0.7 / 5
    assert grpo.aggregate(loss, MASK, "dapo", 2, 5, 3).item() == pytest.approx(0.14)
    # dr_grpo: 0.7 / (2 completions x 3 max_new_tokens)
    assert grpo.aggregate(loss, MASK, "dr_grpo", 2, 5, 3).item() == pytest.approx(0.7 / 6)
    # Split into two micro-batches, the parts add up to the whole (the normalisers are the batch's).
    for t in ("grpo", "dapo", "dr_grpo"):
        parts = sum(grpo.aggregate(loss[i : i + 1], MASK[i : i + 1], t, 2, 5, 3) for i in range(2))
        assert parts.item() == pytest.approx(grpo.aggregate(loss, MASK, t, 2, 5, 3).item())


def test_k3_kl_by_hand_and_zero_at_the_reference():
    logp = torch.log(RATIO)
    ref = logp.clone()
    ref[0, 0] += math.log(2)  # π_ref / π_θ = 2 -> k3 = 2 - ln 2 - 1
    _, (loss, kl, _, _) = losses(ref_logp=ref, beta=0.1)
    assert kl[0, 0].item() == pytest.approx(1 - math.log(2))
    assert kl.flatten()[1:].abs().max() < 1e-7
    assert loss[0, 0].item() == pytest.approx(-1.0 + 0.1 * (1 - math.log(2)))
    ref[0, 0] -= 2 * math.log(2)  # ratio 1/2: k3 = 0.5 + ln 2 - 1 > 0 as well
    assert grpo.per_token_loss(logp, logp, ref, ADV, 0.2, 0.2, 0.1)[1][0, 0].item() == pytest.approx(math.log(2) - 0.5)


def test_a_group_with_one_iteration_has_zero_loss_but_a_gradient():
    # With μ = 1 the ratio is exactly 1 and A is centred per group: the grpo loss is -mean(A) = 0, the gradient is not.
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    A = grpo.group_advantages(torch.tensor([1.0, 0.0]), 2)
    loss, *_ = grpo.per_token_loss(logp, logp.detach(), None, A, 0.2, 0.2, 0.0)
    total = grpo.aggregate(loss, torch.ones(2, 2), "grpo", 2, 4, 2)
    total.backward()
    assert total.item() == pytest.approx(0.0, abs=1e-7)
    assert logp.grad.abs().sum() > 0.5


# ----------------------------------------------------------------------------------------------------------------
# Rollouts: the stop token is trained, what follows it is not; log-probs at the right positions
def test_completion_logprobs_equal_a_direct_computation(tok, tiny_model_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rt = C.Runtime(torch.device("cpu"), torch.float32)
    eos = tok.eos_token_id
    prompts, completions = [[5, 6, 7], [8]], [[20, 21, eos], [22, eos]]
    P, Pm = C.pad(prompts, tok.pad_token_id, side="left")
    Y, Ym = C.pad(completions, tok.pad_token_id)
    logp, ent = C.completion_logprobs(model, P, Pm, Y, Ym, rt, temperature=0.7, with_entropy=True)
    for i, (p, c) in enumerate(zip(prompts, completions)):  # each sequence alone, no padding at all
        logits = model(torch.tensor([p + c])).logits[0, len(p) - 1 : -1] / 0.7  # the logits that predict c
        direct = torch.log_softmax(logits, -1)
        assert logp[i, : len(c)].tolist() == pytest.approx(direct.gather(-1, torch.tensor(c)[:, None]).squeeze(-1).tolist(), abs=1e-5)
        assert ent[i, : len(c)].tolist() == pytest.approx((-(direct.exp() * direct).sum(-1)).tolist(), abs=1e-4)
    # μ = 1: the sampling policy's log-probs (a no-grad pass) equal the trained pass's, so every ratio is 1.
    with torch.no_grad():
        old, _ = C.completion_logprobs(model, P, Pm, Y, Ym, rt, temperature=0.7)
    assert torch.exp(logp - old)[Ym.bool()].tolist() == pytest.approx([1.0] * 5, abs=1e-6)
    # Same weights as the policy: the k3 KL to the reference is zero.
    _, kl, _, _ = grpo.per_token_loss(logp, old, old.clone(), torch.ones(2), 0.2, 0.2, 0.05)
    assert kl[Ym.bool()].abs().max() < 1e-6


# ----------------------------------------------------------------------------------------------------------------
# Rewards
def test_builtin_rewards_and_their_default_weights():
    texts = ["so \\boxed{7}", "so \\boxed{8}", "seven"]
    assert T.accuracy_reward(texts, ["7"] * 3) == [1.0, 0.0, 0.0]
    assert T.accuracy_reward(["\\boxed{\\pi/2}"] * 2, ["\\frac{\\pi}{2}"] * 2, grader="math_verify") == [1.0, 1.0]
    assert T.format_reward(texts) == [1.0, 1.0, 0.0]
    funcs = T.reward_functions("accuracy,format", "")
    assert [(n, w) for n, _, w in funcs] == [("accuracy", 1.0), ("format", 0.2)]  # r = 1[correct] + 0.2 1[format]


def test_dynamic_sampling_keeps_groups_whose_rewards_differ_first():
    # Four groups of G = 3 sampled for a batch of 2: groups 0 and 2 are flat (zero advantages).
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.2, 0.2, 0.2], [1.2, 0.0, 0.2]])
    assert grpo.zero_std(r).tolist() == [True, False, True, False]
    assert grpo.dynamic_sampling(r, 2) == [1, 3]
    assert grpo.dynamic_sampling(r, 3) == [1, 3, 0]  # short of varied groups: filled with flat ones in order
    assert grpo.group_advantages(r[0], 3).abs().max() == 0  # the assumption: a flat group teaches nothing


def test_a_reward_function_that_raises_scores_zero_and_is_counted():
    def picky(completions, **kw):
        if len(completions) > 1:
            raise RuntimeError("one at a time")
        if "x" in completions[0]:
            raise ValueError("no x")
        return [2.0]
    out, failed = T.call_reward(picky, "picky", 3, completions=["a", "x", "b"], answer=[None] * 3)
    assert (out, failed) == ([2.0, 0.0, 2.0], 1)
    nan_for_b = lambda completions, **kw: [1.0 if c == "a" else float("nan") for c in completions]  # noqa: E731
    assert T.call_reward(nan_for_b, "f", 2, completions=["a", "b"]) == ([1.0, 0.0], 1)
    # None: "does not apply to this completion" (as in TRL), 0 and not an error, even for every completion
    assert T.call_reward(lambda completions, **kw: [None, 3], "f", 2, completions=["a", "b"]) == ([0.0, 3.0], 0)
    assert T.call_reward(lambda completions, **kw: [None, None], "f", 2, completions=["a", "b"]) == ([0.0, 0.0], 0)


def test_a_reward_function_that_returns_no_list_or_nan_is_named_and_counted(tmp_path):
    calls = []

    def flaky(completions, **kw):  # nan in the batch call, a number when called alone
        calls.append(len(completions))
        return [float("nan") if len(completions) > 1 and c == "b" else 1.0 for c in completions]
    assert T.call_reward(flaky, "flaky", 2, completions=["a", "b"]) == ([1.0, 0.0], 1)
    assert calls == [2]  # not retried: the nan is that completion's error
    for value, kind in ((0.5, "float"), ({"a": 1.0}, "dict"), ((v for v in [1.0]), "generator"),
                        (torch.tensor(1.0), "Tensor"), (None, "NoneType")):
        with pytest.raises(E.UserError, match=f"reward function f returned a {kind}, not a list"):
            T.call_reward(lambda completions, **kw: value, "f", 1, completions=["a"])
    with pytest.raises(E.UserError, match=re.escape(f"--reward_funcs {tmp_path}/nope.py:fn: the "
                                                    f"file {tmp_path}/nope.py does not exist")):
        T.reward_functions(f"{tmp_path}/nope.py:fn", "")


def test_a_function_that_returns_none_for_a_whole_step_is_warned_once_and_counted(capsys):
    nothing = lambda completions, **kw: [None] * len(completions)  # noqa: E731
    rewards = T.Rewards([("nothing", nothing, 1.0)])
    cpu = C.Runtime(torch.device("cpu"), torch.float32)
    for step in range(2):
        r, failed, _ = rewards([{}] * 2, ["p"] * 2, ["a", "b"], [[1], [2]], [None] * 2, step, 2, cpu)
        assert r.tolist() == [[0.0], [0.0]] and failed == 0
    out = capsys.readouterr().out
    assert out.count("warning: reward function nothing returned None for every completion") == 1
    assert rewards.logged["rewards/nothing/all_none"] == [1.0, 1.0] and T.ALL_NONE["nothing"] == 2
    T.call_reward(lambda completions, **kw: [None, 1.0], "partly", 2, completions=["a", "b"])
    assert T.ALL_NONE["partly"] == 0  # None for some completions is "does not apply": no warning


def test_a_reward_function_that_hangs_is_stopped_counted_and_reported_while_slow(capsys):
    import signal
    import time

    def hangs(completions, **kw):  # hangs on "b", alone or in the batch, and swallows every Exception
        while "b" in completions:
            try:
                time.sleep(60)
            except Exception:
                pass
        return [1.0] * len(completions)
    assert T.call_reward(hangs, "hangs", 3, 0.4, completions=["a", "b", "c"]) == ([0.0] * 3, 3)  # not retried
    out = capsys.readouterr().out
    assert "reward function hangs is still running after 0.2 s (stopped at 0.4 s)" in out
    assert "warning: reward function hangs ran past --reward_timeout 0.4 s: its completions score 0" in out

    def spins(completions, **kw):  # a batch error, then a busy loop on "b" alone: only that one is lost
        if len(completions) > 1:
            raise ValueError("one at a time")
        while completions == ["b"]:
            pass
        return [2.0]
    rewards = T.Rewards([("spins", spins, 1.0)], timeout=2.0)  # ample for "a" and "c" on a busy machine
    cpu = C.Runtime(torch.device("cpu"), torch.float32)
    r, failed, _ = rewards([{}] * 3, ["p"] * 3, ["a", "b", "c"], [[1], [2], [3]], [None] * 3, 0, 1, cpu)
    assert r[:, 0].tolist() == [2.0, 0.0, 2.0] and failed == 1
    assert rewards.logged["rewards/spins/timeouts"] == [1]
    os.kill(os.getpid(), signal.SIGUSR1)  # a late watchdog signal, with no limit in force, does nothing
    # The keywords of call_reward are positional-only: dataset columns called `name` or `timeout` reach the function.
    assert T.call_reward(lambda completions, name, timeout, **kw: [float(name[0] + timeout[0])], "f", 1, 5,
                         completions=["a"], name=[1], timeout=[2]) == ([3.0], 0)


def test_any_real_number_is_a_reward_and_a_broken_function_stops_the_run():
    import numpy as np
    kinds = lambda completions, **kw: [np.float32(0.5), True, torch.tensor(2.0), 3][: len(completions)]  # noqa: E731
    assert T.call_reward(kinds, "kinds", 4, completions=list("abcd")) == ([0.5, 1.0, 2.0, 3.0], 0)
    with pytest.raises(E.UserError, match="reward function short returned 1 values for 2 completions"):
        T.call_reward(lambda completions, **kw: [1.0], "short", 2, completions=["a", "b"])

    def broken(completions, solution, **kw):  # a signature that does not fit: fails on everything
        return [1.0] * len(completions)
    with pytest.raises(E.UserError, match="reward function broken failed on every completion of a step, the first "
                                          "with TypeError: .*solution"):
        T.call_reward(broken, "broken", 2, completions=["a", "b"])


def test_a_group_prompt_computed_once_gives_the_same_logprobs_and_gradients(tok, tiny_model_dir):
    # group_size 2: each prompt goes through the model once and its KV cache is repeated for both completions.
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rt = C.Runtime(torch.device("cpu"), torch.float32)
    eos = tok.eos_token_id
    P, Pm = C.pad([[5, 6, 7], [5, 6, 7], [8, 9], [8, 9]], tok.pad_token_id, side="left")
    Y, Ym = C.pad([[20, 21, eos], [22, eos], [23, 24, 25, 26], [27]], tok.pad_token_id)
    grads = []
    for g in (1, 2):
        logp, ent = C.completion_logprobs(model, P, Pm, Y, Ym, rt, 0.7, with_entropy=True, group_size=g)
        (logp * Ym).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad()
        if g == 1:
            plain, plain_ent = logp.detach(), ent
    torch.testing.assert_close(logp.detach()[Ym.bool()], plain[Ym.bool()], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent[Ym.bool()], plain_ent[Ym.bool()], atol=1e-4, rtol=1e-4)
    for a, b in zip(*grads):  # the prompt's gradient comes back through the repeated cache, summed over the group
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# End to end on a tiny model
def grpo_run(model, out, tmp_path, *extra, nproc=1):
    data = write_jsonl(tmp_path / "pets.jsonl", [PETS] * 16)
    rules = tmp_path / "rules.py"
    rules.write_text(RULES)
    args = ["--model", model, "--output_dir", out, "--dataset", data, "--eval_size", "0", "--precision", "fp32",
            "--batch_size", "2", "--num_generations", "8", "--max_new_tokens", "12", "--learning_rate", "2e-3",
            "--reward_funcs", f"{rules}:cats", "--save_every", "0", "--no_dynamic_sampling", *map(str, extra)]
    return run_script("grpo.py", *args, nproc=nproc)


def test_reward_rises_on_a_tiny_model(pets_model, tmp_path):
    out = str(tmp_path / "out")
    ok(grpo_run(pets_model, out, tmp_path, "--max_steps", "30", "--beta", "0"))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 31))
    for key in ("loss", "reward", "reward_std", "rewards/cats/mean", "frac_reward_zero_std", "kl", "entropy",
                "clip_ratio/low_mean", "clip_ratio/high_mean", "completions/mean_length", "completions/clipped_ratio",
                "grad_norm", "time/generate_s", "time/train_s", "reward_errors", "sampling/sampling_logp_difference/mean",
                "sampling/importance_sampling_ratio/mean"):
        assert all(key in r for r in rows), key
    # fp32: the sampler drew every token with the log-prob the training forward computes for it, every step.
    assert max(r["sampling/sampling_logp_difference/max"] for r in rows) < 1e-4
    # and so the sampler correction is 1 (to rounding): it changes nothing where sampler and trainer agree
    for key in ("min", "mean", "max"):
        assert all(abs(r[f"sampling/importance_sampling_ratio/{key}"] - 1) < 1e-4 for r in rows)
    first, last = (sum(r["reward"] for r in rows[s]) / 5 for s in (slice(0, 5), slice(-5, None)))
    assert last > first + 0.2, [round(r["reward"], 2) for r in rows]
    # μ = 1, β = 0, grpo loss: the printed loss is 0 (up to rounding) on every step, while the policy learns.
    assert max(abs(r["loss"]) for r in rows) < 1e-5
    assert all(r["kl"] == 0 for r in rows)


def test_clip_ratio_and_loss_are_logged_over_every_iteration(pets_model, tmp_path):
    """With μ > 1 the first update's ratio is exactly 1, so only later updates can clip: the clip counts must come
    from every update (before this was fixed they were taken on the first and always read 0)."""
    out = str(tmp_path / "out")
    ok(grpo_run(pets_model, out, tmp_path, "--max_steps", "3", "--num_iterations", "3", "--epsilon", "0.01",
                "--epsilon_high", "0.01", "--beta", "0"))
    rows = read_metrics(out)
    assert any(r["clip_ratio/low_mean"] + r["clip_ratio/high_mean"] > 0 for r in rows)
    assert any(abs(r["loss"]) > 1e-6 for r in rows)  # the first update's loss is 0 (ratio 1, zero-mean advantages)


def test_gspo_run_learns_and_clips_whole_sequences(pets_model, tmp_path):
    # GSPO with the paper's clip ranges and μ = 2: the second update sees ratios away from 1 and clips sequences.
    out = str(tmp_path / "out")
    ok(grpo_run(pets_model, out, tmp_path, "--max_steps", "30", "--beta", "0", "--num_iterations", "2",
                "--importance_sampling_level", "sequence", "--epsilon", "3e-4", "--epsilon_high", "4e-4"))
    rows = read_metrics(out)
    first, last = (sum(r["reward"] for r in rows[s]) / 5 for s in (slice(0, 5), slice(-5, None)))
    assert last > first + 0.2, [round(r["reward"], 2) for r in rows]
    assert max(r["clip_ratio/low_mean"] + r["clip_ratio/high_mean"] for r in rows) > 0.1


def test_reward_errors_are_counted_and_the_run_goes_on(pets_model, tmp_path):
    out = str(tmp_path / "out")
    ok(grpo_run(pets_model, out, tmp_path, "--max_steps", "2", "--reward_funcs",
                f"{tmp_path / 'rules.py'}:cats,{tmp_path / 'rules.py'}:picky", "--reward_weights", "1,0.5"))
    for r in read_metrics(out):  # picky gives 1 to the completions that do not start with dog, fails on the rest
        assert r["reward_errors"] == round(16 * (1 - r["rewards/picky/mean"]))
        assert r["reward"] == pytest.approx(r["rewards/cats/mean"] + 0.5 * r["rewards/picky/mean"], abs=1e-6)


def test_builtin_task_with_reference_iterations_and_held_out_accuracy(tiny_model_dir, tmp_path):
    out = str(tmp_path / "out")
    proc = ok(run_script("grpo.py", "--model", tiny_model_dir, "--output_dir", out, "--precision", "fp32",
                         "--max_steps", "2", "--batch_size", "2", "--num_generations", "2", "--max_new_tokens", "4",
                         "--eval_size", "3", "--eval_every", "1", "--num_iterations", "2", "--loss_type", "dapo",
                         "--scale_rewards", "batch", "--mask_truncated_completions", "--epsilon_high", "0.28"))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all("eval/accuracy" in r and "eval/boxed" in r for r in rows)
    assert rows[1]["completions/clipped_ratio"] == 1.0  # 4 tokens never reach the stop token of a random model
    assert "before training: eval/boxed=0" in proc.stdout and "saved the model" in proc.stdout
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 64


def test_reward_model_as_the_only_reward(pets_model, tmp_path):
    from transformers import AutoModelForSequenceClassification
    rm_dir = str(tmp_path / "rm")
    AutoModelForSequenceClassification.from_pretrained(pets_model, num_labels=1).save_pretrained(rm_dir)
    M.load_tokenizer(pets_model).save_pretrained(rm_dir)
    out = str(tmp_path / "out")
    ok(grpo_run(pets_model, out, tmp_path, "--max_steps", "1", "--reward_funcs", "", "--reward_model", rm_dir,
                "--reward_model_weight", "2"))
    row = read_metrics(out)[0]
    assert row["reward"] == pytest.approx(2 * row["rewards/reward_model/mean"], abs=1e-5)
    assert row["reward_std"] > 0  # a fresh head still scores completions differently


def test_resume_reproduces_an_uninterrupted_run(pets_model, tmp_path):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    ok(grpo_run(pets_model, full, tmp_path, "--max_steps", "4"))
    ok(grpo_run(pets_model, split, tmp_path, "--max_steps", "4", "--stop_after_steps", "2"))
    assert [r["step"] for r in read_metrics(split)] == [1, 2]
    ok(grpo_run(pets_model, split, tmp_path, "--max_steps", "4", "--resume"))
    a, b = read_metrics(full), read_metrics(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["reward"] == y["reward"] and x["kl"] == pytest.approx(y["kl"], abs=1e-6)


MIXED_RULES = """
def cats_on_pets(prompts, completions, **kw):  # the cats reward on the pets prompt, 0 on every other prompt
    return [sum(w == "cat" for w in c.split()) / max(1, len(c.split())) if "pets" in p else 0.0
            for p, c in zip(prompts, completions)]
"""


def dynamic_run(model, out, tmp_path, *extra):
    data = write_jsonl(tmp_path / "mixed.jsonl", [PETS, {"prompt": "Say nothing.", "answer": "-"}] * 8)
    rules = tmp_path / "mixed_rules.py"
    rules.write_text(MIXED_RULES)
    return run_script("grpo.py", "--model", model, "--output_dir", out, "--dataset", data, "--eval_size", "0",
                      "--precision", "fp32", "--batch_size", "2", "--num_generations", "4", "--max_new_tokens", "8",
                      "--reward_funcs", f"{rules}:cats_on_pets", "--save_every", "0", "--dynamic_sampling",
                      *map(str, extra))


def test_dynamic_sampling_trains_only_on_groups_whose_rewards_differ(pets_model, tmp_path):
    """Half the prompts score 0 whatever the completion (a flat group, zero advantages); the pets prompt's groups
    differ. Dynamic sampling replaces the flat groups with freshly sampled ones."""
    out = str(tmp_path / "out")
    ok(dynamic_run(pets_model, out, tmp_path, "--max_steps", "6", "--max_resample_rounds", "12"))
    rows = read_metrics(out)
    assert all(r["dynamic_sampling/frac_trained_zero_std"] == 0 for r in rows)
    assert any(r["dynamic_sampling/rounds"] > 0 for r in rows)
    for r in rows:  # the reward metrics cover every group sampled: 2 per round
        n = 2 * (1 + r["dynamic_sampling/rounds"])
        assert r["frac_reward_zero_std"] * n == pytest.approx(round(r["frac_reward_zero_std"] * n))
        assert r["frac_reward_zero_std"] > 0 or r["dynamic_sampling/rounds"] == 0
    out0 = str(tmp_path / "out0")  # no extra round: the flat groups are trained on, as without the option
    ok(dynamic_run(pets_model, out0, tmp_path, "--max_steps", "3", "--max_resample_rounds", "0"))
    for r in read_metrics(out0):
        assert r["dynamic_sampling/rounds"] == 0
        assert r["dynamic_sampling/frac_trained_zero_std"] == r["frac_reward_zero_std"]


def test_resume_with_dynamic_sampling_reads_on_where_it_stopped(pets_model, tmp_path):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    ok(dynamic_run(pets_model, full, tmp_path, "--max_steps", "4"))
    ok(dynamic_run(pets_model, split, tmp_path, "--max_steps", "4", "--stop_after_steps", "2"))
    ok(dynamic_run(pets_model, split, tmp_path, "--max_steps", "4", "--resume"))
    a, b = read_metrics(full), read_metrics(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["reward"] == y["reward"] and x["dynamic_sampling/rounds"] == y["dynamic_sampling/rounds"]


def test_torchrun_two_processes(pets_model, tmp_path):
    out = str(tmp_path / "out")
    ok(grpo_run(pets_model, out, tmp_path, "--max_steps", "2", nproc=2))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    # 2 prompts x 8 completions over the two ranks: every reward is a share of six-ish words, the mean over all 16
    assert all(0 <= r["reward"] <= 1 and r["frac_reward_zero_std"] in (0, 0.5, 1) for r in rows)
    assert os.path.isfile(os.path.join(out, "model.safetensors"))


# ----------------------------------------------------------------------------------------------------------------
def main_raises(monkeypatch, argv, match):
    monkeypatch.setattr(sys, "argv", ["grpo.py", "--precision", "fp32", "--eval_size", "0", *map(str, argv)])
    with pytest.raises(E.UserError, match=match):
        grpo.main()


def test_bad_inputs(monkeypatch, tiny_model_dir, tmp_path):
    base = ["--model", tiny_model_dir, "--output_dir", str(tmp_path / "out")]
    main_raises(monkeypatch, [*base, "--loss_type", "ppo"], "--loss_type ppo: choose grpo, dapo or dr_grpo")
    main_raises(monkeypatch, [*base, "--scale_rewards", "max"], "--scale_rewards max")
    main_raises(monkeypatch, [*base, "--num_generations", "1"], "--num_generations 1: must be at least 2")
    main_raises(monkeypatch, [*base, "--temperature", "0"], "--temperature 0.0: must be above 0")
    main_raises(monkeypatch, [*base, "--reward_funcs", "nope.py:f"], "--reward_funcs nope.py:f: the file nope.py does not exist")
    main_raises(monkeypatch, [*base, "--reward_funcs", "nope"], "--reward_funcs nope: not a built-in")
    (tmp_path / "r.py").write_text("def f(completions, **kw):\n    return [0.0] * len(completions)\n")
    main_raises(monkeypatch, [*base, "--reward_funcs", f"{tmp_path / 'r.py'}:g"], "has no function 'g'")
    main_raises(monkeypatch, [*base, "--reward_weights", "1"], "--reward_weights has 1 numbers for 2")
    main_raises(monkeypatch, [*base, "--reward_funcs", ""], "no reward: give --reward_funcs, --reward_model")
    no_answer = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "hi"}] * 4)
    main_raises(monkeypatch, [*base, "--dataset", no_answer], "has no `answer` .* column for the accuracy reward")
    cols = write_jsonl(tmp_path / "c.jsonl", [{"text": "hi"}] * 4)
    main_raises(monkeypatch, [*base, "--dataset", cols], r"columns found: \['text'\]; expected a `prompt` or `question`")
    main_raises(monkeypatch, [*base, "--dataset", write_jsonl(tmp_path / "l.jsonl", [PETS] * 4),
                              "--max_prompt_length", "3"], "every prompt of .* is longer than --max_prompt_length 3")
