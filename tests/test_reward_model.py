"""reward_model.py: the Bradley-Terry loss by hand, the score read at the last real token under either padding,
a run that separates separable pairs, the saved model scoring through common.score_responses, bad input."""
import math
import sys

import pytest
import torch

import common as C
from plumbing import errors as E
from plumbing import formats as F
import reward_model as RM
from conftest import ok, read_metrics, run_script, write_jsonl


def test_bradley_terry_loss_by_hand():
    rc, rr = torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1.0])
    # -log σ(1 - 0) = log(1 + e^{-1}) = 0.3132617;  -log σ(-1 - 1) = log(1 + e^{2}) = 2.1269280
    assert RM.bradley_terry_loss(rc, rr).tolist() == pytest.approx([0.3132617, 2.1269280], abs=1e-6)
    # with a margin of 0.5 on the first pair: -log σ(1 - 0 - 0.5) = 0.4740770
    assert RM.bradley_terry_loss(rc, rr, torch.tensor([0.5, 0.0]))[0].item() == pytest.approx(0.4740770, abs=1e-6)
    # centering adds c (r_w + r_l)²: 0.3132617 + 0.01 * 1
    assert RM.bradley_terry_loss(rc, rr, center_coef=0.01)[0].item() == pytest.approx(0.3232617, abs=1e-6)


@pytest.fixture(scope="module")
def tiny_rm(tiny_model_dir, tok):
    from transformers import AutoModelForSequenceClassification
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).eval()
    model.config.pad_token_id = tok.pad_token_id
    return model


def test_score_read_at_last_real_token_under_left_and_right_padding(tiny_rm, tok):
    msgs = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend"}],
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]]
    seqs = [C.tokenize_conversation(tok, m, 1024)[0] for m in msgs]
    assert seqs[1][-2] == tok.eos_token_id  # the rows end in "<|im_end|>\n": EOS == PAD sits inside the row
    with torch.no_grad():
        alone = [C.sequence_scores(tiny_rm, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).item() for s in seqs]
        for side in ("right", "left"):
            x, mask = C.pad(seqs, tok.pad_token_id, side=side)
            assert C.sequence_scores(tiny_rm, x, mask).tolist() == pytest.approx(alone, abs=1e-5), side
        # the score is the head applied at the last token, not at a pooled or earlier position
        h = tiny_rm.base_model(torch.tensor([seqs[1]])).last_hidden_state[0, -1]
        assert tiny_rm.score(h).item() == pytest.approx(alone[1], abs=1e-5)


def test_score_responses_is_batched_and_padding_free(tiny_rm, tok):
    rt = C.Runtime(torch.device("cpu"), torch.float32)
    prompts = [[{"role": "user", "content": f"Question {i}" + "?" * i}] for i in range(5)]
    responses = ["a", "bb bb", "c", "a much longer response here", "e"]
    batched = C.score_responses(tiny_rm, tok, prompts, responses, rt, batch_size=5)
    single = torch.cat([C.score_responses(tiny_rm, tok, [p], [r], rt) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_pair_rewards_with_the_prompt_computed_once_equal_each_sequence_alone(tiny_model_dir, tok, monkeypatch):
    # Each pair's shared prompt goes through the model once (the default); the scores, and the gradient of their
    # sum, are those of the whole sequences (the path under gradient checkpointing).
    from transformers import AutoModelForSequenceClassification
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    rt = C.Runtime(torch.device("cpu"), torch.float32)
    rows = SEPARABLE[:2] + [{"prompt": "A much longer prompt, so that the prompts are padded.", "chosen": "same",
                             "rejected": "same!"}]
    pairs = [F.tokenize_pair(tok, *F.preference_pair(r), 1024) for r in rows]
    scorer, out = RM.Scorer(model), {}
    for shared in (True, False):
        monkeypatch.setattr(C, "can_share_prefix", lambda m: shared)
        chosen, rejected = RM.pair_rewards(scorer, pairs, rt, tok.pad_token_id)
        (chosen.sum() - 2 * rejected.sum()).backward()
        out[shared] = torch.cat([chosen, rejected]).detach(), torch.cat([p.grad.flatten() for p in model.parameters()])
        model.zero_grad()
    with torch.no_grad():
        alone = [C.sequence_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).item()
                 for s in [c[0] for c, _ in pairs] + [r[0] for _, r in pairs]]
    assert out[True][0].tolist() == pytest.approx(alone, abs=1e-5)
    torch.testing.assert_close(out[True][1], out[False][1], atol=5e-5, rtol=1e-4)


SEPARABLE = [{"prompt": f"Reply to message number {i}.", "chosen": f"Thank you kindly for message {i}!",
              "rejected": f"Go away, message {i}."} for i in range(48)]


def reward_model(tiny_model_dir, out, data, *extra):
    return run_script("reward_model.py", "--model", tiny_model_dir, "--output_dir", out, "--dataset", data,
                      "--precision", "fp32", *extra)


def test_reward_model_separates_separable_pairs(tiny_model_dir, tok, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", SEPARABLE)
    out = str(tmp_path / "out")
    ok(reward_model(tiny_model_dir, out, data, "--eval_size", "16", "--max_steps", "20", "--batch_size", "8",
                    "--micro_batch_size", "4", "--learning_rate", "1e-3", "--warmup_steps", "0", "--eval_every", "10"))
    rows = read_metrics(out)
    assert rows[0]["step"] == 0 and rows[-1]["step"] == 20
    assert rows[-1]["eval_accuracy"] >= 0.95 and rows[-1]["eval_margin"] > rows[0]["eval_margin"]
    for key in ("loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected"):
        assert key in rows[-1]
    # The result loads with from_pretrained and scores (prompt, response) pairs as ppo.py and grpo.py will.
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    rt = C.Runtime(torch.device("cpu"), torch.float32)
    held = SEPARABLE[:16]
    good = C.score_responses(model, tok, [[{"role": "user", "content": r["prompt"]}] for r in held], [r["chosen"] for r in held], rt)
    bad = C.score_responses(model, tok, [[{"role": "user", "content": r["prompt"]}] for r in held], [r["rejected"] for r in held], rt)
    assert (good > bad).float().mean() >= 0.95


def test_margin_column_is_used(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [dict(r, margin=3.0) for r in SEPARABLE[:8]])
    out = str(tmp_path / "out")
    ok(reward_model(tiny_model_dir, out, data, "--eval_size", "0", "--max_steps", "1", "--batch_size", "8",
                    "--micro_batch_size", "8"))
    row = read_metrics(out)[0]
    # with rewards near 0 the loss is about -log σ(-3) = 3.05, not ln 2
    assert row["loss"] == pytest.approx(-math.log(1 / (1 + math.exp(3 - row["margin"]))), rel=1e-3)


def test_bad_inputs(monkeypatch, tiny_model_dir, tmp_path):
    def raises(argv, match):
        monkeypatch.setattr(sys, "argv", ["reward_model.py", "--precision", "fp32", "--model", tiny_model_dir,
                                          "--output_dir", str(tmp_path / "o"), *argv])
        with pytest.raises(E.UserError, match=match):
            RM.main()
    raises(["--dataset", write_jsonl(tmp_path / "c.jsonl", [{"text": "x"}] * 4), "--eval_size", "0"],
           r"columns found: \['text'\]; expected `chosen` and `rejected`")
    same = [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"}] * 4
    raises(["--dataset", write_jsonl(tmp_path / "s.jsonl", same), "--eval_size", "0"],
           "no preference pair of .* is left after filtering")
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    raises(["--dataset", str(empty)], "is empty")
