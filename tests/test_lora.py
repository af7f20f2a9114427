"""LoRA through peft (sft.py so far): only the adapters train, a LoRA run learns what it is shown, the output is the
merged model (it loads with plain from_pretrained and generates) with the adapter beside it, checkpoints hold the
adapter and resume exactly, and bad LoRA settings are refused."""
import json
import os
import sys

import pytest
import torch

import common as C
import models as M
import runs as R
from conftest import PETS, ok, read_metrics, run_script, write_jsonl

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
    import sft
    for argv, message in [(["--lora_r", "-1"], "--lora_r -1: must be at least 0"),
                          (["--lora_r", "8", "--lora_alpha", "0"], "--lora_alpha 0.0: must be above 0"),
                          (["--lora_r", "8", "--lora_dropout", "1"], r"--lora_dropout 1.0: must be in \[0, 1\)")]:
        with pytest.raises(R.UserError, match=message):
            R.parse_args(sft.Args, argv)
    monkeypatch.setattr(sys, "argv", ["sft.py", "--model", tiny_model_dir, "--output_dir", str(tmp_path / "o"),
                                      "--precision", "fp32", "--eval_generations", "0", "--lora_r", "4",
                                      "--lora_target_modules", "nonexistent_proj"])
    with pytest.raises(R.UserError, match="--lora_target_modules nonexistent_proj: "):
        sft.main()
