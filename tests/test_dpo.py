"""dpo.py: each loss against hand-computed values, ln 2 at the first step, response log-probs against a direct
computation, a run whose margin grows until every pair is ranked right, data formats and bad input."""
import math
import os
import sys

import pytest
import torch

import common as C
from plumbing import errors as E
from plumbing import formats as F
import dpo
from conftest import ok, read_metrics, run_script, write_jsonl

PI, REF = torch.tensor([1.0]), torch.tensor([0.5])  # policy and reference log-ratios: h = 0.5


def test_sigmoid_loss_by_hand():
    # -log σ(β h) = log(1 + e^{-0.05}) for β = 0.1, h = 0.5
    assert dpo.sigmoid_loss(PI, REF, 0.1).item() == pytest.approx(math.log(1 + math.exp(-0.05)), abs=1e-6)
    assert dpo.sigmoid_loss(PI, REF, 0.1).item() == pytest.approx(0.6684596, abs=1e-6)


def test_cdpo_loss_by_hand():
    # -(0.9) log σ(0.05) - 0.1 log σ(-0.05) = 0.9 * 0.6684596 + 0.1 * 0.7184596
    assert dpo.sigmoid_loss(PI, REF, 0.1, label_smoothing=0.1).item() == pytest.approx(0.6734596, abs=1e-6)


def test_robust_loss_by_hand():
    # [-(0.9) log σ(0.05) + 0.1 log σ(-0.05)] / 0.8 = (0.6016137 - 0.0718460) / 0.8
    assert dpo.robust_loss(PI, REF, 0.1, 0.1).item() == pytest.approx(0.6622096, abs=1e-6)
    # with ε = 0 it is plain DPO
    assert dpo.robust_loss(PI, REF, 0.1, 0.0).item() == pytest.approx(dpo.sigmoid_loss(PI, REF, 0.1).item())


def test_ipo_loss_by_hand():
    # (h - 1/(2β))² = (0.5 - 5)² = 20.25
    assert dpo.ipo_loss(PI, REF, 0.1).item() == pytest.approx(20.25)


def test_simpo_loss_by_hand():
    # -log σ(β Δ̄ - γ) = -log σ(2 * 0.2 - 0.5) = log(1 + e^{0.1})
    assert dpo.simpo_loss(torch.tensor([0.2]), 2.0, 0.5).item() == pytest.approx(math.log(1 + math.exp(0.1)), abs=1e-6)


def test_orpo_loss_by_hand():
    # P(y_w) = 0.5: odds 1, log odds 0; P(y_l) = 0.2: odds 0.25. Log odds ratio ln 4;
    # loss = -ln 0.5 - λ log σ(ln 4) = ln 2 + λ ln(5/4).
    losses, ratio = dpo.orpo_loss(torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.2])), 0.1)
    assert ratio.item() == pytest.approx(math.log(4), abs=1e-6)
    assert losses.item() == pytest.approx(math.log(2) + 0.1 * math.log(1.25), abs=1e-6)
    # A response the model is all but sure of (P = 1 - 1e-8) keeps the loss finite.
    assert torch.isfinite(dpo.orpo_loss(torch.tensor([-1e-8]), torch.tensor([-2.0]), 0.1)[0]).all()


def test_losses_fall_as_the_margin_grows():
    h = torch.linspace(-2, 2, 9)
    for losses in (dpo.sigmoid_loss(h, 0 * h, 0.5), dpo.robust_loss(h, 0 * h, 0.5, 0.2), dpo.simpo_loss(h, 2.0, 0.5)):
        assert (losses[1:] < losses[:-1]).all()


PAIRS = [{"prompt": f"Is {w} a fruit? Answer yes or no.", "chosen": "yes" if f else "no", "rejected": "no" if f else "yes"}
         for w, f in [("apple", 1), ("carrot", 0), ("banana", 1), ("potato", 0)]]


@pytest.mark.parametrize("shared", [True, False])
def test_response_logps_equal_a_direct_computation(tok, tiny_model_dir, shared, monkeypatch):
    # shared: each pair's prompt goes through the model once (the default); not: whole sequences (as under
    # gradient checkpointing). Both give the log-probs of each sequence computed alone.
    from transformers import AutoModelForCausalLM
    monkeypatch.setattr(C, "can_share_prefix", lambda model: shared)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rt = C.Runtime(torch.device("cpu"), torch.float32)
    pairs = [F.tokenize_pair(tok, *F.preference_pair(r), 1024) for r in PAIRS[:3]]
    pairs[1] = F.tokenize_pair(tok, [{"role": "user", "content": "A much longer prompt, to force padding in the batch."}],
                               [{"role": "assistant", "content": "ok then"}], [{"role": "assistant", "content": "no"}], 1024)
    with torch.no_grad():
        logps, lengths = dpo.response_logps(model, pairs, rt, tok.pad_token_id)
        for j, (ids, labels) in enumerate([c for c, _ in pairs] + [r for _, r in pairs]):
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)  # one sequence, no padding
            direct = sum(lp[t - 1, ids[t]].item() for t in range(1, len(ids)) if labels[t] != C.IGNORE_INDEX)
            assert logps[j].item() == pytest.approx(direct, rel=1e-5)
            assert lengths[j].item() == sum(l != C.IGNORE_INDEX for l in labels)
    # The gradient of the summed log-probs, through the shared prompt's cache, is the whole sequences' gradient.
    dpo.response_logps(model, pairs, rt, tok.pad_token_id)[0].sum().backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    monkeypatch.setattr(C, "can_share_prefix", lambda model: False)
    model.zero_grad()
    dpo.response_logps(model, pairs, rt, tok.pad_token_id)[0].sum().backward()
    torch.testing.assert_close(grad, torch.cat([p.grad.flatten() for p in model.parameters()]), atol=5e-5, rtol=1e-4)
    # responses only: the prompt tokens are never scored
    (ids, labels), _ = pairs[0]
    assert tok.decode([t for t, l in zip(ids, labels) if l != C.IGNORE_INDEX]) == "yes<|im_end|>"


def dpo_run(tiny_model_dir, out, *extra, nproc=1):
    return run_script("dpo.py", "--model", tiny_model_dir, "--output_dir", out, "--precision", "fp32",
                      "--eval_generations", "0", "--warmup_steps", "0", "--save_every", "0", *extra, nproc=nproc)


def pairs_run(tiny_model_dir, tmp_path, out, *extra, nproc=1):
    """dpo_run on the four PAIRS, all of them each step, at --learning_rate 1e-3, no held-out pairs."""
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    return dpo_run(tiny_model_dir, out, "--dataset", data, "--eval_size", "0", "--batch_size", "4",
                   "--learning_rate", "1e-3", *extra, nproc=nproc)


def test_first_loss_is_ln2_then_margin_grows_to_full_accuracy(tiny_model_dir, tmp_path):
    out = str(tmp_path / "out")
    proc = ok(pairs_run(tiny_model_dir, tmp_path, out, "--max_steps", "15", "--micro_batch_size", "2",
                        "--beta", "0.5"))
    assert "4 pairs kept, 0 dropped" in proc.stdout
    rows = read_metrics(out)
    # The policy equals the reference before the first update: every log-ratio is 0, the loss is exactly ln 2.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    margins = [r["rewards/margins"] for r in rows]
    assert margins[-1] > margins[5] > 0.1, margins
    assert rows[-1]["rewards/accuracies"] == 1.0 and rows[-1]["loss"] < 0.5


def test_ref_log_probs_on_the_fly_match_precomputed(tiny_model_dir, tmp_path):
    runs = []
    for flag in ("true", "false"):
        out = str(tmp_path / flag)
        ok(pairs_run(tiny_model_dir, tmp_path, out, "--max_steps", "3", "--micro_batch_size", "4",
                     "--precompute_ref_log_probs", flag))
        runs.append(read_metrics(out))
    for a, b in zip(*runs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)


@pytest.mark.parametrize("loss_type", ["ipo", "robust", "simpo", "orpo"])
def test_variants_lower_their_loss_and_widen_the_margin(tiny_model_dir, tmp_path, loss_type):
    out = str(tmp_path / "out")
    extra = ["--label_smoothing", "0.1"] if loss_type == "robust" else []
    proc = ok(pairs_run(tiny_model_dir, tmp_path, out, "--max_steps", "12", "--micro_batch_size", "4",
                        "--loss_type", loss_type, *extra))
    rows = read_metrics(out)
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]
    if loss_type in dpo.REFERENCE_FREE:  # no reference model is loaded or evaluated
        assert "reference log-probs" not in proc.stdout
    if loss_type == "orpo":  # both of its terms improve: the chosen answers' NLL and the log odds ratio
        assert rows[-1]["nll_loss"] < rows[0]["nll_loss"] and rows[-1]["log_odds_ratio"] > rows[0]["log_odds_ratio"]


def test_builtin_task_eval_metrics(tiny_model_dir, tmp_path):
    out = str(tmp_path / "out")
    ok(dpo_run(tiny_model_dir, out, "--max_steps", "2", "--batch_size", "4", "--micro_batch_size", "2", "--eval_size", "4",
               "--eval_every", "1", "--eval_generations", "4", "--max_new_tokens", "8"))
    rows = read_metrics(out)
    assert rows[0]["step"] == 0 and rows[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("eval_rewards/accuracies", "eval_rewards/margins", "eval/boxed", "eval/accuracy"):
        assert key in rows[-1]
    assert os.path.isfile(os.path.join(out, "model.safetensors"))


def test_torchrun_two_processes_match_one(tiny_model_dir, tmp_path):
    common = ["--max_steps", "2", "--micro_batch_size", "1"]
    ok(pairs_run(tiny_model_dir, tmp_path, str(tmp_path / "one"), *common))
    ok(pairs_run(tiny_model_dir, tmp_path, str(tmp_path / "two"), *common, nproc=2))
    for a, b in zip(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)


# ----------------------------------------------------------------------------------------------------------------
def main_raises(monkeypatch, argv, match):
    monkeypatch.setattr(sys, "argv", ["dpo.py", "--precision", "fp32", "--eval_generations", "0", *map(str, argv)])
    with pytest.raises(E.UserError, match=match):
        dpo.main()


def test_bad_inputs(monkeypatch, tiny_model_dir, tmp_path):
    out = str(tmp_path / "out")
    base = ["--model", tiny_model_dir, "--output_dir", out, "--eval_size", "0"]
    cols = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "q", "good": "a", "bad": "b"}] * 4)
    main_raises(monkeypatch, [*base, "--dataset", cols],
                r"columns found: \['bad', 'good', 'prompt'\]; expected `chosen` and `rejected`")
    same = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}] * 4)
    main_raises(monkeypatch, [*base, "--dataset", same], "no preference pair of .* is left after filtering")
    main_raises(monkeypatch, [*base, "--dataset", write_jsonl(tmp_path / "p.jsonl", PAIRS), "--max_length", "10"],
                "no preference pair of .* is left after filtering")
    main_raises(monkeypatch, [*base, "--loss_type", "cpo"], "--loss_type cpo: use sigmoid, robust, ipo, simpo, orpo or kto")
    main_raises(monkeypatch, [*base, "--loss_type", "robust"], "above 0 for --loss_type robust")


def test_reference_with_another_vocabulary_is_refused(monkeypatch, tiny_model_dir, tmp_path):
    import shutil
    from transformers import AutoTokenizer
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    t = AutoTokenizer.from_pretrained(str(other))
    t.add_tokens(["<new_token>"])
    t.save_pretrained(str(other))
    main_raises(monkeypatch, ["--model", tiny_model_dir, "--ref_model", str(other), "--output_dir", str(tmp_path / "o"),
                              "--eval_size", "0", "--dataset", write_jsonl(tmp_path / "p.jsonl", PAIRS)],
                "has a different vocabulary from the policy's")


# ----------------------------------------------------------------------------------------------------------------
# KTO: single completions labelled desirable or not
def test_kto_loss_by_hand():
    # β = 0.1, z_ref = 0.5. Desirable, r = 2: 1 - σ(0.1 (2 - 0.5)) = 1 - σ(0.15) = 0.462570;
    # undesirable, r = 1, λ_U = 1.5: 1.5 (1 - σ(0.1 (0.5 - 1))) = 1.5 (1 - σ(-0.05)) = 0.768747.
    losses = dpo.kto_loss(torch.tensor([2.0, 1.0]), torch.tensor([True, False]), torch.tensor(0.5), 0.1, 1.0, 1.5)
    assert losses.tolist() == pytest.approx([0.462570, 0.768747], abs=1e-6)


def test_kto_reference_point_is_the_mismatched_mean_clamped_at_zero(tok, tiny_model_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rt = C.Runtime(torch.device("cpu"), torch.float32)
    rows = [{"prompt": p["prompt"], "completion": p["chosen"] if k % 2 else p["rejected"], "label": bool(k % 2)}
            for k, p in enumerate(PAIRS)]
    items = [dpo.Unpaired(rows).encode(i, tok, 256) for i in range(4)]
    assert [x[2] for x in items] == [False, True, False, True]
    args = dpo.Args(loss_type="kto", beta=0.1)
    with torch.no_grad():
        logps, _ = dpo.response_logps(model, items, rt, tok.pad_token_id)
        lp, lp_kl = logps[:4], logps[4:]
        # r_kl = log π - log π_ref of the mismatched completions: all -1 (mean below 0: z_ref clamped to 0), or all 1.5.
        for r_kl, z in ((-1.0, 0.0), (1.5, 1.5)):
            ref = torch.stack([torch.zeros(4), lp_kl - r_kl], 1)
            loss, sums = dpo.batch_metrics(model, items, ref, args, rt, tok.pad_token_id)
            want = dpo.kto_loss(lp, torch.tensor([x[2] for x in items]), torch.tensor(z), 0.1).sum()
            assert loss.item() == pytest.approx(want.item(), abs=1e-5)
            assert sums["kl"].item() == pytest.approx(4 * z, abs=1e-5)


def test_kto_run_raises_desirable_and_lowers_undesirable(tiny_model_dir, tmp_path):
    rows = [{"prompt": p["prompt"], "completion": c, "label": c == p["chosen"]}
            for p in PAIRS for c in (p["chosen"], p["rejected"])]
    data = write_jsonl(tmp_path / "u.jsonl", rows)
    out = str(tmp_path / "out")
    proc = ok(dpo_run(tiny_model_dir, out, "--dataset", data, "--eval_size", "0", "--max_steps", "20", "--batch_size",
                      "8", "--learning_rate", "1e-2", "--loss_type", "kto"))
    assert "8 examples kept (4 desirable)" in proc.stdout
    rows = read_metrics(out)
    assert rows[0]["rewards/chosen"] == pytest.approx(0, abs=1e-6)  # the policy is the reference at first
    # "yes" is desirable after "apple" and undesirable after "carrot": the log-ratios must part by prompt.
    assert rows[-1]["rewards/chosen"] > 0.2 and rows[-1]["rewards/rejected"] < -0.1, rows[-1]
    assert rows[-1]["loss"] < rows[0]["loss"] and all(r["kl"] >= 0 for r in rows)
    # The built-in preference pairs read as unpaired rows, with held-out metrics.
    out = str(tmp_path / "builtin")
    ok(dpo_run(tiny_model_dir, out, "--loss_type", "kto", "--max_steps", "1", "--batch_size", "4", "--eval_size", "4"))
    last = read_metrics(out)[-1]
    assert {"eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_kl"} <= set(last)


def test_kto_bad_inputs(tok):
    with pytest.raises(E.UserError, match="`label` 'maybe': use true"):
        dpo.Unpaired([{"prompt": "p", "completion": "c", "label": "maybe"}] * 3)
    with pytest.raises(E.UserError, match="need `prompt`, `completion` and `label`"):
        dpo.Unpaired([{"text": "p", "label": True}] * 3)
    with pytest.raises(E.UserError, match="at least 3 examples"):
        dpo.Unpaired([{"prompt": "p", "completion": "c", "label": True}] * 2)
