"""grpo.py's estimators (issue 28): RLOO's and REINFORCE++'s advantages, the k1/k2/k3 KL estimators and the
bias-corrected k3 by hand, what each KL term's gradient is in expectation (by sampling), the entropy mask by hand,
tiny-model runs that learn with them, and their bad inputs."""
import math

import pytest
import torch

import grpo
from conftest import ok, read_metrics
from test_grpo import grpo_run, main_raises

R = torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0])  # two groups of G = 4, the second all equal


# ----------------------------------------------------------------------------------------------------------------
# Advantages
def test_rloo_is_the_reward_minus_the_mean_of_the_others():
    a = grpo.advantages_of(R, 4, "rloo")
    # r_0 = 1, the other three (0, 1, 0) average 1/3: A = 2/3; r_1 = 0 against (1, 1, 0): -2/3; no scaling
    assert a.tolist() == pytest.approx([2 / 3, -2 / 3, 2 / 3, -2 / 3, 0, 0, 0, 0])
    assert grpo.advantages_of(R, 4, "grpo").tolist() == grpo.group_advantages(R, 4).tolist()


def test_reinforce_pp_whitens_over_the_batch_with_no_group_baseline():
    s = math.sqrt(0.6875) + 1e-4  # the eight rewards: mean 1.25, population variance 0.6875
    a = grpo.advantages_of(R, 4, "reinforce_pp")
    assert a.tolist() == pytest.approx([(x - 1.25) / s for x in R.tolist()])
    assert a[4:].abs().min() > 0.5  # an all-equal group is NOT zero: why it refuses dynamic sampling
    # the baseline form: r - group mean = (±0.5, 0 x 4), mean 0, population std sqrt(1/8); the equal group is 0
    b = grpo.advantages_of(R, 4, "reinforce_pp_baseline")
    assert b.tolist() == pytest.approx([0.5 / (math.sqrt(0.125) + 1e-4), -0.5 / (math.sqrt(0.125) + 1e-4)] * 2
                                       + [0.0] * 4)


def test_batch_statistics_over_ranks_are_those_of_the_whole_batch():
    # Two ranks: this one holds R, the other R2 (one group); reduce adds the other's moments of what is whitened
    # (its rewards, or its rewards minus their group mean), as common.all_reduce sums them over ranks.
    R2 = torch.tensor([3.0, 0.0, 0.0, 0.0])
    for estimator, scale, x2 in (("reinforce_pp", "group", R2), ("reinforce_pp_baseline", "group", R2 - R2.mean()),
                                 ("grpo", "batch", R2)):
        other = torch.stack([x2.sum(), (x2**2).sum(), torch.tensor(4.0)])
        whole = grpo.advantages_of(torch.cat([R, R2]), 4, estimator, scale)
        split = grpo.advantages_of(R, 4, estimator, scale, reduce=lambda s: s + other)
        assert split.tolist() == pytest.approx(whole[:8].tolist(), abs=1e-6), estimator


# ----------------------------------------------------------------------------------------------------------------
# KL estimators
def test_kl_estimators_by_hand_and_zero_at_the_reference():
    ln2 = math.log(2)
    logp = torch.tensor([[ln2, -ln2, 0.3]])  # x = log π_θ/π_ref = ln 2, -ln 2, 0
    ref = torch.tensor([[0.0, 0.0, 0.3]])
    assert grpo.kl_estimate(logp, ref, "k1").tolist()[0] == pytest.approx([ln2, -ln2, 0])
    assert grpo.kl_estimate(logp, ref, "k2").tolist()[0] == pytest.approx([ln2**2 / 2, ln2**2 / 2, 0])
    # k3 = e^-x - 1 + x: 1/2 - 1 + ln 2 and 2 - 1 - ln 2, both > 0
    assert grpo.kl_estimate(logp, ref, "k3").tolist()[0] == pytest.approx([ln2 - 0.5, 1 - ln2, 0])
    # through the loss: A = 0 leaves β KL; the bias correction multiplies by π_θ/π_old = e^(logp - old)
    old = logp - torch.tensor([[0.0, ln2, 0.0]])  # ratio 2 at the second token
    for est, kl in (("k1", [ln2, -ln2, 0]), ("k2", [ln2**2 / 2] * 2 + [0])):
        loss, k, _, _ = grpo.per_token_loss(logp, logp, ref, torch.zeros(1), 0.2, 0.2, 0.5, kl_estimator=est)
        assert loss.tolist()[0] == pytest.approx([0.5 * v for v in kl]) and k.tolist()[0] == pytest.approx(kl)
    loss, k, _, _ = grpo.per_token_loss(logp, old, ref, torch.zeros(1), 0.2, 0.2, 0.5, bias_correction=True)
    assert k.tolist()[0] == pytest.approx([ln2 - 0.5, 2 * (1 - ln2), 0])


def kl_gradients(estimator, bias_correction=False, sampler_shift=None, n=200000):
    """At one position with 5 tokens: the exact gradients of KL(π_θ || π_ref) and KL(π_ref || π_θ), and the mean
    gradient of the estimator's KL term on n tokens drawn from π_θ (or, with sampler_shift, from π_old ≠ π_θ)."""
    torch.manual_seed(0)
    z = torch.randn(5, requires_grad=True)
    ref = torch.log_softmax(torch.randn(5), -1)
    logp_all = torch.log_softmax(z, -1)
    reverse = torch.autograd.grad((logp_all.exp() * (logp_all - ref)).sum(), z, retain_graph=True)[0]
    forward = torch.autograd.grad((ref.exp() * (ref - logp_all)).sum(), z, retain_graph=True)[0]
    old_all = logp_all.detach() if sampler_shift is None else torch.log_softmax(z.detach() + sampler_shift, -1)
    y = torch.multinomial(old_all.exp(), n, replacement=True)
    logp = logp_all[y][None]
    loss, *_ = grpo.per_token_loss(logp, old_all[y][None], ref[y][None], torch.zeros(1), 0.2, 0.2, 1.0,
                                   kl_estimator=estimator, bias_correction=bias_correction)
    estimate = torch.autograd.grad(loss.mean(), z)[0]
    return estimate, reverse, forward


def test_what_each_kl_term_pulls_towards_in_expectation():
    estimate, reverse, forward = kl_gradients("k2")
    assert (reverse - forward).abs().max() > 0.1  # the two KLs' gradients differ here, so the checks can fail
    assert torch.allclose(estimate, reverse, atol=0.02), (estimate, reverse)  # k2: the reverse KL's gradient
    estimate, _, _ = kl_gradients("k3")
    assert torch.allclose(estimate, forward, atol=0.02), (estimate, forward)  # k3: the forward KL's
    assert (estimate - reverse).abs().max() > 0.05
    estimate, _, _ = kl_gradients("k1")
    assert estimate.abs().max() < 0.02, estimate  # k1: no pull at all
    estimate, _, _ = kl_gradients("k3", bias_correction=True)  # on-policy, the ratio 1 but not its gradient
    assert torch.allclose(estimate, reverse, atol=0.02), (estimate, reverse)


def test_the_bias_corrected_k3_stays_the_reverse_kl_gradient_off_policy():
    # tokens drawn from π_old ≠ π_θ (μ > 1, or a stale sampler): the ratio-weighted k3 still estimates ∇ KL(π_θ ||
    # π_ref); k2, right on-policy, no longer does
    shift = torch.tensor([0.8, -0.8, 0.4, -0.4, 0.0])
    estimate, reverse, _ = kl_gradients("k3", bias_correction=True, sampler_shift=shift)
    assert torch.allclose(estimate, reverse, atol=0.02), (estimate, reverse)
    estimate, reverse, _ = kl_gradients("k2", sampler_shift=shift)
    assert (estimate - reverse).abs().max() > 0.05, (estimate, reverse)


# ----------------------------------------------------------------------------------------------------------------
# Entropy masking
def test_high_entropy_mask_by_hand():
    entropy = torch.tensor([[0.1, 0.5, 0.9, 9.0], [0.3, 0.7, 0.2, 0.4]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # the 9.0 is padding
    # the seven tokens' entropies sorted: 0.1 0.2 0.3 0.4 0.5 0.7 0.9; the 0.8-quantile (linear, as torch.quantile):
    # position 0.8 x 6 = 4.8 -> 0.5 + 0.8 (0.7 - 0.5) = 0.66: the tokens at 0.9 and 0.7 are kept, padding never
    keep = grpo.high_entropy_mask(entropy, mask, 0.2)
    assert keep.tolist() == [[0, 0, 1, 0], [0, 1, 0, 0]]
    assert grpo.high_entropy_mask(entropy, mask, 1.0).tolist() == mask.tolist()  # ρ = 1: every token
    assert grpo.high_entropy_mask(entropy, torch.zeros(2, 4), 0.2).sum() == 0
    # in the loss: the masked tokens give no policy term but stay in the normaliser (TRL's choice), and the KL
    # term stays on every token
    logp, ref = torch.zeros(2, 4), torch.full((2, 4), -0.5)
    A = torch.tensor([1.0, -1.0])
    loss, kl, _, _ = grpo.per_token_loss(logp, logp, ref, A, 0.2, 0.2, 0.1, weights=keep)
    k3 = math.exp(-0.5) - 1 + 0.5
    assert loss.flatten().tolist() == pytest.approx([0.1 * k3, 0.1 * k3, -1 + 0.1 * k3, 0.1 * k3,
                                                     0.1 * k3, 1 + 0.1 * k3, 0.1 * k3, 0.1 * k3])
    total = grpo.aggregate(loss, mask, "grpo", 2, 7, 4)
    assert total.item() == pytest.approx(((-1 + 3 * 0.1 * k3) / 3 + (1 + 4 * 0.1 * k3) / 4) / 2)


# ----------------------------------------------------------------------------------------------------------------
# Runs that learn, and bad inputs
@pytest.mark.parametrize("extra", [
    ("--advantage_estimator", "rloo", "--kl_estimator", "k2", "--beta", "0.01"),
    ("--advantage_estimator", "reinforce_pp", "--top_entropy_quantile", "0.5", "--use_bias_correction_kl",
     "--beta", "0.01", "--num_iterations", "2")])
def test_the_estimators_learn_on_a_tiny_model(pets_model, tmp_path, extra):
    out = str(tmp_path / "out")
    ok(grpo_run(pets_model, out, tmp_path, "--max_steps", "30", *extra))
    rows = read_metrics(out)
    first, last = (sum(r["reward"] for r in rows[s]) / 5 for s in (slice(0, 5), slice(-5, None)))
    assert last > first + 0.2, [round(r["reward"], 2) for r in rows]


def test_bad_estimator_inputs(monkeypatch, tiny_model_dir, tmp_path):
    base = ["--model", tiny_model_dir, "--output_dir", str(tmp_path / "out")]
    main_raises(monkeypatch, [*base, "--advantage_estimator", "ppo"],
                "--advantage_estimator ppo: choose grpo, rloo, reinforce_pp, reinforce_pp_baseline")
    main_raises(monkeypatch, [*base, "--advantage_estimator", "rloo", "--scale_rewards", "batch"],
                "--scale_rewards applies to --advantage_estimator grpo only")
    main_raises(monkeypatch, [*base, "--advantage_estimator", "reinforce_pp"], "add --no_dynamic_sampling")
    main_raises(monkeypatch, [*base, "--kl_estimator", "k4"], "--kl_estimator k4: choose k1, k2 or k3")
    main_raises(monkeypatch, [*base, "--kl_estimator", "k2", "--use_bias_correction_kl"],
                "--use_bias_correction_kl corrects the k3 estimator")
    main_raises(monkeypatch, [*base, "--top_entropy_quantile", "1.5"], "--top_entropy_quantile 1.5: must be")
