"""What TRL users bring: reward functions written for TRL (the same keywords, the dataset's columns among them), the
math-verify grader, trackers (--report_to), the sampled completions (completions.jsonl), --config YAML, loadable
checkpoint-N folders, and Hub datasets whose splits are not called train."""
import json
import os

import pytest
import torch

import tasks as T
from plumbing import args as A
from plumbing import data as D
from plumbing import errors as E
from conftest import PETS, ok, read_metrics, run_script, write_jsonl

# A reward function as TRL's documentation writes them: conversational completions, a dataset column by name, the
# trainer's state and the two logging hooks, **kwargs for the rest.
TRL_RULES = '''
def cats_like_the_solution(completions, solution, trainer_state, log_metric, log_extra, **kwargs):
    texts = [c[0]["content"] for c in completions]  # conversational data: [{"role": "assistant", "content": ...}]
    log_metric("custom/global_step", trainer_state.global_step)
    log_extra("words", [len(t.split()) for t in texts])
    return [sum(w == s for w in t.split()) / max(1, len(t.split())) for t, s in zip(texts, solution)]
'''
CONVERSATIONAL_PETS = {"prompt": [{"role": "user", "content": PETS["prompt"]}], "solution": "cat"}


def test_reward_functions_get_trls_keywords():
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    rows = [{"prompt": user("2 + 2?"), "completion": "ignored", "solution": "4", "level": 1},
            {"prompt": "3 + 3?", "solution": "6"},  # a standard (string) prompt: string completions
            {"question": "4 + 4?", "answer": "#### 8"},  # GSM8K's column names
            {"messages": user("5 + 5?") + [{"role": "assistant", "content": "10"}]}]  # prompt: the sampled messages
    sampled = [user("2 + 2? Put..."), user("3 + 3? Put..."), user("4 + 4? Put..."), user("5 + 5?")]
    metrics, columns = {}, {}
    kw = T.reward_kwargs(rows, sampled, ["a", "b", "c", "d"], [[1], [2], [3], [4]], 3, 10, metrics, columns)
    assert kw["prompts"] == [rows[0]["prompt"], "3 + 3?", "4 + 4?", user("5 + 5?")]
    assert kw["completions"] == [[{"role": "assistant", "content": "a"}], "b", "c", [{"role": "assistant", "content": "d"}]]
    assert kw["completion_ids"] == [[1], [2], [3], [4]]
    assert kw["solution"] == ["4", "6", None, None] and kw["level"] == [1, None, None, None]
    assert kw["question"] == [None, None, "4 + 4?", None] and kw["answer"] == [None, None, "#### 8", None]  # raw, as TRL
    assert "completion" not in kw and len(kw["messages"]) == 4
    assert (kw["trainer_state"].global_step, kw["trainer_state"].max_steps) == (3, 10)
    kw["log_metric"]("acc", 1)
    kw["log_metric"]("acc", 0.5)
    kw["log_extra"]("n", [1, 2])
    kw["log_extra"]("n", [3, 4])
    assert metrics == {"acc": [1.0, 0.5]} and columns == {"n": [1, 2, 3, 4]}


def test_a_trl_reward_function_in_grpo_and_the_completions_it_logs(pets_model, tmp_path):
    data = write_jsonl(tmp_path / "pets.jsonl", [CONVERSATIONAL_PETS] * 16)
    (tmp_path / "trl_rules.py").write_text(TRL_RULES)
    out = str(tmp_path / "out")
    proc = ok(run_script("grpo.py", "--model", pets_model, "--output_dir", out, "--dataset", data, "--eval_size", "0",
                         "--precision", "fp32", "--batch_size", "2", "--num_generations", "4", "--max_new_tokens", "8",
                         "--reward_funcs", f"{tmp_path / 'trl_rules.py'}:cats_like_the_solution", "--save_every", "0",
                         "--max_steps", "2", "--log_completions_every", "2", "--num_completions_to_print", "1"))
    rows = read_metrics(out)
    assert [r["reward_errors"] for r in rows] == [0, 0]
    assert [r["custom/global_step"] for r in rows] == [0, 1]  # log_metric, with the step before the update
    assert any(r["rewards/cats_like_the_solution/mean"] > 0 for r in rows)
    samples = [json.loads(l) for l in open(os.path.join(out, "completions.jsonl"))]
    assert len(samples) == 8 and {s["step"] for s in samples} == {2}  # every completion of step 2, none of step 1
    for s in samples:
        words = s["completion"].split()
        assert s["prompt"] == CONVERSATIONAL_PETS["prompt"]
        assert s["rewards"]["cats_like_the_solution"] == pytest.approx(words.count("cat") / max(1, len(words)))
        assert s["reward"] == s["rewards"]["cats_like_the_solution"] and s["words"] == len(words)  # log_extra
    for g in range(2):  # the advantages of a group are its rewards, centred and scaled by their std
        r = torch.tensor([s["reward"] for s in samples[4 * g : 4 * g + 4]])
        a = torch.tensor([s["advantage"] for s in samples[4 * g : 4 * g + 4]])
        torch.testing.assert_close(a, (r - r.mean()) / (r.std(unbiased=False) + 1e-4), atol=1e-5, rtol=1e-5)
    assert proc.stdout.count("step 2 sample: ") == 1


def test_a_trl_reward_function_in_ppo(pets_model, tmp_path):
    data = write_jsonl(tmp_path / "pets.jsonl", [CONVERSATIONAL_PETS] * 16)
    (tmp_path / "trl_rules.py").write_text(TRL_RULES)
    out = str(tmp_path / "out")
    ok(run_script("ppo.py", "--model", pets_model, "--output_dir", out, "--dataset", data, "--eval_size", "0",
                  "--precision", "fp32", "--batch_size", "4", "--max_new_tokens", "8", "--max_steps", "1",
                  "--reward", f"{tmp_path / 'trl_rules.py'}:cats_like_the_solution", "--save_every", "0",
                  "--log_completions_every", "1", "--missing_eos_penalty", "0"))
    row = read_metrics(out)[-1]
    assert row["reward_errors"] == 0 and row["custom/global_step"] == 0
    samples = [json.loads(l) for l in open(os.path.join(out, "completions.jsonl"))]
    assert len(samples) == 4
    for s in samples:  # the score is the rule's (no --missing_eos_penalty here), with the column it logged
        words = s["completion"].split()
        assert s["score"] == pytest.approx(words.count("cat") / max(1, len(words)))
        assert s["words"] == len(words)


@pytest.mark.parametrize("box, answer, exact, math_verify", [
    ("72", "72", True, True),
    ("72.0", "72", True, True),
    ("1,000", "1000", True, True),
    ("\\frac{1}{2}", "0.5", True, True),
    ("73", "72", False, False),
    ("\\dfrac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}", False, True),
    ("\\frac12", "0.5", False, True),
    ("\\pi/2", "\\frac{\\pi}{2}", False, True),
    ("1+x^2", "x^2+1", False, True),
    ("\\sqrt{2}", "\\frac{\\sqrt{3}}{2}", False, False),
])
def test_graders(box, answer, exact, math_verify):
    text = f"So the answer is \\boxed{{{box}}}."
    assert T.grade(text, answer) == (True, exact)
    assert T.grade(text, answer, "math_verify") == (True, math_verify)
    assert T.grade("no box", answer, "math_verify") == (False, False)


def test_refused_graders_and_trackers(monkeypatch):
    import importlib.util
    import sft
    real = importlib.util.find_spec  # as on a machine without wandb and math-verify
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "math_verify")
                        else real(name, *a))
    for argv, message in [(["--grader", "sympy"], "--grader sympy: choose exact or math_verify"),
                          (["--grader", "math_verify"], "--grader math_verify needs the math-verify library: pip "
                                                        "install math-verify"),
                          (["--report_to", "mlflow"], "--report_to mlflow: choose from wandb, trackio, tensorboard"),
                          (["--report_to", "tensorboard,wandb"], "--report_to wandb needs the wandb package: pip "
                                                                 "install wandb")]:
        with pytest.raises(E.UserError, match=message):
            A.parse_args(sft.Args, argv)


# wandb and trackio stand-ins: the calls the trackers get, written to a file (neither package is installed here)
FAKE_TRACKER = '''
import json, os
def _write(*call):
    with open(os.environ["FAKE_TRACKER_LOG"], "a") as f:
        f.write(json.dumps([__name__, *call]) + "\\n")
def init(project=None, name=None, config=None, **kw):
    _write("init", project, name, sorted(config))
def log(row, step=None):
    _write("log", step, row)
def finish():
    _write("finish")
'''


def test_trackers_and_a_config_file(tiny_model_dir, tmp_path, monkeypatch):
    for name in ("wandb", "trackio"):
        (tmp_path / "fake").mkdir(exist_ok=True)
        (tmp_path / "fake" / f"{name}.py").write_text(FAKE_TRACKER)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
    monkeypatch.setenv("FAKE_TRACKER_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Say hi.", "completion": "hi"}] * 8)
    config = tmp_path / "run.yaml"
    config.write_text(f"dataset: {data}\nmax_steps: 3\nlearning_rate: 1e-3\nbatch_size: 2\nreport_to: wandb,trackio,tensorboard\n")
    out = str(tmp_path / "out")
    ok(run_script("sft.py", "--config", config, "--model", tiny_model_dir, "--output_dir", out, "--precision", "fp32",
                  "--eval_generations", "0", "--save_every", "0", "--max_steps", "2"))  # the command line wins
    args = json.load(open(os.path.join(out, "args.json")))
    assert (args["max_steps"], args["learning_rate"], args["batch_size"], args["dataset"]) == (2, 1e-3, 2, data)
    rows = read_metrics(out)
    calls = [json.loads(l) for l in open(tmp_path / "calls.jsonl")]
    for name, project in (("wandb", "mine"), ("trackio", "posttrain")):
        mine = [c[1:] for c in calls if c[0] == name]
        assert mine[0] == ["init", project, "out", sorted(args)]
        assert mine[-1] == ["finish"]
        logged = [c for c in mine if c[0] == "log"]
        assert [c[1] for c in logged] == [r["step"] for r in rows]
        assert logged[-1][2] == {k: v for k, v in rows[-1].items() if k != "step"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(out, "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("loss")]
    assert loss == [(r["step"], pytest.approx(r["loss"])) for r in rows if "loss" in r]


def test_checkpoint_folders_load_and_go_with_overwrite(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Say hi.", "completion": "hi"}] * 8)
    out = str(tmp_path / "out")
    common = ["--model", tiny_model_dir, "--output_dir", out, "--dataset", data, "--precision", "fp32",
              "--eval_generations", "0", "--max_steps", "3", "--batch_size", "2", "--learning_rate", "1e-3"]
    ok(run_script("sft.py", *common, "--save_every", "1", "--save_model_checkpoints"))
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-1", "checkpoint-2"]
    weights = [AutoModelForCausalLM.from_pretrained(os.path.join(out, d)).state_dict()["model.norm.weight"]
               for d in ("checkpoint-1", "checkpoint-2", ".")]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    ok(run_script("sft.py", *common, "--save_every", "0", "--overwrite_output_dir"))
    assert not any(n.startswith("checkpoint-") for n in os.listdir(out))


def test_datasets_whose_splits_are_not_called_train(tmp_path):
    import datasets
    row = {"prompt": "a", "completion": "b"}
    hub_like = tmp_path / "hub_like"  # a dataset repository as on the Hub, with ultrachat_200k's split names
    (hub_like / "data").mkdir(parents=True)
    for split in ("train_sft", "test_sft"):
        write_jsonl(hub_like / "data" / f"{split}.jsonl", [row] * 3)
    (hub_like / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n"
                                        "  - split: train_sft\n    path: data/train_sft.jsonl\n"
                                        "  - split: test_sft\n    path: data/test_sft.jsonl\n---\n")
    saved = tmp_path / "saved"  # DatasetDict.save_to_disk
    datasets.DatasetDict({s: datasets.Dataset.from_list([row] * 2) for s in ("train_sft", "test_sft")}).save_to_disk(saved)
    for path in (hub_like, saved):
        assert len(D.load_data(str(path), "train_sft")) in (2, 3)
        with pytest.raises(E.UserError, match=f"--dataset {path} has no split 'train'; its splits are train_sft, "
                                              "test_sft: choose one with --dataset_split"):
            D.load_data(str(path), "train")
        with pytest.raises(E.UserError, match="no split 'validation'.*choose one with --eval_split"):
            D.load_data(str(path), "validation", flag="--eval_split")
