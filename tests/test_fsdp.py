"""FSDP2 (--fsdp under torchrun), on CPU with gloo: 2 processes compute the losses of 1 (sft.py, dpo.py,
reward_model.py) or, where each rank samples for its own prompts, of DDP with 2 (grpo.py, ppo.py, opd.py); each rank
holds half the weights, gradients and optimizer state; a resumed run equals an uninterrupted one; the model saved at
the end is the whole model, and --fsdp where it cannot apply is refused."""
import glob
import os
import re

import pytest

from plumbing import args as A
from plumbing import errors as E
from conftest import PETS, RULES, ok, read_metrics, run_script, write_jsonl
from test_dpo import PAIRS


def losses(out, key="loss"):
    return [r[key] for r in read_metrics(out) if key in r]


def memory(proc):
    """The per-rank MiB of weights, gradients and AdamW state that a script prints after its first step."""
    m = re.search(r"memory per rank: weights ([\d.]+) MiB, gradients ([\d.]+) MiB, AdamW state ([\d.]+) MiB", proc.stdout)
    return [float(x) for x in m.groups()]


def sft_run(model, out, *extra, nproc=1):  # 2 micro-batches of 2 per rank under 2 ranks; 7 held-out examples
    return run_script("sft.py", "--model", model, "--output_dir", out, "--precision", "fp32", "--max_steps", "4",
                      "--batch_size", "8", "--micro_batch_size", "2", "--eval_size", "7", "--eval_every", "2",
                      "--eval_generations", "3", "--max_new_tokens", "6", "--learning_rate", "1e-3", *extra,
                      nproc=nproc)


def test_sft_under_fsdp_matches_one_process_with_half_the_memory_and_resumes(tiny_model_dir, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    one, full, part = (str(tmp_path / n) for n in ("one", "full", "part"))
    mem_one = memory(ok(sft_run(tiny_model_dir, one)))
    mem_fsdp = memory(ok(sft_run(tiny_model_dir, full, "--fsdp", nproc=2)))
    assert [b / a for a, b in zip(mem_one, mem_fsdp)] == pytest.approx([0.5] * 3, abs=0.01), (mem_one, mem_fsdp)
    assert losses(full) == pytest.approx(losses(one), abs=1e-5)
    assert losses(full, "eval_loss") == pytest.approx(losses(one, "eval_loss"), abs=1e-5)
    assert "eval/accuracy" in read_metrics(full)[-1]  # greedy answers sampled with the weights gathered whole
    # Interrupted after 2 steps and resumed from the shards: the same run.
    ok(sft_run(tiny_model_dir, part, "--fsdp", "--save_every", "2", "--stop_after_steps", "2", nproc=2))
    assert os.path.isdir(os.path.join(part, "checkpoint-2.dcp")) and not os.path.exists(os.path.join(part, "config.json"))
    ok(sft_run(tiny_model_dir, part, "--fsdp", "--save_every", "2", "--resume", nproc=2))
    assert losses(part) == pytest.approx(losses(full), abs=1e-6)
    assert [os.path.basename(p) for p in glob.glob(os.path.join(part, "checkpoint-*.dcp"))] == ["checkpoint-4.dcp"]
    # The saved model is the whole model, gathered from the shards, with the tied weight stored once.
    a, b = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (one, part))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    keys = [set(safe_open(os.path.join(d, "model.safetensors"), "pt").keys()) for d in (one, part)]
    assert keys[0] == keys[1]


def test_fsdp_in_bf16_and_with_gradient_checkpointing(tiny_model_dir, tmp_path):
    # Under bf16 FSDP gathers bf16 weights (the whole forward in bf16, where autocast keeps the residual stream in
    # fp32): close to one process, not equal. Gradient checkpointing recomputes the same steps.
    runs = {}
    for name, nproc, flags in [("one", 1, []), ("fsdp", 2, ["--fsdp"]), ("gc", 2, ["--fsdp", "--gradient_checkpointing"])]:
        out = str(tmp_path / name)
        ok(sft_run(tiny_model_dir, out, "--precision", "bf16", *flags, nproc=nproc))
        runs[name] = losses(out)
    assert runs["fsdp"] == pytest.approx(runs["one"], rel=2e-3) and runs["gc"] == pytest.approx(runs["fsdp"], abs=1e-5)


def test_dpo_and_reward_model_under_fsdp_match_one_process(tiny_model_dir, tmp_path):
    # 32 rows, 5 held out: the ranks evaluate 3 and 2 pairs (other numbers of forward passes); 2 micro-batches a step
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS * 4)
    for script, extra, keys in [("dpo.py", ["--eval_generations", "0"], ("loss", "eval_loss", "eval_rewards/margins")),
                                ("reward_model.py", [], ("loss", "eval_loss", "eval_margin"))]:
        runs = {}
        for nproc, flags in [(1, []), (2, ["--fsdp"])]:
            out = str(tmp_path / f"{script}{nproc}")
            ok(run_script(script, "--model", tiny_model_dir, "--output_dir", out, "--precision", "fp32", "--dataset",
                          data, "--eval_size", "5", "--max_steps", "3", "--batch_size", "4", "--micro_batch_size", "1",
                          "--learning_rate", "1e-3", "--warmup_steps", "0", *extra, *flags, nproc=nproc))
            runs[nproc] = read_metrics(out)
        for key in keys:
            a, b = ([r[key] for r in runs[n] if key in r] for n in (1, 2))
            assert a and b == pytest.approx(a, abs=1e-5), (script, key)


@pytest.mark.parametrize("script", ["grpo.py", "ppo.py", "opd.py"])
def test_rl_scripts_under_fsdp_match_ddp(pets_model, cats_model, tmp_path, script):
    # Each rank samples for its own prompts, so 2 ranks draw other samples than 1: FSDP is compared with DDP.
    data, rules = write_jsonl(tmp_path / "pets.jsonl", [PETS] * 8), tmp_path / "rules.py"
    rules.write_text(RULES)
    common = ["--model", pets_model, "--dataset", data, "--eval_size", "2", "--precision", "fp32", "--max_steps", "2",
              "--batch_size", "4", "--max_new_tokens", "6", "--learning_rate", "1e-2"]
    # (grpo.py's micro-batches of 2 hold no whole group of 4: DDP computes each prompt per row, as FSDP always does)
    extra, keys = {"grpo.py": (["--num_generations", "4", "--reward_funcs", f"{rules}:cats", "--beta", "0.1",
                                "--no_dynamic_sampling", "--micro_batch_size", "2"], ["loss", "kl", "reward"]),
                   "ppo.py": (["--reward", f"{rules}:cats", "--temperature", "1.0"],
                              ["loss/policy", "loss/value", "objective/kl", "objective/scores"]),
                   "opd.py": (["--teacher", cats_model], ["loss", "kl/student_teacher"])}[script]
    runs = {}
    for flags in ([], ["--fsdp"]):
        out = str(tmp_path / f"out{len(flags)}")
        ok(run_script(script, *common, *extra, "--output_dir", out, *flags, nproc=2))
        runs[len(flags)] = read_metrics(out)
    if script != "opd.py":  # stopped after a step and resumed from its shards (ppo.py: two models, two groups)
        part = str(tmp_path / "part")
        for flags in (["--stop_after_steps", "1"], ["--resume"]):
            ok(run_script(script, *common, *extra, "--output_dir", part, "--fsdp", "--save_every", "1", *flags, nproc=2))
        runs[2] = read_metrics(part)
    assert "eval/accuracy" in runs[1][-1]
    for key in keys:
        a, *others = ([r[key] for r in runs[n] if key in r] for n in sorted(runs))
        assert len(a) == 2 and all(b == pytest.approx(a, abs=1e-5) for b in others), key


def test_fsdp_where_it_cannot_apply(monkeypatch, tiny_model_dir, tmp_path):
    import sft
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(E.UserError, match="--fsdp shards the model over the processes of torchrun"):
        A.parse_args(sft.Args, ["--fsdp"])
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(E.UserError, match="--fsdp with --lora_r: not supported"):
        A.parse_args(sft.Args, ["--fsdp", "--lora_r", "8"])
    monkeypatch.delenv("RANK")
    # Under torchrun the line is said once, and torchrun's own failure report (its exit code 1 and its traceback
    # are torchrun's: a worker cannot change them) names it as the root cause.
    proc = sft_run(tiny_model_dir, str(tmp_path / "o"), "--fsdp", "--lora_r", "8", nproc=2)
    line = "error: --fsdp with --lora_r: not supported"
    assert proc.returncode != 0 and proc.stderr.count(line) == 2 and f"traceback : {line}" in proc.stderr
    # A run checkpointed under DDP (or one process) resumes only without --fsdp, and the other way round.
    out = str(tmp_path / "out")
    ok(sft_run(tiny_model_dir, out, "--max_steps", "2", "--stop_after_steps", "1", "--save_every", "1"))
    proc = sft_run(tiny_model_dir, out, "--max_steps", "2", "--resume", "--fsdp", nproc=2)
    assert proc.returncode != 0 and "the checkpoint was made with --fsdp False, not True" in proc.stderr
