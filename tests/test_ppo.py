"""ppo.py: GAE against a plain backward loop, whitening within the mask, the clipped losses by hand, the score at
the last real token, values at the right positions, a zero KL penalty at the reference, and tiny-model runs whose
score rises under a rule reward, with a reward model, and under torchrun."""
import math
import os
import sys

import pytest
import torch

import common as C
from plumbing import errors as E
from plumbing import models as M
import ppo
from conftest import PETS, RULES, ok, read_metrics, run_script, write_jsonl


def gae_loop(rewards, values, lengths, gamma, lam):
    """The textbook backward recursion, one response at a time."""
    out = torch.zeros_like(rewards)
    for i, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[i, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[i, t].item() + gamma * next_v - values[i, t].item()
            last = delta + gamma * lam * last
            out[i, t] = last
    return out


def test_gae_matches_a_backward_loop_with_masks_of_different_lengths():
    torch.manual_seed(0)
    lengths = [5, 2, 1, 4]
    mask = torch.tensor([[1.0] * n + [0.0] * (5 - n) for n in lengths])
    rewards, values = torch.randn(4, 5) * mask, torch.randn(4, 5)  # values on padding are garbage: must not matter
    for gamma, lam in ((1.0, 0.95), (0.9, 0.8), (1.0, 1.0)):
        adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
        assert torch.allclose(adv, gae_loop(rewards, values, lengths, gamma, lam), atol=1e-5)
        assert torch.allclose(ret, (adv + values) * mask, atol=1e-6)
        assert (adv[mask == 0] == 0).all()


def test_gae_by_hand():
    # one response of 2 tokens: r = (0, 1), V = (0.5, 0.25), γ = 1, λ = 0.5
    # δ_1 = 1 - 0.25 = 0.75;  δ_0 = 0 + 0.25 - 0.5 = -0.25;  A_1 = 0.75, A_0 = -0.25 + 0.5 x 0.75 = 0.125
    adv, ret = ppo.gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.25]]), torch.ones(1, 2), 1.0, 0.5)
    assert adv.flatten().tolist() == pytest.approx([0.125, 0.75])
    assert ret.flatten().tolist() == pytest.approx([0.625, 1.0])


def test_whitening_uses_only_the_real_tokens():
    x = torch.tensor([[1.0, 2.0, 99.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    w = ppo.masked_whiten(x, mask)
    real = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = (real - 3.0) / real.std()  # unbiased std of the five real values, sqrt(2.5)
    assert w[mask.bool()].tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert w[0, 2] == 0
    kept = ppo.masked_whiten(x, mask, shift_mean=False)  # reward whitening keeps the mean
    assert kept[mask.bool()].tolist() == pytest.approx((expected + 3.0).tolist(), abs=1e-5)


def test_clipped_value_loss_by_hand():
    old, ret, mask = torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    v = torch.tensor([[1.5, 1.1, 7.0]], requires_grad=True)
    loss, clipfrac = ppo.value_loss(v, old, ret, mask, 0.2)
    # token 0: V = 1.5, clipped 1.2: max((1.5-2)², (1.2-2)²) = 0.64 (clipped one is worse: counted as clipped)
    # token 1: V = 1.1 inside the clip: max(1.21, 1.21) = 1.21
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21) / 2)
    assert clipfrac.item() == pytest.approx(0.5)
    loss.backward()
    assert v.grad.flatten().tolist() == pytest.approx([0.0, 0.5 * 2 * 1.1 / 2, 0.0])  # no gradient where clipped


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    loss, clipfrac, approxkl = ppo.policy_loss(logp, old, adv, torch.ones(1, 3), 0.2)
    # max(-Aρ, -A clip(ρ)): (-1.5 vs -1.2) -> -1.2 clipped;  (-0.5 vs -0.8) -> -0.5;  (2 vs 2) -> 2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.0) / 3)
    assert clipfrac.item() == pytest.approx(1 / 3)
    assert approxkl.item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3)


def test_the_sampler_correction_weighs_each_tokens_policy_term():
    # the same three tokens; weights (0.5, 2, 3) multiply each token's clipped term: -1.2 x 0.5, -0.5 x 2, 2 x 3
    old, adv = torch.zeros(1, 3), torch.tensor([[1.0, 1.0, -2.0]])
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))
    loss, clipfrac, _ = ppo.policy_loss(logp, old, adv, torch.ones(1, 3), 0.2, torch.tensor([[0.5, 2.0, 3.0]]))
    assert loss.item() == pytest.approx((-0.6 - 1.0 + 6.0) / 3) and clipfrac.item() == pytest.approx(1 / 3)
    # one weight per response (the sequence modes), and the padding of a shorter response left out
    loss, _, _ = ppo.policy_loss(logp, old, adv, torch.tensor([[1.0, 1.0, 0.0]]), 0.2, torch.tensor([[2.0]]))
    assert loss.item() == pytest.approx(2 * (-1.2 - 0.5) / 2)


def test_score_at_the_last_real_token_and_no_kl_penalty_at_the_reference(tok):
    # Responses as generation returns them: the second stopped early (its EOS is its last real token).
    eos = tok.eos_token_id
    Y, mask = C.pad([[11, 12, 13, eos], [14, eos], [15, 16, 17, 18]], tok.pad_token_id)
    logp = -torch.rand(3, 4)
    rewards, kl = ppo.per_token_rewards(torch.tensor([1.0, 2.0, 3.0]), logp, logp.clone(), mask.float(), 0.05)
    assert kl.abs().sum() == 0  # policy == reference: the penalty is exactly zero
    assert rewards.tolist() == [[0, 0, 0, 1.0], [0, 2.0, 0, 0], [0, 0, 0, 3.0]]
    # With a KL, -β (log π - log π_ref) on every real token and nothing on padding.
    rewards, kl = ppo.per_token_rewards(torch.zeros(3), logp, logp - 0.5, mask.float(), 0.1)
    assert rewards[mask.bool()].tolist() == pytest.approx([-0.05] * 10)
    assert (rewards[~mask.bool()] == 0).all()
    # k3 (TRL's kl_estimator="k3"): e^-x - 1 + x at x = 0.5, on every real token, never negative
    rewards, kl = ppo.per_token_rewards(torch.zeros(3), logp, logp - 0.5, mask.float(), 0.1, "k3")
    assert kl[mask.bool()].tolist() == pytest.approx([math.exp(-0.5) - 0.5] * 10)
    assert rewards[mask.bool()].tolist() == pytest.approx([-0.1 * (math.exp(-0.5) - 0.5)] * 10)
    assert ppo.per_token_rewards(torch.zeros(3), logp, logp + 0.5, mask.float(), 0.1, "k3")[1].min() >= 0


def test_values_are_read_before_each_response_token_under_left_padding(tok, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification
    torch.manual_seed(0)
    value = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).eval()
    rt = C.Runtime(torch.device("cpu"), torch.float32)
    prompts, responses = [[5, 6, 7], [8]], [[20, 21, tok.eos_token_id], [22, tok.eos_token_id]]
    P, Pm = C.pad(prompts, tok.pad_token_id, side="left")
    Y, Ym = C.pad(responses, tok.pad_token_id)
    with torch.no_grad():
        v = ppo.token_values(value, P, Pm, Y, Ym, rt)
        for i, (p, r) in enumerate(zip(prompts, responses)):  # alone, unpadded: the states p + r[:t], t = 0..len-1
            h = value.base_model(torch.tensor([p + r])).last_hidden_state[0, len(p) - 1 : -1]
            assert v[i, : len(r)].tolist() == pytest.approx(value.score(h).squeeze(-1).tolist(), abs=1e-5)


def test_adaptive_kl_controller():
    ctl = ppo.AdaptiveKL(0.1, 6.0, 100)
    ctl.update(12.0, 10)  # KL twice the target: error clipped to +0.2, x 10/100
    assert ctl.value == pytest.approx(0.1 * 1.02)
    fixed = ppo.AdaptiveKL(0.1, None, 100)
    fixed.update(12.0, 10)
    assert fixed.value == 0.1


# ----------------------------------------------------------------------------------------------------------------
def ppo_run(model, out, tmp_path, *extra, nproc=1):
    data = write_jsonl(tmp_path / "pets.jsonl", [PETS] * 16)
    rules = tmp_path / "rules.py"
    rules.write_text(RULES)
    args = ["--model", model, "--output_dir", out, "--dataset", data, "--eval_size", "0", "--precision", "fp32",
            "--batch_size", "16", "--max_new_tokens", "12", "--learning_rate", "2e-3", "--temperature", "1.0",
            "--reward", f"{rules}:cats", "--save_every", "0", *map(str, extra)]
    return run_script("ppo.py", *args, nproc=nproc)


def test_score_rises_on_a_tiny_model(pets_model, tmp_path):
    out = str(tmp_path / "out")
    ok(ppo_run(pets_model, out, tmp_path, "--max_steps", "25", "--kl_coef", "0.01"))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 26))
    for key in ("objective/scores", "objective/kl", "objective/entropy", "objective/rlhf_reward", "policy/approxkl",
                "policy/clipfrac", "loss/policy", "loss/value", "val/clipfrac", "val/explained_variance",
                "eos_fraction", "completions/mean_length"):
        assert all(key in r for r in rows), key
    assert rows[0]["objective/kl"] == 0  # the first batch is sampled by the reference itself
    first, last = (sum(r["objective/scores"] for r in rows[s]) / 5 for s in (slice(0, 5), slice(-5, None)))
    assert last > first + 0.2, [round(r["objective/scores"], 2) for r in rows]


def test_value_warmup_leaves_the_policy_alone_and_the_value_model_its_own_rate(pets_model, tmp_path):
    out = str(tmp_path / "out")
    ok(ppo_run(pets_model, out, tmp_path, "--max_steps", "4", "--value_warmup_steps", "2",
               "--value_learning_rate", "1e-2"))
    rows = read_metrics(out)
    # Steps 1 and 2 train only the value model, so steps 1-3 sample from the reference itself: zero KL.
    assert [r["objective/kl"] for r in rows[:3]] == [0, 0, 0] and rows[3]["objective/kl"] > 0
    state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [2e-3, 1e-2]  # policy, value


def test_reward_model_value_from_it_verifiable_eval_and_torchrun(pets_model, tmp_path):
    # A reward model with a fresh head (as reward_model.py writes one) scores; the value model starts from it.
    from transformers import AutoModelForSequenceClassification
    rm_dir = str(tmp_path / "rm")
    AutoModelForSequenceClassification.from_pretrained(pets_model, num_labels=1).save_pretrained(rm_dir)
    M.load_tokenizer(pets_model).save_pretrained(rm_dir)
    out = str(tmp_path / "out")
    ok(run_script("ppo.py", "--model", pets_model, "--reward_model", rm_dir, "--output_dir", out, "--precision", "fp32",
                  "--max_steps", "2", "--batch_size", "4", "--max_new_tokens", "6", "--eval_size", "2", "--eval_every", "1",
                  "--num_mini_batches", "2", "--micro_batch_size", "1", "--target_kl", "1.0", "--whiten_rewards", nproc=2))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2] and all("eval/accuracy" in r and "eval/score" in r for r in rows)
    assert rows[2]["kl_coef"] != 0.05  # the adaptive controller moved β


def main_raises(monkeypatch, argv, match):
    monkeypatch.setattr(sys, "argv", ["ppo.py", "--precision", "fp32", "--eval_size", "0", *map(str, argv)])
    with pytest.raises(E.UserError, match=match):
        ppo.main()


def test_bad_inputs(monkeypatch, tiny_model_dir, tmp_path):
    base = ["--model", tiny_model_dir, "--output_dir", str(tmp_path / "out")]
    main_raises(monkeypatch, base, "--reward model needs --reward_model PATH")
    main_raises(monkeypatch, [*base, "--reward", "nope"], "--reward nope: choose model")
    main_raises(monkeypatch, [*base, "--kl_estimator", "k2"], "--kl_estimator k2: choose k1 or k3")
    main_raises(monkeypatch, [*base, "--reward", "verifiable", "--dataset", write_jsonl(tmp_path / "q.jsonl", [{"prompt": "hi"}] * 4)],
                "has no `answer` .* column for --reward verifiable")
    main_raises(monkeypatch, [*base, "--reward", "verifiable", "--batch_size", "6", "--num_mini_batches", "4"],
                "must be a multiple of ranks x --num_mini_batches")
    main_raises(monkeypatch, [*base, "--reward_model", str(tmp_path / "missing")], "missing")
