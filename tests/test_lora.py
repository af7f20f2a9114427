"""LoRA and QLoRA through peft, in every script: only the adapters (and a new score head) train, the reference of
DPO, GRPO and PPO is the base model with the adapter off, a LoRA run learns what it is shown, the output is the merged
model (it loads with plain from_pretrained and generates) with the adapter beside it, checkpoints hold the adapter
and resume exactly, and bad LoRA settings are refused."""
import importlib.util
import json
import math
import os
import sys
from contextlib import nullcontext

import pytest
import torch

import common as C
from plumbing import args as A
from plumbing import errors as E
from plumbing import models as M
from conftest import PETS, RULES, ok, read_metrics, run_script, write_jsonl

DOGS = [{"messages": [{"role": "user", "content": PETS["prompt"]}, {"role": "assistant", "content": "dog " * 5 + "dog"}]}]


def lora_sft(model, out, tmp_path, *extra):
    data = write_jsonl(tmp_path / "dogs.jsonl", DOGS * 16)
    return run_script("sft.py", "--model", model, "--output_dir", out, "--dataset", data, "--precision", "fp32",
                      "--eval_generations", "0", "--eval_size", "0", "--warmup_steps", "0", "--batch_size", "4",
                      "--lora_r", "8", "--lora_alpha", "16", "--learning_rate", "1e-2", *map(str, extra))


def greedy(model_dir):
    rt = C.setup(0, "cpu", "fp32")
    return C.generate(M.load_model(model_dir, rt), M.load_tokenizer(model_dir), [[{"role": "user", "content":
                      PETS["prompt"]}]], rt, 10)[1][0]


def test_only_the_adapters_train_and_the_run_learns(pets_model, tmp_path):
    # The pets model says cat or dog at random (a random tiny model's frozen output layer could not be moved by
    # adapters on the layers before it); LoRA alone teaches it to say dog six times.
    from transformers import AutoModelForCausalLM
    out = str(tmp_path / "out")
    ok(lora_sft(pets_model, out, tmp_path, "--max_steps", "30", "--save_every", "0"))
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert losses[-1] < 0.5 * losses[0], [round(l, 3) for l in losses]
    base = AutoModelForCausalLM.from_pretrained(pets_model).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()  # plain transformers: the merged model
    assert merged.keys() == base.keys()
    for name, w in base.items():  # every linear layer of the decoder moved; embeddings and norms did not
        assert (not torch.equal(w, merged[name])) == name.endswith("proj.weight"), name
    adapter = json.load(open(os.path.join(out, "adapter", "adapter_config.json")))
    assert (adapter["r"], adapter["lora_alpha"]) == (8, 16)
    assert greedy(pets_model) != "dog dog dog dog dog dog" and greedy(out) == "dog dog dog dog dog dog"


def test_a_lora_checkpoint_holds_the_adapter_and_resumes_exactly(pets_model, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    ok(lora_sft(pets_model, full, tmp_path, "--max_steps", "6", "--save_every", "0"))
    ok(lora_sft(pets_model, part, tmp_path, "--max_steps", "6", "--save_every", "3", "--stop_after_steps", "3",
                "--save_model_checkpoints"))
    state = torch.load(os.path.join(part, "checkpoint.pt"), weights_only=True)
    assert state["model"] and all("lora_" in k for k in state["model"])  # the adapter only, not the base weights
    from transformers import AutoModelForCausalLM  # the checkpoint folder: the adapter, loaded onto its base model
    assert hasattr(AutoModelForCausalLM.from_pretrained(os.path.join(part, "checkpoint-3")), "peft_config")
    ok(lora_sft(pets_model, part, tmp_path, "--max_steps", "6", "--save_every", "3", "--resume"))
    a, b = ([r["loss"] for r in read_metrics(d) if "loss" in r] for d in (full, part))
    assert a == pytest.approx(b, abs=1e-6)


def test_bad_lora_settings(monkeypatch, tiny_model_dir, tmp_path):
    import importlib.util
    import sft
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else find_spec(name))
    for argv, message in [(["--lora_r", "-1"], "--lora_r -1: must be at least 0"),
                          (["--load_in_4bit"], "--load_in_4bit .* train an adapter with --lora_r"),
                          (["--load_in_4bit", "--lora_r", "8"], "needs the bitsandbytes library"),
                          (["--lora_r", "8", "--lora_alpha", "0"], "--lora_alpha 0.0: must be above 0"),
                          (["--lora_r", "8", "--lora_dropout", "1"], r"--lora_dropout 1.0: must be in \[0, 1\)")]:
        with pytest.raises(E.UserError, match=message):
            A.parse_args(sft.Args, argv)
    monkeypatch.setattr(sys, "argv", ["sft.py", "--model", tiny_model_dir, "--output_dir", str(tmp_path / "o"),
                                      "--precision", "fp32", "--eval_generations", "0", "--lora_r", "4",
                                      "--lora_target_modules", "nonexistent_proj"])
    with pytest.raises(E.UserError, match="--lora_target_modules nonexistent_proj: "):
        sft.main()


def lora_args(**kw):
    return type("Args", (), dict(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules="all-linear",
                                 load_in_4bit=False, gradient_checkpointing=False, **kw))()


def test_the_reference_is_the_base_model_with_the_adapter_off(tok, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification
    rt = C.setup(0, "cpu", "fp32")
    base = M.load_model(tiny_model_dir, rt)
    model = M.add_lora(M.load_model(tiny_model_dir, rt), lora_args())
    with torch.no_grad():  # a trained adapter: B is no longer 0
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    P = torch.randint(100, 1000, (2, 5))
    Y = torch.randint(100, 1000, (4, 6))
    P, ones = P.repeat_interleave(2, 0), torch.ones(4, 5, dtype=torch.long)
    logp = lambda m, g=1: C.completion_logprobs(m, P, ones, Y, torch.ones_like(Y), rt, group_size=g)[0]
    with torch.no_grad():
        with M.adapter_off(model):
            torch.testing.assert_close(logp(model), logp(base), atol=1e-6, rtol=0)
        assert (logp(model) - logp(base)).abs().max() > 1e-2  # on again after the context
        # a GRPO group's prompt computed once: the peft model passes the shared KV cache through
        torch.testing.assert_close(logp(model, g=2), logp(model), atol=1e-5, rtol=0)
    assert isinstance(M.adapter_off(base), nullcontext)  # no adapter: nothing to switch off
    # the scores of a LoRA reward model: read through peft's wrapper, the new head trained as a whole
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    rm = M.add_lora(rm, lora_args(), task_type="SEQ_CLS")
    trained = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or ".score.modules_to_save." in n for n in trained)
    assert any(".score." in n for n in trained)
    x = torch.randint(100, 1000, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(C.sequence_scores(rm, x, torch.ones_like(x)), rm(x).logits[:, 0])


def only_the_adapter_moved(base_dir, out, cls_name="AutoModelForCausalLM"):
    """The merged output loads with plain transformers, and differs from the base model only in the linear layers of
    the decoder (and a reward head); the checkpoint held the adapter only."""
    import transformers
    base = getattr(transformers, cls_name).from_pretrained(base_dir).state_dict()
    merged = getattr(transformers, cls_name).from_pretrained(out).state_dict()
    moved = {n for n, w in base.items() if n in merged and not torch.equal(w, merged[n])}
    assert moved and all(n.endswith("proj.weight") or n.startswith("score.") for n in moved), sorted(moved)
    assert "model.embed_tokens.weight" not in moved and os.path.isfile(os.path.join(out, "adapter", "adapter_config.json"))
    state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["model"]
    assert state and all("lora_" in k or "modules_to_save" in k for k in state), sorted(state)[:4]


def test_dpo_with_lora_keeps_the_base_model_as_its_reference(tiny_model_dir, tmp_path):
    # Step 1's loss is ln 2 (B = 0: the policy is its reference). After that the reference must stay the base model:
    # scoring each batch with the adapter off gives exactly the losses of log-probs precomputed before training.
    from test_dpo import PAIRS
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    runs = {}
    for precompute in ("true", "false"):
        out = str(tmp_path / precompute)
        ok(run_script("dpo.py", "--model", tiny_model_dir, "--output_dir", out, "--precision", "fp32", "--dataset", data,
                      "--eval_generations", "0", "--eval_size", "0", "--warmup_steps", "0", "--max_steps", "6",
                      "--batch_size", "4", "--learning_rate", "1e-2", "--lora_r", "8", "--lora_alpha", "16",
                      "--precompute_ref_log_probs", precompute))
        runs[precompute] = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert runs["true"][0] == pytest.approx(math.log(2), abs=1e-6)
    # (were the reference the adapted policy, every loss would be ln 2)
    assert runs["false"] == pytest.approx(runs["true"], abs=1e-5) and abs(runs["true"][-1] - math.log(2)) > 1e-4
    only_the_adapter_moved(tiny_model_dir, str(tmp_path / "false"))


def test_grpo_with_lora_measures_its_kl_to_the_base_model(pets_model, tmp_path):
    # The KL to the reference is 0 on the first step (B = 0) and grows as the adapter learns: were the reference the
    # adapted policy itself, it would stay 0.
    data, rules = write_jsonl(tmp_path / "pets.jsonl", [PETS] * 8), tmp_path / "rules.py"
    rules.write_text(RULES)
    out = str(tmp_path / "out")
    ok(run_script("grpo.py", "--model", pets_model, "--output_dir", out, "--dataset", data, "--eval_size", "0",
                  "--precision", "fp32", "--batch_size", "2", "--num_generations", "4", "--max_new_tokens", "8",
                  "--learning_rate", "1e-2", "--reward_funcs", f"{rules}:cats", "--no_dynamic_sampling",
                  "--max_steps", "4", "--beta", "0.1", "--lora_r", "8", "--save_every", "0"))
    kl = [r["kl"] for r in read_metrics(out) if "kl" in r]
    assert kl[0] == pytest.approx(0, abs=1e-6) and kl[-1] > 1e-4, kl
    only_the_adapter_moved(pets_model, out)


def ppo_lora(model, out, tmp_path, *extra):
    data, rules = write_jsonl(tmp_path / "pets.jsonl", [PETS] * 8), tmp_path / "rules.py"
    rules.write_text(RULES)
    return run_script("ppo.py", "--model", model, "--output_dir", out, "--dataset", data, "--eval_size", "0",
                      "--precision", "fp32", "--batch_size", "8", "--max_new_tokens", "8", "--learning_rate", "1e-2",
                      "--temperature", "1.0", "--reward", f"{rules}:cats", "--lora_r", "8", "--max_steps", "4",
                      *map(str, extra))


def test_ppo_with_lora_adapts_policy_and_value_and_resumes_exactly(pets_model, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    ok(ppo_lora(pets_model, full, tmp_path, "--save_every", "0"))
    rows = read_metrics(full)
    assert rows[0]["objective/kl"] == pytest.approx(0, abs=1e-6) and rows[-1]["objective/kl"] != 0
    only_the_adapter_moved(pets_model, full)
    state = torch.load(os.path.join(full, "checkpoint.pt"), weights_only=True)["model"]
    assert any(k.startswith("value.") and "score.modules_to_save" in k for k in state)  # the value head trains whole
    ok(ppo_lora(pets_model, part, tmp_path, "--save_every", "2", "--stop_after_steps", "2"))
    ok(ppo_lora(pets_model, part, tmp_path, "--save_every", "2", "--resume"))
    a, b = ([r["loss/value"] for r in read_metrics(d)] for d in (full, part))
    assert a == pytest.approx(b, abs=1e-6)


def test_reward_model_and_opd_with_lora(tiny_model_dir, pets_model, cats_model, tmp_path):
    from test_dpo import PAIRS
    out = str(tmp_path / "rm")
    ok(run_script("reward_model.py", "--model", tiny_model_dir, "--output_dir", out, "--dataset",
                  write_jsonl(tmp_path / "p.jsonl", PAIRS),
                  "--eval_size", "0", "--max_steps", "3", "--batch_size", "8", "--precision", "fp32", "--lora_r", "4"))
    only_the_adapter_moved(tiny_model_dir, out, "AutoModelForSequenceClassification")
    if importlib.util.find_spec("bitsandbytes"):  # QLoRA: the adapter merged into the fp32 reward model, its one label kept
        out = str(tmp_path / "rm4")
        ok(run_script("reward_model.py", "--model", tiny_model_dir, "--output_dir", out, "--dataset",
                      write_jsonl(tmp_path / "p.jsonl", PAIRS), "--eval_size", "0", "--max_steps", "2",
                      "--batch_size", "8", "--precision", "fp32", "--lora_r", "4", "--load_in_4bit"))
        only_the_adapter_moved(tiny_model_dir, out, "AutoModelForSequenceClassification")
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(out)
        assert config.num_labels == 1 and not hasattr(config, "quantization_config")
    out = str(tmp_path / "opd")
    ok(run_script("opd.py", "--model", pets_model, "--teacher", cats_model, "--output_dir", out, "--dataset",
                  write_jsonl(tmp_path / "pets.jsonl", [PETS] * 8), "--eval_size", "0", "--precision", "fp32",
                  "--batch_size", "8", "--max_new_tokens", "8", "--max_steps", "3", "--learning_rate", "1e-2",
                  "--lora_r", "4"))
    only_the_adapter_moved(pets_model, out)


def test_lora_with_gradient_checkpointing_computes_the_same_steps(pets_model, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ok(lora_sft(pets_model, a, tmp_path, "--max_steps", "3", "--save_every", "0"))
    ok(lora_sft(pets_model, b, tmp_path, "--max_steps", "3", "--save_every", "0", "--gradient_checkpointing"))
    la, lb = ([r["loss"] for r in read_metrics(d) if "loss" in r] for d in (a, b))
    assert la == pytest.approx(lb, abs=1e-5) and la[1] != pytest.approx(la[0])  # the adapters got their gradients


def test_qlora_trains_an_adapter_on_4bit_weights_and_saves_a_full_precision_model(pets_model, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = str(tmp_path / "out")
    ok(lora_sft(pets_model, out, tmp_path, "--max_steps", "20", "--save_every", "0", "--load_in_4bit"))
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert losses[-1] < 0.5 * losses[0], [round(l, 3) for l in losses]
    config = json.load(open(os.path.join(out, "config.json")))
    assert "quantization_config" not in config  # merged into the fp32 base weights, not into NF4 ones
    only_the_adapter_moved(pets_model, out)
    assert greedy(out) == "dog dog dog dog dog dog"


def test_lora_under_torchrun_computes_the_steps_of_one_process(pets_model, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    ok(lora_sft(pets_model, one, tmp_path, "--max_steps", "3", "--save_every", "0"))
    data = write_jsonl(tmp_path / "dogs.jsonl", DOGS * 16)
    ok(run_script("sft.py", "--model", pets_model, "--output_dir", two, "--dataset", data, "--precision", "fp32",
                  "--eval_generations", "0", "--eval_size", "0", "--warmup_steps", "0", "--batch_size", "4",
                  "--lora_r", "8", "--lora_alpha", "16", "--learning_rate", "1e-2", "--max_steps", "3",
                  "--save_every", "0", nproc=2))
    a, b = ([r["loss"] for r in read_metrics(d) if "loss" in r] for d in (one, two))
    assert b == pytest.approx(a, abs=1e-5)
