"""Bad input, faults and misuse, as a new user meets them: one line on stderr and exit code 2 (130 after Ctrl-C),
nothing of an earlier run lost, no output that looks finished when it is not."""
import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import common as C
from plumbing import args as A
from plumbing import data as D
from plumbing import errors as E
from plumbing import formats as F
from plumbing import models as M
from plumbing import runs as R
from conftest import ROOT, ok, read_metrics, run_script, write_jsonl

ROWS = [{"messages": [{"role": "user", "content": f"Say word {i}."}, {"role": "assistant", "content": w}]}
        for i, w in enumerate(["apple", "banana pie", "cherry tart", "dates", "elderberry", "fig", "grape", "honeydew"])]
CPU = C.Runtime(torch.device("cpu"), torch.float32)


def sft_args(tiny_model_dir, data, *extra):
    return ["--model", tiny_model_dir, "--dataset", data, "--eval_size", "0", "--eval_generations", "0",
            "--precision", "fp32", "--max_steps", "1", "--batch_size", "2", "--warmup_steps", "0", *map(str, extra)]


def main_raises(monkeypatch, script, argv, match):
    """Run <script>.main() in this process and expect the UserError that R.run would print as one line."""
    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *map(str, argv)])
    with pytest.raises(E.UserError, match=match):
        module.main()
    R.release_output_dir()  # what R.run does on the way out


def snapshot(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, n))}


# ----------------------------------------------------------------------------------------------------------------
# Numbers are range-checked before any work
@pytest.mark.parametrize("script,argv,message", [
    ("sft", ["--max_grad_norm=-1"], "--max_grad_norm -1.0: must be above 0"),  # would be gradient ascent
    ("sft", ["--learning_rate", "-1e-3"], "--learning_rate -0.001: must be above 0"),  # argparse's flag-like value
    ("sft", ["--eval_size=-1"], "--eval_size -1: must be at least 0"),
    ("sft", ["--batch_size", "-2"], "--batch_size -2: must be at least 1"),
    ("sft", ["--stop_after_steps=-1"], "--stop_after_steps -1: must be at least 0"),
    ("sft", ["--min_lr_ratio", "2"], "--min_lr_ratio 2.0: must be in [0, 1]"),
    ("sft", ["--learning_rate", "nan"], "--learning_rate nan: must be above 0"),
    ("dpo", ["--beta=-1"], "--beta -1.0: must be above 0"),  # would learn to prefer the rejected answers
    ("dpo", ["--loss_type", "ipo", "--beta", "0"], "--beta 0.0: must be above 0"),  # IPO divides by β
    ("reward_model", ["--adam_beta2", "1"], "--adam_beta2 1.0: must be in [0, 1)"),
    ("grpo", ["--top_p", "0"], "--top_p 0.0: must be in (0, 1]"),
    ("grpo", ["--top_p", "1.5"], "--top_p 1.5: must be in (0, 1]"),
    ("grpo", ["--max_new_tokens", "0"], "--max_new_tokens 0: must be at least 1"),
    ("grpo", ["--num_generations", "1"], "--num_generations 1: must be at least 2"),
    ("grpo", ["--micro_batch_size", "0"], "--micro_batch_size 0: must be at least 1"),
    ("ppo", ["--gamma", "1.5"], "--gamma 1.5: must be in [0, 1]"),
    ("ppo", ["--kl_coef=-0.1"], "--kl_coef -0.1: must be at least 0"),
    ("opd", ["--lmbda", "2"], "--lmbda 2.0: must be in [0, 1]"),
    ("opd", ["--temperature", "0"], "--temperature 0.0: must be above 0"),
])
def test_out_of_range_arguments_are_refused(script, argv, message):
    with pytest.raises(E.UserError, match=re.escape(message)):
        A.parse_args(importlib.import_module(script).Args, argv)


def test_negative_numbers_anywhere_on_the_command_line():
    """A negative number is a value, as argparse users expect, also before another flag and in the
    forms argparse itself takes for a flag (-1e-3)."""
    argv = ["--reward_model_weight", "-0.5", "--max_steps", "3", "--epsilon", "-.5e-1",
            "--reward_weights", "1,-1", "--temperature", "0.5", "--seed=7"]
    with pytest.raises(E.UserError, match=re.escape("--epsilon -0.05: must be at least 0")):
        A.parse_args(importlib.import_module("grpo").Args, argv)
    args = A.parse_args(importlib.import_module("grpo").Args, [a.replace("-.5e-1", "0.1") for a in argv])
    assert (args.reward_model_weight, args.max_steps, args.epsilon, args.temperature, args.seed) == \
        (-0.5, 3, 0.1, 0.5, 7)
    with pytest.raises(E.UserError, match=re.escape("--seed -1: must be at least 0")):
        A.parse_args(importlib.import_module("sft").Args, ["--seed", "-1", "--max_steps", "2"])
    args = A.parse_args(importlib.import_module("ppo").Args,
                        ["--missing_eos_penalty", "-1E-3", "--reward", "verifiable"])
    assert args.missing_eos_penalty == -1e-3 and args.reward == "verifiable"


def test_a_refused_argument_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    proc = run_script("dpo.py", "--beta=-1", "--output_dir", out)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --beta -1.0: must be above 0", proc.stderr
    assert not out.exists()


def test_defaults_fit_small_batches_and_small_files(tmp_path, capsys):
    import dpo
    import sft
    args = sft.Args(batch_size=4)  # the micro-batch follows the batch (it was a fixed 16, which 4 is not a multiple of)
    R.split_batch(args, CPU, cap=16)
    assert args.micro_batch_size == 4
    args = dpo.Args(batch_size=12)
    R.split_batch(args, CPU, cap=8)
    assert args.micro_batch_size == 6  # the largest divisor of 12 up to 8
    args = sft.Args(batch_size=12)
    R.split_batch(args, C.Runtime(torch.device("cpu"), torch.float32, world_size=2), cap=16)
    assert args.micro_batch_size == 6  # each rank's share
    with pytest.raises(E.UserError, match=r"multiple of --micro_batch_size x ranks \(4 x 1\)"):
        R.split_batch(sft.Args(batch_size=6, micro_batch_size=4), CPU, cap=16)
    # 16 rows and --eval_size 64: hold out a tenth, not refuse (or hold out most of the file)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS * 2)
    _, raw, heldout = D.load_splits(sft.Args(dataset=data, eval_size=64), 64)
    assert (len(raw[0]), len(heldout)) == (15, 1)
    assert "holding out 1 (a tenth), not --eval_size 64" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# Output folders: nothing lost, nothing mixed
def test_a_folder_holding_a_run_is_kept_unless_overwritten(monkeypatch, tiny_model_dir, tmp_path):
    data, out = write_jsonl(tmp_path / "d.jsonl", ROWS), str(tmp_path / "out")
    ok(run_script("sft.py", *sft_args(tiny_model_dir, data), "--output_dir", out))
    before = snapshot(out)
    main_raises(monkeypatch, "sft", [*sft_args(tiny_model_dir, data), "--output_dir", out],
                "holds another run .*: pass --resume to continue it or --overwrite_output_dir to replace it")
    # Overwriting, with a mistake found only when the data is read: nothing of the old run is touched yet.
    main_raises(monkeypatch, "sft", [*sft_args(tiny_model_dir, tmp_path / "nope.jsonl"), "--output_dir", out,
                                     "--overwrite_output_dir"], "no such file")
    assert snapshot(out) == before  # no lock left either
    # Overwriting with a run that diverges: the old model, checkpoint and metrics are gone, not left to look like
    # this run's, and the stop does not call anything of the old run "the last good checkpoint".
    proc = run_script("sft.py", *sft_args(tiny_model_dir, data), "--output_dir", out, "--overwrite_output_dir",
                      "--max_steps", "4", "--learning_rate", "1e30")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "last good checkpoint" not in proc.stderr and "lower --learning_rate" in proc.stderr
    assert sorted(os.listdir(out)) == ["args.json", "metrics.jsonl"]
    assert json.load(open(os.path.join(out, "args.json")))["learning_rate"] == 1e30


def test_output_dir_that_is_the_model_a_file_or_locked_is_refused(monkeypatch, tiny_model_dir, tmp_path):
    data, out = write_jsonl(tmp_path / "d.jsonl", ROWS), tmp_path / "out"
    base = sft_args(tiny_model_dir, data)
    main_raises(monkeypatch, "sft", [*base, "--output_dir", f"{tiny_model_dir}/../{os.path.basename(tiny_model_dir)}"],
                "is the --model: the run would overwrite its own input")
    (tmp_path / "f").write_text("")
    main_raises(monkeypatch, "sft", [*base, "--output_dir", tmp_path / "f"], "is a file; give a folder")
    out.mkdir()
    (out / ".lock").write_text(f"{socket.gethostname()}:{os.getppid()}")  # a live process holds it
    main_raises(monkeypatch, "sft", [*base, "--output_dir", out], r"another run \(process \d+ on .*\) is writing to")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / ".lock").write_text(f"{socket.gethostname()}:{dead.pid}")  # left by a run that was killed: taken over
    main_raises(monkeypatch, "sft", [*base[:2], "--dataset", tmp_path / "nope.jsonl", *base[4:], "--output_dir", out],
                "no such file")
    assert os.listdir(out) == []  # the stale lock went, and this run's lock with it


def test_resume_applies_changed_settings_and_compares_paths_as_paths(monkeypatch, tiny_model_dir, tmp_path):
    data, out = write_jsonl(tmp_path / "d.jsonl", ROWS), str(tmp_path / "out")
    base = [*sft_args(tiny_model_dir, data), "--max_steps", "4", "--save_every", "1", "--output_dir", out]
    ok(run_script("sft.py", *base, "--stop_after_steps", "2", "--learning_rate", "1e-3"))
    args_before = open(os.path.join(out, "args.json")).read()
    main_raises(monkeypatch, "sft", [*base, "--resume", "--max_steps", "5"],
                "the checkpoint was made with --max_steps 4, not 5")
    assert open(os.path.join(out, "args.json")).read() == args_before  # a refused resume rewrites nothing
    same_model = os.path.relpath(tiny_model_dir, ROOT) + "/"  # the same folder, written differently
    proc = ok(run_script("sft.py", *base, "--resume", "--learning_rate", "2e-3", "--model", same_model))
    assert "changed: --model" not in proc.stdout
    assert "changed: --learning_rate 0.002 (was 0.001)" in proc.stdout
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["learning_rate"] == pytest.approx(2e-3 * R.warmup_cosine(2, 0, 4, 0.1))
    assert json.load(open(os.path.join(out, "args.json")))["learning_rate"] == 2e-3


def test_resuming_another_scripts_checkpoint_names_that_script(monkeypatch, tiny_model_dir, tmp_path):
    data, out = write_jsonl(tmp_path / "d.jsonl", ROWS), str(tmp_path / "out")
    base = [*sft_args(tiny_model_dir, data), "--max_steps", "2", "--output_dir", out]
    ok(run_script("sft.py", *base, "--stop_after_steps", "1"))
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi.", "chosen": "Hello.",
                                                "rejected": "Go."}] * 4)
    main_raises(monkeypatch, "dpo", ["--model", tiny_model_dir, "--dataset", pairs, "--eval_size",
                                     "0", "--output_dir", out, "--resume", "--max_steps", "2"],
                re.escape(f"--resume: {out}/checkpoint.pt was written by sft.py, not dpo.py; "
                          "resume it with sft.py"))


def test_model_folders_appear_whole_and_a_resume_removes_torn_ones(tiny_model_dir, tmp_path):
    data, out = write_jsonl(tmp_path / "d.jsonl", ROWS), tmp_path / "out"
    base = [*sft_args(tiny_model_dir, data), "--max_steps", "4", "--save_every", "1", "--save_model_checkpoints",
            "--output_dir", out]
    ok(run_script("sft.py", *base, "--stop_after_steps", "2"))
    # What a kill mid-write leaves: a checkpoint-N/ being written beside its final name, the final model being
    # written inside --output_dir, a checkpoint.pt being written, and a checkpoint-N/ of an earlier version that
    # wrote in place and died before its config.json.
    for torn in ("checkpoint-3.saving", ".saving", "checkpoint-9"):
        (out / torn).mkdir()
        (out / torn / "model.safetensors").write_bytes(b"\0" * 10)
    (out / "checkpoint.pt.tmp").write_bytes(b"\0" * 10)
    assert sorted(os.listdir(out / "checkpoint-2")) == sorted(os.listdir(out / "checkpoint-1"))
    assert "config.json" in os.listdir(out / "checkpoint-2")
    ok(run_script("sft.py", *base, "--resume"))
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n or n.startswith(".")) == [
        "checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint.pt"]
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out / "checkpoint-3")
    # A model folder is written into a temporary folder and appears whole: checkpoint-N/ by one rename.
    tmp = R.temporary(str(out / "checkpoint-7"))
    assert tmp == str(out / "checkpoint-7.saving")
    os.makedirs(tmp)
    (out / "checkpoint-7.saving" / "config.json").write_text("{}")
    assert not (out / "checkpoint-7").exists()
    R.publish(tmp, str(out / "checkpoint-7"))
    assert os.listdir(out / "checkpoint-7") == ["config.json"] and not os.path.exists(tmp)


# ----------------------------------------------------------------------------------------------------------------
# Stops that are clean
def test_ctrl_c_says_where_to_resume(tiny_model_dir, tmp_path):
    data, out = write_jsonl(tmp_path / "d.jsonl", ROWS), tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "sft.py"), *sft_args(tiny_model_dir, data), "--max_steps", "1000",
           "--save_every", "1", "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    deadline = time.time() + 300
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert re.search(r"^interrupted; the last checkpoint \(step \d+\) is .*checkpoint.pt: continue with --resume$",
                     err, re.M), err[-2000:]
    assert "Traceback" not in err
    assert not (out / ".lock").exists() and not (out / "checkpoint.pt.tmp").exists()


def test_a_full_disk_is_named_and_leaves_no_partial_file(monkeypatch, tmp_path):
    import sft
    model = torch.nn.Linear(2, 2)
    opt, sched = R.optimizer_and_schedule(model, sft.Args())
    path = str(tmp_path / "checkpoint.pt")

    def full(obj, f):
        open(f, "wb").write(b"half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(E.UserError, match="cannot write the checkpoint .*: the disk is full; free some space"):
        R.save_state(path, model, opt, sched, 1, sft.Args(), CPU)
    assert os.listdir(tmp_path) == []


def test_a_full_disk_at_the_final_save_says_what_was_kept_and_resume_writes_the_model(monkeypatch, tiny_model_dir,
                                                                                       tmp_path):
    data, out = write_jsonl(tmp_path / "d.jsonl", ROWS), tmp_path / "out"
    argv = [*sft_args(tiny_model_dir, data), "--max_steps", "2", "--output_dir", out]

    def full(model, weights, tok, output_dir):
        tmp = R.temporary(output_dir)
        os.makedirs(tmp)
        open(os.path.join(tmp, "model.safetensors"), "wb").write(b"half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(R, "_save_pretrained", full)
    main_raises(monkeypatch, "sft", argv, re.escape(
        f"cannot write the model to {out}: the disk is full; {out}/checkpoint.pt (step 2) is kept: free some "
        "space and continue with --resume, which writes the model"))
    assert sorted(os.listdir(out)) == ["args.json", "checkpoint.pt", "metrics.jsonl"]  # nothing half-written
    monkeypatch.undo()
    ok(run_script("sft.py", *argv, "--resume"))
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out)
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


def test_a_tensorboard_folder_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "tensorboard").write_text("a file where the folder goes")
    with pytest.raises(E.UserError, match=re.escape(f"--report_to tensorboard: cannot write to {tmp_path}/tensorboard "
                                                    "(File exists); make it a writable folder")):
        R.MetricsLog(str(tmp_path), CPU, trackers=["tensorboard"])


def test_sampling_from_a_diverged_model_stops_with_the_documented_message(tok, tiny_model_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(E.Diverged, match="the model's logits became inf or nan"):
        C.generate_ids(model, tok, [[1, 2, 3]], CPU, max_new_tokens=2, temperature=1.0)


def test_a_diverged_run_names_its_last_good_checkpoint(monkeypatch):
    # runs.run turns Diverged into one line that says where this run's last good checkpoint is; a plain UserError
    # gets no such hint.
    left = []
    monkeypatch.setattr(R, "_leave", lambda code, message: left.append((code, message)))
    monkeypatch.setitem(R._run, "checkpoint", ("out/x/checkpoint.pt", 4))

    def raises(error):
        def main():
            raise error
        return main
    R.run(raises(E.Diverged("the loss became nan at step 6")))
    R.run(raises(E.UserError("--dataset x: no such file")))
    assert left == [(2, "error: the loss became nan at step 6; the last good checkpoint (step 4) is out/x/checkpoint.pt; "
                        "lower --learning_rate or check the data"), (2, "error: --dataset x: no such file")]


# ----------------------------------------------------------------------------------------------------------------
# Models of the wrong kind
def test_a_language_model_is_no_reward_model_and_a_reward_model_no_language_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification
    with pytest.raises(E.UserError, match="has no trained score head: it is not a reward model"):
        M.load_reward_model(tiny_model_dir, CPU)
    for labels in (1, 2):
        AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=labels).save_pretrained(
            tmp_path / f"rm{labels}")
    with pytest.raises(E.UserError, match="has 2 labels: it is not a reward model"):
        M.load_reward_model(str(tmp_path / "rm2"), CPU)
    rm = M.load_reward_model(str(tmp_path / "rm1"), CPU)
    assert not rm.training and not any(p.requires_grad for p in rm.parameters())
    with pytest.raises(E.UserError, match="is a LlamaForSequenceClassification .*not a language model"):
        M.load_model(str(tmp_path / "rm1"), CPU)  # e.g. given as opd.py's --teacher


def test_weights_that_do_not_fit_their_config_are_refused(monkeypatch, tiny_model_dir, tmp_path):
    """Llama weights under a config.json that says gpt2 would load as a random GPT-2 (transformers
    only warns): every loaded model is refused, naming its folder. A new score head is allowed."""
    import shutil
    from transformers import AutoModelForSequenceClassification
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "gpt2",
                                                 "architectures": ["GPT2LMHeadModel"]}))
    message = f"{bad}: its weights do not fit the gpt2 model its config.json names"
    with pytest.raises(E.UserError, match=re.escape(message)):
        M.load_model(str(bad), CPU)
    with pytest.raises(E.UserError, match=re.escape(message)):
        M.load_frozen(str(bad), CPU)  # a reference or a teacher
    main_raises(monkeypatch, "sft", [*sft_args(str(bad), "arithmetic"), "--output_dir", tmp_path / "o"],
                re.escape(message))
    model, info = M.load_model(tiny_model_dir, CPU, cls=AutoModelForSequenceClassification,
                               num_labels=1, output_loading_info=True)  # ppo.py's value model
    assert info["missing_keys"] == {"score.weight"} or list(info["missing_keys"]) == ["score.weight"]


# ----------------------------------------------------------------------------------------------------------------
# Data as users bring it
def test_messages_as_users_write_them():
    tool_call = [{"type": "function", "function": {"name": "add", "arguments": "{\"a\": 1}"}}]
    msgs = F.conversation({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Add "}, {"type": "text", "text": "one."}]},
        {"role": "assistant", "content": None, "tool_calls": tool_call},
        {"role": "tool", "content": "2", "tool_call_id": "c1"},
        {"role": "assistant", "content": "Two."}]})
    assert msgs[0] == {"role": "user", "content": "Add one."}  # OpenAI-style content parts
    assert msgs[1] == {"role": "assistant", "content": "", "tool_calls": tool_call}  # kept for templates that use it
    assert msgs[2]["tool_call_id"] == "c1"
    for row, match in [({"messages": [{"role": "user", "content": None}]}, "role user has no content"),
                       ({"messages": [{"role": "bot", "content": "hi"}]}, "the role 'bot'; the roles are"),
                       ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "not text"),
                       ({"prompt": "p", "completion": "c", "label": False}, "a `label` column: unpaired preference")]:
        with pytest.raises(E.UserError, match=match):
            F.conversation(row)


def test_the_mask_is_immune_to_what_the_conversation_says(tok):
    def trained(user_text):
        ids, labels = C.tokenize_conversation(tok, [{"role": "user", "content": user_text},
                                                    {"role": "assistant", "content": "Fine."}], 256)
        return tok.decode([t for t in labels if t != C.IGNORE_INDEX])
    assert trained(f"say {C.MARKER} please") == trained("say please") == "Fine.<|im_end|>"


def test_unreadable_files_say_what_is_wrong(tmp_path):
    import reward_model
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", completion}\n')
    with pytest.raises(E.UserError, match="bad.jsonl: line 2 is not valid JSON"):
        D.load_data(str(tmp_path / "bad.jsonl"))
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "café", "completion": "b"}\n'.encode("latin-1"))
    with pytest.raises(E.UserError, match="latin1.jsonl is not UTF-8 text"):
        D.load_data(str(tmp_path / "latin1.jsonl"))
    with pytest.raises(E.UserError, match="row 3: `margin` 'high' is not a number"):
        reward_model.margin_of({"margin": "high"}, 3)
    assert reward_model.margin_of({"margin": None}, 0) == reward_model.margin_of({}, 0) == 0.0


def test_bad_rows_and_files_name_the_row_the_column_or_the_file(monkeypatch, tiny_model_dir, tmp_path):
    null = write_jsonl(tmp_path / "null.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": None, "completion": "b"}])
    main_raises(monkeypatch, "sft", [*sft_args(tiny_model_dir, null), "--output_dir", tmp_path / "o"],
                re.escape(f"{null}, row 1: `prompt` is null (a file that mixes row formats gets the other format's "
                          "columns as null: give every row the same columns)"))
    main_raises(monkeypatch, "grpo", ["--model", tiny_model_dir, "--dataset", null, "--output_dir", tmp_path / "o"],
                re.escape(f"{null}, row 1: `prompt` is null"))
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "a", "completion": "b"},
                                                   {"messages": [{"role": "user", "content": "x"},
                                                                 {"role": "assistant", "content": "y"}]}])
    main_raises(monkeypatch, "sft", [*sft_args(tiny_model_dir, mixed), "--output_dir", tmp_path / "o"],
                re.escape(f"{mixed}, row 0: the rows mix two formats (`messages`, and `prompt` with `completion`): "
                          "here `messages` is null; give every row the same columns"))
    (tmp_path / "plain.jsonl.gz").write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(E.UserError, match=r"plain.jsonl.gz is not a whole gzip file \(Not a gzipped file"):
        D.load_data(str(tmp_path / "plain.jsonl.gz"))
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": "a", "completion": "b"}])
    (folder / "test.jsonl").write_text("")
    with pytest.raises(E.UserError, match=re.escape(f"--dataset {folder}: its split 'test' has no rows (its files "
                                                    "for it are empty); fill them or choose another split with "
                                                    "--eval_split")):
        D.load_data(str(folder), "test", flag="--eval_split")
    # An unfinished run folder given as a model says where its model will be.
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(E.UserError, match=re.escape(f"--teacher {run} holds no model (no config.json); it is an "
                                                    "unfinished run, whose model is written when it finishes")):
        M.resolve_model(str(run), flag="--teacher")


def test_rl_prompts_without_a_ground_truth_are_dropped_and_counted(tok):
    rows = [{"prompt": "1+1?", "answer": "2"}, {"prompt": "Hi?"}, {"prompt": "2+2?", "answer": "4"}]
    prompts = D.Prompts("d", rows, tok, 512, need_answers="the accuracy reward")
    assert (len(prompts), prompts.unanswered, [prompts[i][2] for i in range(2)]) == (2, 1, ["2", "4"])
    assert len(D.Prompts("d", rows, tok, 512)) == 3  # no reward needs one: all kept
    with pytest.raises(E.UserError, match="no `answer` .* for the accuracy reward"):
        D.Prompts("d", rows[1:2], tok, 512, need_answers="the accuracy reward")


class _Payload:  # unpickled, it would create the file it names
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_crafted_fsdp_shard_folder_runs_nothing_on_resume(tmp_path):
    """--resume of an FSDP run reads checkpoint-N.dcp/ with torch.distributed.checkpoint, which
    unpickles its .metadata and its non-tensor items without restriction; ours admit only what DCP
    writes, so a crafted folder is refused before anything in it runs."""
    import pickle
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    folder = str(tmp_path / "checkpoint-1.dcp")
    weights, optimizer = get_state_dict(model, opt)
    dcp.save({"model": weights, "optimizer": optimizer}, checkpoint_id=folder)
    # a real folder loads back, param_groups (pickled plain data) included
    target = {"model": {k: torch.zeros_like(v) for k, v in weights.items()},
              "optimizer": get_state_dict(model, opt)[1]}
    dcp.load(target, storage_reader=R._safe_shard_reader(folder), planner=R._safe_load_planner())
    assert all(torch.equal(target["model"][k], v) for k, v in weights.items())
    # a crafted .metadata
    ran = tmp_path / "ran"
    with open(os.path.join(folder, ".metadata"), "wb") as f:
        pickle.dump(_Payload(ran), f)
    with pytest.raises(pickle.UnpicklingError, match="posix.system is not what a checkpoint holds"):
        R._safe_shard_reader(folder).read_metadata()  # what restore_state reads first
    with pytest.raises(BaseException):  # DCP's CheckpointException is one
        dcp.load(target, storage_reader=R._safe_shard_reader(folder), planner=R._safe_load_planner())
    assert not ran.exists()
    # a crafted non-tensor item
    import io
    planner = R._safe_load_planner()
    with pytest.raises(pickle.UnpicklingError):
        planner.load_bytes(None, io.BytesIO(pickle.dumps(_Payload(ran))))
    assert not ran.exists()


def test_lora_on_a_tied_output_layer_is_refused(monkeypatch, tiny_model_dir, tmp_path):
    """On a model whose lm_head is its input embedding (tied, as SmolLM2's), an adapter on lm_head
    would merge into both: the saved model would not be the trained one."""
    message = re.escape("--lora_target_modules q_proj,lm_head: embed_tokens and lm_head share one "
                        "weight (tied embeddings)")
    main_raises(monkeypatch, "sft", [*sft_args(tiny_model_dir, "arithmetic"), "--lora_r", "4",
                                     "--lora_target_modules", "q_proj,lm_head",
                                     "--output_dir", tmp_path / "o"], message)
    assert not (tmp_path / "o" / "config.json").exists()
    from types import SimpleNamespace
    lora = SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, load_in_4bit=False,
                           lora_target_modules="q_proj,v_proj", gradient_checkpointing=False)
    assert hasattr(M.add_lora(M.load_model(tiny_model_dir, CPU), lora), "peft_config")


def test_numbers_are_checked_against_the_model(monkeypatch, tiny_model_dir, tmp_path):
    # The tiny model has 2048 positions and layers 32 to 128 wide (k_proj/v_proj: 64 -> 32).
    out = ["--output_dir", tmp_path / "o"]
    main_raises(monkeypatch, "grpo", ["--model", tiny_model_dir, "--max_new_tokens", "1000000000", *out],
                re.escape("--max_prompt_length 512 + --max_new_tokens 1000000000 is above the 2048 positions of the "
                          f"model (max_position_embeddings in {tiny_model_dir}/config.json); lower it"))
    main_raises(monkeypatch, "sft", [*sft_args(tiny_model_dir, "arithmetic"), "--max_length", "4096", *out],
                re.escape("--max_length 4096 is above the 2048 positions of the model"))
    main_raises(monkeypatch, "dpo", ["--model", tiny_model_dir, "--max_new_tokens", "2049", *out],
                re.escape("--max_new_tokens 2049 is above the 2048 positions"))
    lora = [*sft_args(tiny_model_dir, "arithmetic"), *out, "--lora_r"]
    main_raises(monkeypatch, "sft", [*lora, "64"], re.escape("--lora_r 64 is above 32, the smallest width of the "
                                                             "adapted layers"))
    main_raises(monkeypatch, "sft", [*lora, "8", "--lora_target_modules", " , "],
                re.escape("--lora_target_modules ' , ': name the modules to adapt (q_proj,v_proj), or all-linear"))
    # a LoRA run's checkpoint-N/ (an adapter, with its tokenizer) given as the model to train
    from types import SimpleNamespace
    adapter = str(tmp_path / "checkpoint-3")
    M.add_lora(M.load_model(tiny_model_dir, CPU), SimpleNamespace(
        lora_r=4, lora_alpha=8, lora_dropout=0.0, load_in_4bit=False, lora_target_modules="q_proj",
        gradient_checkpointing=False)).save_pretrained(adapter)
    M.load_tokenizer(tiny_model_dir).save_pretrained(adapter)
    main_raises(monkeypatch, "sft", [*sft_args(adapter, "arithmetic"), *out],
                re.escape(f"--model {adapter} holds a LoRA adapter, not a model: train from its run's --output_dir"))
    assert not (tmp_path / "o" / "config.json").exists()


def test_yaml_config_keys_given_twice_are_refused_and_lists_are_comma_separated(tmp_path):
    sft = importlib.import_module("sft")
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 1.0e-3\nmax_steps: 3\nlearning_rate: 2.0e-3\n")
    with pytest.raises(E.UserError, match=re.escape(f"--config {config}: learning_rate is given "
                                                    "twice; keep one")):
        A.parse_args(sft.Args, ["--config", str(config)])
    config.write_text("lora_target_modules: [q_proj, v_proj]\nmax_steps: 3\nfsdp: false\n")
    args = A.parse_args(sft.Args, ["--config", str(config)])
    assert (args.lora_target_modules, args.max_steps, args.fsdp) == ("q_proj,v_proj", 3, False)


def test_a_chat_template_that_cannot_render_is_refused_at_load(tiny_model_dir, tmp_path):
    # Jinja's sandbox stops a template that reaches for Python internals; a template may also raise on its own.
    (tmp_path / "evil.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(E.UserError, match=r"--chat_template .*evil.jinja cannot render a user/assistant exchange "
                                          r"\(SecurityError: "):
        M.load_tokenizer(tiny_model_dir, chat_template=str(tmp_path / "evil.jinja"))
    (tmp_path / "raises.jinja").write_text("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(E.UserError, match=r"cannot render .*\(TemplateError: roles must alternate\); fix it"):
        M.load_tokenizer(tiny_model_dir, chat_template=str(tmp_path / "raises.jinja"))
    with pytest.raises(E.UserError, match="--chat_template nope.jinja: no such file"):
        M.load_tokenizer(tiny_model_dir, chat_template="nope.jinja")
