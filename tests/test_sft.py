"""sft.py end to end on a tiny random model with the real tokenizer: it learns, resumes exactly, runs under
torchrun, its loss does not depend on how a batch is split, and bad input gets a one-line error."""
import json
import os
import re
import sys

import pytest

from plumbing import errors as E
from conftest import ok, read_metrics, run_script, write_jsonl

ROWS = [{"messages": [{"role": "user", "content": f"Say the word number {i}."},
                      {"role": "assistant", "content": w}]}
        for i, w in enumerate(["apple", "banana pie", "cherry tart with cream", "dates", "elderberry wine, please",
                               "fig", "grape juice", "honeydew melon slices"])]


def sft(tiny_model_dir, out, *extra, nproc=1):
    args = ["--model", tiny_model_dir, "--output_dir", out, "--precision", "fp32", "--eval_generations", "0",
            "--warmup_steps", "0", "--save_every", "0", *extra]
    return run_script("sft.py", *args, nproc=nproc)


def test_sft_overfits_a_few_examples(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    out = str(tmp_path / "out")
    ok(sft(tiny_model_dir, out, "--dataset", data, "--eval_size", "0", "--max_steps", "100", "--batch_size", "8",
           "--micro_batch_size", "4", "--learning_rate", "1e-2"))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 101))  # no held-out set here, so no step-0 evaluation row
    for key in ("loss", "learning_rate", "grad_norm", "num_tokens", "tokens_per_second"):
        assert all(key in r for r in rows), key
    assert rows[0]["loss"] > 10  # the first batch before any update: random init, about ln(49152) = 10.8
    assert rows[-1]["loss"] < 0.05, [round(r["loss"], 3) for r in rows]  # memorised (0.006 when measured)
    # The output is an ordinary checkpoint that feeds the next stage.
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 64
    assert json.load(open(os.path.join(out, "args.json")))["learning_rate"] == 1e-2


def test_builtin_task_logs_eval_and_answer_metrics(tiny_model_dir, tmp_path):
    out = str(tmp_path / "out")
    proc = ok(sft(tiny_model_dir, out, "--max_steps", "2", "--batch_size", "4", "--micro_batch_size", "2",
                  "--eval_size", "4", "--eval_every", "1", "--eval_generations", "4", "--max_new_tokens", "8"))
    rows = read_metrics(out)
    assert {"eval_loss", "eval/boxed", "eval/accuracy"} <= set(rows[0]) and rows[0]["step"] == 0
    assert "eval_loss" in rows[1] and {"eval_loss", "eval/boxed", "eval/accuracy"} <= set(rows[2])
    assert "before training:" in proc.stdout and "after training:" in proc.stdout


def test_loss_does_not_depend_on_micro_batch_split(tiny_model_dir, tmp_path):
    """L_SFT's normaliser is the trained-token count of the whole batch: micro-batches of 1 or 4 (examples of
    different lengths) give the same loss and the same update; so does gradient checkpointing."""
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    runs = []
    for name, extra in [("m1", ["--micro_batch_size", 1]), ("m4", ["--micro_batch_size", 4]),
                        ("ckpt", ["--micro_batch_size", 2, "--gradient_checkpointing"])]:
        out = str(tmp_path / name)
        ok(sft(tiny_model_dir, out, "--dataset", data, "--eval_size", "0", "--max_steps", "3", "--batch_size", "4",
               "--learning_rate", "1e-3", *extra))
        runs.append(read_metrics(out))
    for rows in runs[1:]:
        for a, b in zip(runs[0], rows):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    # A per-micro-batch mean (the common bug) weights the examples differently and would not match.
    assert len({round(r["loss"], 6) for r in runs[0]}) == 3


def test_mixture_of_a_file_and_the_builtin_task(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": r["messages"][0]["content"],
                                              "completion": r["messages"][1]["content"]} for r in ROWS])
    out = str(tmp_path / "out")
    proc = ok(sft(tiny_model_dir, out, "--dataset", f"{data},arithmetic", "--dataset_weights", "1,3", "--eval_size", "2",
                  "--max_steps", "2", "--batch_size", "4", "--micro_batch_size", "4"))
    assert f"data: {data}: 6 examples" in proc.stdout  # 8 rows, 2 held out
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2]


def test_resume_reproduces_an_uninterrupted_run(tiny_model_dir, tmp_path):
    common = ["--max_steps", "6", "--batch_size", "4", "--micro_batch_size", "2", "--eval_size", "4",
              "--eval_every", "2", "--learning_rate", "1e-3", "--warmup_steps", "2"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    ok(sft(tiny_model_dir, full, *common))
    proc = ok(sft(tiny_model_dir, part, *common, "--stop_after_steps", "3"))
    assert "continue with --resume" in proc.stdout
    assert not os.path.exists(os.path.join(part, "config.json"))  # an unfinished run does not look complete
    ok(sft(tiny_model_dir, part, *common, "--resume"))
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b] == list(range(0, 7))
    for ra, rb in zip(a, b):
        for k in ("loss", "eval_loss", "grad_norm", "learning_rate"):
            if k in ra:
                assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-9), (ra["step"], k)
    import torch
    from safetensors.torch import load_file
    wa, wb = load_file(os.path.join(full, "model.safetensors")), load_file(os.path.join(part, "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_torchrun_two_processes_match_one(tiny_model_dir, tmp_path):
    """DDP over 2 gloo ranks trains on the same batches with the same global normalisation as one process."""
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    common = ["--dataset", data, "--eval_size", "0", "--max_steps", "3", "--batch_size", "4", "--micro_batch_size", "2",
              "--learning_rate", "1e-3"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    ok(sft(tiny_model_dir, one, *common))
    proc = ok(sft(tiny_model_dir, two, *common, nproc=2))
    assert proc.stdout.count("saved the model") == 1  # only rank 0 prints and saves
    for a, b in zip(read_metrics(one)[1:], read_metrics(two)[1:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    assert os.path.isfile(os.path.join(two, "model.safetensors"))


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2, no traceback, no output that looks complete
def test_bad_input_is_one_line_without_traceback(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "response": "r"}] * 4)
    out = str(tmp_path / "out")
    proc = sft(tiny_model_dir, out, "--dataset", data, "--eval_size", "0")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert lines == [f"error: {data}, row 0: columns found: ['question', 'response']; expected `messages` (a list of "
                     "{role, content}) or `prompt` and `completion`"], proc.stderr
    assert not os.path.exists(os.path.join(out, "config.json"))


def main_raises(monkeypatch, argv, match):
    """Run sft.main() in this process with the given arguments and expect a UserError (what runs.run prints)."""
    import sft
    monkeypatch.setattr(sys, "argv", ["sft.py", "--precision", "fp32", "--eval_generations", "0", *map(str, argv)])
    with pytest.raises(E.UserError, match=match):
        sft.main()


def test_bad_inputs(monkeypatch, tiny_model_dir, tmp_path):
    out = str(tmp_path / "out")
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    base = ["--model", tiny_model_dir, "--output_dir", out]
    main_raises(monkeypatch, [*base, "--dataset", str(empty)], "is empty")
    main_raises(monkeypatch, [*base, "--dataset", str(tmp_path / "nope.jsonl")], "no such file")
    main_raises(monkeypatch, ["--model", str(tmp_path / "nope"), "--output_dir", out], "no such file or folder")
    main_raises(monkeypatch, ["--model", str(tmp_path / "nope.gguf"), "--output_dir", out], "no such file or folder")
    main_raises(monkeypatch, [*base, "--dataset", data, "--eval_size", "0", "--max_length", "8"],
                "--max_length 8 leaves no assistant token in any example")
    main_raises(monkeypatch, [*base, "--batch_size", "6", "--micro_batch_size", "4"], r"must be a multiple of --micro_batch_size x ranks \(4 x 1\)")
    main_raises(monkeypatch, [*base, "--dataset", "arithmetic,arithmetic", "--dataset_weights", "1"], "needs 2 non-negative")
    main_raises(monkeypatch, [*base, "--resume"], "no checkpoint at")
    main_raises(monkeypatch, [*base, "--device", "tpu"], "--device tpu")
    main_raises(monkeypatch, [*base, "--bogus", "1"], "unknown arguments: --bogus 1; see --help")
    main_raises(monkeypatch, [*base, "--dataset", data, "--eval_split", "test"], "a local file has one split")
    assert not os.path.exists(os.path.join(out, "config.json"))


def test_tokenizer_without_chat_template(monkeypatch, tiny_model_dir, tmp_path):
    import shutil
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    for f in ("chat_template.jinja",):
        if (bare / f).exists():
            (bare / f).unlink()
    cfg = json.load(open(bare / "tokenizer_config.json"))
    cfg.pop("chat_template", None)
    json.dump(cfg, open(bare / "tokenizer_config.json", "w"))
    main_raises(monkeypatch, ["--model", str(bare), "--output_dir", str(tmp_path / "o")],
                "has no chat template; pass --chat_template")


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tiny_model_dir, tmp_path):
    out = str(tmp_path / "out")
    proc = sft(tiny_model_dir, out, "--eval_size", "4", "--max_steps", "20", "--batch_size", "2",
               "--micro_batch_size", "2", "--learning_rate", "1e30", "--save_every", "1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert re.search(r"^error: the (loss|weights) became (nan|inf)", proc.stderr, re.M), proc.stderr[-500:]
    assert not os.path.exists(os.path.join(out, "config.json"))  # no final model
    import torch
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["step"] >= 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_chatml_template_on_a_base_tokenizer_adds_its_tokens_and_learns_to_stop(tmp_path):
    # A pretrained base model: a byte-level BPE tokenizer with no chat template and no ChatML tokens (EOS
    # <|endoftext|>). `--chat_template chatml` adds <|im_start|> and <|im_end|>, grows the embeddings, trains the
    # end of turn, and the output stops at <|im_end|>, which is not the tokenizer's EOS.
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    import common as C
    from plumbing import models as M
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    text = [m["content"] for r in ROWS for m in r["messages"]] + ["user assistant system"]
    bpe.train_from_iterator(text * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    base_dir = str(tmp_path / "base")
    base = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    base.save_pretrained(base_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(base), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, eos_token_id=base.eos_token_id,
                                 tie_word_embeddings=True)).save_pretrained(base_dir)
    with pytest.raises(E.UserError, match="lacks <|im_start|> and <|im_end|>; start from a model that sft.py"):
        M.load_tokenizer(base_dir, chat_template="chatml")  # what dpo/grpo/ppo/opd say: no new, untrained rows
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    out = str(tmp_path / "out")
    ok(sft(base_dir, out, "--chat_template", "chatml", "--dataset", data, "--eval_size", "0", "--max_steps", "60",
           "--batch_size", "8", "--learning_rate", "1e-2"))
    tok = M.load_tokenizer(out)  # the template and the tokens were saved with the model
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert len(tok) == len(base) + 2 and im_end >= len(base) and tok.stop_ids == (im_end, base.eos_token_id)
    model = M.load_model(out, C.Runtime(torch.device("cpu"), torch.float32))
    assert model.get_input_embeddings().num_embeddings == len(tok)
    prompt = C.encode_prompts(tok, [ROWS[1]["messages"][:1]])
    [ids] = C.generate_ids(model, tok, prompt, C.Runtime(torch.device("cpu"), torch.float32), max_new_tokens=30)
    assert tok.decode(ids) == "banana pie<|im_end|>"  # the trained answer, then the end of the turn
