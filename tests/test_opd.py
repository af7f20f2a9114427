"""opd.py: the divergences against hand-computed values and their limits, zero signal when student == teacher, a
run where a tiny student moves towards a tiny teacher, off-policy steps, and a teacher with another vocabulary."""
import json
import math
import os
import sys

import pytest
import torch

import common as C
from plumbing import errors as E
import opd
from conftest import PETS, ok, read_metrics, run_script, write_jsonl

# Two distributions over 2 tokens: student P_θ = (0.5, 0.5), teacher P_T = (0.9, 0.1), as logits.
S = torch.log(torch.tensor([0.5, 0.5]))
T = torch.log(torch.tensor([0.9, 0.1]))
FORWARD = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # KL(P_T || P_θ) = 0.3681
REVERSE = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(P_θ || P_T) = 0.5108


def test_forward_and_reverse_kl_by_hand():
    assert opd.generalized_jsd(S, T, 0.0).item() == pytest.approx(FORWARD, abs=1e-6)
    assert opd.generalized_jsd(S, T, 1.0).item() == pytest.approx(REVERSE, abs=1e-6)


def test_jsd_at_half_by_hand():
    # M = (0.7, 0.3): 0.5 KL(P_T || M) + 0.5 KL(P_θ || M)
    kl_t = 0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3)
    kl_s = 0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)
    assert opd.generalized_jsd(S, T, 0.5).item() == pytest.approx(0.5 * kl_t + 0.5 * kl_s, abs=1e-6)
    assert opd.generalized_jsd(S, T, 0.5).item() == pytest.approx(0.10175, abs=1e-5)


def test_jsd_limits_are_the_two_kls():
    # JSD_β ≈ β KL(P_T || P_θ) as β -> 0 and ≈ (1-β) KL(P_θ || P_T) as β -> 1.
    for eps in (1e-2, 1e-3):
        assert opd.generalized_jsd(S, T, eps).item() / eps == pytest.approx(FORWARD, rel=5 * eps)
        assert opd.generalized_jsd(S, T, 1 - eps).item() / eps == pytest.approx(REVERSE, rel=5 * eps)


def test_temperature_and_shapes():
    logits_s, logits_t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    out = opd.generalized_jsd(logits_s, logits_t, 0.5, temperature=2.0)
    assert out.shape == (2, 3) and (out >= 0).all()
    assert torch.allclose(out, opd.generalized_jsd(logits_s / 2, logits_t / 2, 0.5))


def test_zero_signal_when_student_is_teacher():
    logits = torch.randn(2, 3, 7)
    for beta in (0.0, 0.3, 1.0):
        assert opd.generalized_jsd(logits, logits.clone(), beta).abs().max() < 1e-6
    logp = torch.log_softmax(logits, -1)[..., 0].requires_grad_(True)
    loss = opd.reverse_kl_pg_loss(logp, logp.detach().clone(), torch.ones(2, 3), 6)
    loss.backward()
    assert loss.item() == 0 and logp.grad.abs().max() == 0  # reward 0 on every token: no gradient at all


def test_reverse_kl_pg_loss_by_hand():
    # tokens with log π_θ = (-1, -2), log π_T = (-1.5, -1): rewards (-0.5, +1)
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss = opd.reverse_kl_pg_loss(logp, torch.tensor([[-1.5, -1.0]]), torch.ones(1, 2), 2)
    assert loss.item() == pytest.approx(-(-0.5 * -1.0 + 1.0 * -2.0) / 2)
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([0.25, -0.5])  # -r_t / tokens: push up where the teacher agrees more


def test_policy_gradient_estimates_the_reverse_kl_gradient():
    # Over many samples of the student, E[∇ loss] = ∇ KL(P_θ || P_T) (single position, 5 tokens).
    torch.manual_seed(0)
    z = torch.randn(5, requires_grad=True)
    t = torch.log_softmax(torch.randn(5), -1)
    exact = torch.autograd.grad((torch.softmax(z, -1) * (torch.log_softmax(z, -1) - t)).sum(), z)[0]
    y = torch.multinomial(torch.softmax(z, -1).detach(), 200000, replacement=True)
    logp = torch.log_softmax(z, -1)[y][None]
    estimate = torch.autograd.grad(opd.reverse_kl_pg_loss(logp, t[y][None], torch.ones(1, len(y)), len(y)), z)[0]
    assert torch.allclose(estimate, exact, atol=0.02), (estimate, exact)


def test_weighted_samples_of_another_sampler_estimate_the_same_gradient():
    # Tokens drawn from q (a sampler that is not the student), each weighted by w = π_θ / q (untruncated): the
    # estimate is again ∇ KL(P_θ || P_T); without the weights it is not.
    torch.manual_seed(0)
    z = torch.randn(5, requires_grad=True)
    t = torch.log_softmax(torch.randn(5), -1)
    exact = torch.autograd.grad((torch.softmax(z, -1) * (torch.log_softmax(z, -1) - t)).sum(), z)[0]
    q = torch.log_softmax(z.detach() + torch.tensor([0.8, -0.8, 0.4, -0.4, 0.0]), -1)
    y = torch.multinomial(q.exp(), 200000, replacement=True)
    logp = torch.log_softmax(z, -1)[y][None]
    ones = torch.ones(1, len(y))
    w = C.sampler_weights(logp.detach(), q[y][None], ones, "token_truncate", clip_max=1e9)
    weighted = torch.autograd.grad(opd.reverse_kl_pg_loss(logp, t[y][None], ones, len(y), w), z, retain_graph=True)[0]
    plain = torch.autograd.grad(opd.reverse_kl_pg_loss(logp, t[y][None], ones, len(y)), z)[0]
    assert torch.allclose(weighted, exact, atol=0.02), (weighted, exact)
    assert (plain - exact).abs().max() > 0.05, (plain, exact)


# ----------------------------------------------------------------------------------------------------------------
def opd_run(student, teacher, out, tmp_path, *extra, nproc=1):
    data = write_jsonl(tmp_path / "pets.jsonl", [{**PETS, "completion": "cat dog cat dog cat dog"}] * 16)
    return run_script("opd.py", "--model", student, "--teacher", teacher, "--output_dir", out, "--dataset", data,
                      "--eval_size", "0", "--precision", "fp32", "--batch_size", "16", "--max_new_tokens", "8",
                      "--learning_rate", "3e-3", "--save_every", "0", *map(str, extra), nproc=nproc)


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd"])
def test_student_moves_towards_the_teacher(pets_model, cats_model, tmp_path, loss):
    # The student says cat or dog at random; the teacher only cat. Sampled dogs are where the KL is.
    out = str(tmp_path / "out")
    ok(opd_run(pets_model, cats_model, out, tmp_path, "--max_steps", "12", "--loss", loss))
    rows = read_metrics(out)
    kl = [r["kl/student_teacher"] for r in rows]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert sum(kl[-3:]) / 3 < 0.5 * sum(kl[:3]) / 3, [round(k, 2) for k in kl]


def test_off_policy_steps_and_torchrun(pets_model, cats_model, tmp_path, tok):
    out = str(tmp_path / "out")
    ok(opd_run(pets_model, cats_model, out, tmp_path, "--max_steps", "4", "--lmbda", "0.5", "--log_completions_every",
               "1", nproc=2))
    rows = read_metrics(out)
    assert {r["on_policy"] for r in rows} == {0, 1}  # both kinds of step occurred (seeded)
    answer = len(tok("cat dog cat dog cat dog", add_special_tokens=False)["input_ids"]) + 1  # and EOS
    assert all(r["completions/mean_length"] == answer for r in rows if not r["on_policy"])  # the dataset's answer
    samples = [json.loads(l) for l in open(os.path.join(out, "completions.jsonl"))]  # both ranks' 8 each, per step
    assert [s["step"] for s in samples] == [step for step in range(1, 5) for _ in range(16)]
    for r in rows:
        mine = [s for s in samples if s["step"] == r["step"]]
        assert {s["on_policy"] for s in mine} == {r["on_policy"]}
        assert r["on_policy"] or {s["completion"] for s in mine} == {"cat dog cat dog cat dog"}
        assert all(s["prompt"][-1]["content"].startswith(PETS["prompt"]) and math.isfinite(s["kl_per_token"])
                   for s in mine)


def main_raises(monkeypatch, argv, match):
    monkeypatch.setattr(sys, "argv", ["opd.py", "--precision", "fp32", "--eval_size", "0", *map(str, argv)])
    with pytest.raises(E.UserError, match=match):
        opd.main()


def test_bad_inputs(monkeypatch, tiny_model_dir, tmp_path, tok):
    base = ["--model", tiny_model_dir, "--output_dir", str(tmp_path / "out")]
    main_raises(monkeypatch, base, "--teacher is required")
    main_raises(monkeypatch, [*base, "--teacher", tiny_model_dir, "--loss", "fkl"], "--loss fkl: choose")
    main_raises(monkeypatch, [*base, "--teacher", tiny_model_dir, "--beta", "2"], "must be in \\[0, 1\\]")
    # A teacher whose tokenizer maps tokens to other ids is refused (TRL #3028).
    other = tmp_path / "other"
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(other)
    tok.save_pretrained(other)
    import json
    data = json.load(open(other / "tokenizer.json"))
    vocab = data["model"]["vocab"]
    a, b = "cat", "dog"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    json.dump(data, open(other / "tokenizer.json", "w"))
    main_raises(monkeypatch, [*base, "--teacher", str(other)], "different vocabulary")
    no_answer = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "hi", "answer": "1"}] * 4)
    main_raises(monkeypatch, [*base, "--teacher", tiny_model_dir, "--dataset", no_answer, "--lmbda", "1"],
                "needs rows that end in an assistant answer")
