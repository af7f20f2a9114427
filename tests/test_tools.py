"""tools.py and grpo.py --tools: the calculator by hand (and never eval), every bad call returned to the model as
text and counted, the tools described to templates with and without a tools argument, the environment's tokens
after an end of turn, a scripted two-call episode token by token, grpo.py's loss and gradient over the policy's
tokens only, and a tiny-model run whose tool-call rate rises."""
import builtins
import json
import re

import pytest
import torch

import common as C
import grpo
import tools
from plumbing import errors as E
from conftest import PETS, ok, read_metrics, run_script, teach_answers, write_jsonl


@pytest.mark.parametrize("expression, value", [
    ("2 + 3 * 4", "14"), ("(2 + 3) * 4", "20"), ("2 * (3 + 4) - 5", "9"), ("100 - 20 - 30", "50"),
    ("7 / 2", "3.5"), ("1 / 3", "0.333333"), ("-3 + 5", "2"), ("2 * -3", "-6"), ("12 x 3", "36"), ("8 ÷ 4", "2"),
    ("456 * 7 + 89", "3281"), ("1.5 * 4", "6"), (" ( ( 1 ) ) ", "1"), ("24 / 4 / 2", "3")])
def test_the_calculator_by_hand(expression, value):
    assert tools.calculator(expression) == value


@pytest.mark.parametrize("expression, error", [
    ("10 / (5 - 5)", "division by zero"), ("2 +", "ends too early"), ("(1 + 2", "not closed"), ("", "empty"),
    ("2 ** 3", "unexpected '*'"), ("1 2", "after a complete expression"), ("__import__('os')", "unexpected '_'"),
    ("2 ^ 3", "unexpected '^'"), ("1" * 201, "longer than 200"), ("(" * 60 + "1" + ")" * 60, "too deeply nested")])
def test_the_calculator_refuses_what_it_cannot_read(expression, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        tools.calculator(expression)


def test_the_calculator_never_evaluates_python(monkeypatch):
    def no(*a, **kw):
        raise AssertionError("eval or exec was called")
    monkeypatch.setattr(builtins, "eval", no)
    monkeypatch.setattr(builtins, "exec", no)
    assert tools.calculator("(123 + 456) * 7") == "4053"


TOOL_FILE = '''
import time

def lookup(word: str, times: int = 1) -> str:
    """Looks a word up.

    Args:
        word: The word.
        times: How often.
    """
    return word.upper() * times

def broken(x: int) -> int:
    """Always fails.

    Args:
        x: Anything.
    """
    raise RuntimeError("out of order")

def slow() -> str:
    """Never answers in time."""
    time.sleep(30)
    return "late"

def undocumented(x):
    return x
'''


@pytest.fixture
def toolbox(tmp_path):
    path = tmp_path / "my_tools.py"
    path.write_text(TOOL_FILE)
    return tools.Tools(f"calculator,{path}:lookup,broken,slow", timeout=0.5)


def call(box, name, **arguments):
    return box.call(json.dumps({"name": name, "arguments": arguments}))


def test_each_bad_call_returns_its_error_to_the_model(toolbox):
    assert call(toolbox, "calculator", expression="6 * 7") == ({"role": "tool", "name": "calculator", "content": "42"}, False)
    assert call(toolbox, "lookup", word="ab", times=2)[0]["content"] == "ABAB"
    cases = [
        (toolbox.call('{"name": "calculator", "arguments": {"expression": "1 +'), "not valid JSON"),
        (toolbox.call('["calculator"]'), 'a tool call is {"name": ..., "arguments": {...}}'),
        (call(toolbox, "search", q="x"), "no tool named 'search'; the tools are calculator, lookup, broken, slow"),
        (call(toolbox, "lookup"), "lookup takes word, times; missing: word"),
        (call(toolbox, "lookup", word="a", colour="red"), "unknown: colour"),
        (call(toolbox, "lookup", word=3), "lookup: word must be string, got int"),
        (call(toolbox, "lookup", word="a", times=True), "times must be integer, got bool"),
        (call(toolbox, "lookup", word="a", times=1.5), "times must be integer, got float"),
        (call(toolbox, "calculator", expression="1 / 0"), "error: division by zero"),
        (call(toolbox, "broken", x=1), "error: out of order"),
        (call(toolbox, "slow"), "error: slow ran past 0.5 s and was stopped"),
    ]
    for (message, failed), error in cases:
        assert failed and message["role"] == "tool" and message["content"].startswith("error: "), message
        assert error in message["content"], (error, message)


def test_tools_that_cannot_be_described_are_refused(tmp_path):
    path = tmp_path / "my_tools.py"
    path.write_text(TOOL_FILE)
    with pytest.raises(E.UserError, match=r"--tools: undocumented has no JSON schema .*type hints and a docstring"):
        tools.Tools(f"{path}:undocumented")
    with pytest.raises(E.UserError, match="--tools search: not a built-in tool"):
        tools.Tools("search")
    with pytest.raises(E.UserError, match="has no function 'nope'"):
        tools.Tools(f"{path}:nope")


def test_the_tools_are_described_in_the_system_prompt_or_by_the_template(tok):
    box = tools.Tools("calculator")
    user = [{"role": "user", "content": "What is 2 + 2?"}]
    msgs, kw = box.prompt(tok, user)  # SmolLM2's template does not render tools: the system prompt does
    assert kw == {} and msgs[1:] == user and msgs[0]["role"] == "system"
    assert '<tool_call>{"name": <tool name>' in msgs[0]["content"]
    assert json.dumps(box.schemas[0]) in msgs[0]["content"] and '"expression"' in msgs[0]["content"]
    msgs, _ = box.prompt(tok, [{"role": "system", "content": "Be brief."}] + user)
    assert msgs[0]["content"].endswith("\n\nBe brief.") and len(msgs) == 2
    # a template that renders the tools itself gets them as its `tools` argument
    import copy
    tok2 = copy.deepcopy(tok)
    tok2.chat_template = ("{% if tools %}TOOLS:{{ tools | tojson }}\n{% endif %}{% for m in messages %}<|im_start|>"
                          "{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
                          "<|im_start|>assistant\n{% endif %}")
    msgs, kw = tools.Tools("calculator").prompt(tok2, user)
    assert msgs == user and kw == {"tools": box.schemas}
    assert '"name": "calculator"' in tok2.apply_chat_template(msgs, tokenize=False, **kw)


def test_the_environment_tokens_after_an_end_of_turn(tok):
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tools.env_ids(tok, [{"role": "tool", "name": "calculator", "content": "42"}], end, {})
    assert tok.decode(ids) == "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"


def scripted(turns):
    """A sampler that writes the given texts, one per call for each prompt, with log-prob -1 per token."""
    calls = []

    def sample(model, tok, prompt_ids, rt, max_new_tokens, batch_size, temperature, top_p, return_logprobs):
        calls.append([list(p) for p in prompt_ids])
        end = tok.convert_tokens_to_ids("<|im_end|>")
        out = [(tok(turns[len(calls) - 1], add_special_tokens=False)["input_ids"] + [end])[:max_new_tokens]
               for _ in prompt_ids]
        return out, [[-1.0] * len(y) for y in out]
    return sample, calls


def test_a_two_call_episode_token_by_token(tok):
    box = tools.Tools("calculator")
    first = '<tool_call>{"name": "calculator", "arguments": {"expression": "12 * 3"}}</tool_call>'
    second = 'Then <tool_call>{"name": "calculator", "arguments": {"expression": "36 +"}}</tool_call>'
    answer = "The answer is \\boxed{40}."
    sample, contexts = scripted([first, second, answer])
    prompt = C.encode_prompts(tok, [box.prompt(tok, [{"role": "user", "content": "12 * 3 + 4?"}])[0]])[0]
    rt = C.Runtime(torch.device("cpu"), torch.float32)
    [e] = tools.episodes(sample, None, tok, [prompt], box, {}, rt, 200, 8, 1.0, 1.0, max_calls=4)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    policy = [tok(t, add_special_tokens=False)["input_ids"] + [end] for t in (first, second, answer)]
    env = [tok("\n<|im_start|>tool\n" + r + "<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
           for r in ("36", "error: the expression ends too early")]
    assert e["ids"] == policy[0] + env[0] + policy[1] + env[1] + policy[2]  # the sampled ids, as sampled
    assert e["policy"] == [1] * len(policy[0]) + [0] * len(env[0]) + [1] * len(policy[1]) + [0] * len(env[1]) + [1] * len(policy[2])
    assert e["logps"] == [-1.0 if p else 0.0 for p in e["policy"]]
    # each turn is sampled from the whole context so far, tool results included
    assert contexts == [[prompt], [prompt + policy[0] + env[0]], [prompt + policy[0] + env[0] + policy[1] + env[1]]]
    assert (e["calls"], e["failures"], e["turns"]) == (2, 1, 3)
    assert [m["role"] for m in e["messages"]] == ["assistant", "tool", "assistant", "tool", "assistant"]
    assert e["messages"][1]["content"] == "36" and e["text"].endswith(answer)
    # --max_tool_calls 1: the second call is not run, and the episode ends there
    sample, _ = scripted([first, second, answer])
    [e] = tools.episodes(sample, None, tok, [prompt], box, {}, rt, 200, 8, 1.0, 1.0, max_calls=1)
    assert e["ids"] == policy[0] + env[0] + policy[1] and e["calls"] == 1
    # no room left after the tool result: it is not appended, the episode ends (the call is counted)
    sample, _ = scripted([first, second, answer])
    [e] = tools.episodes(sample, None, tok, [prompt], box, {}, rt, len(policy[0]) + 3, 8, 1.0, 1.0, max_calls=4)
    assert e["ids"] == policy[0] and e["calls"] == 1 and e["policy"] == [1] * len(policy[0])


def test_grpo_trains_only_on_the_policys_tokens(tok, tiny_model_dir):
    # Two episodes of one group with tool results inside; the loss and its gradient through grpo.py's batch layout
    # equal a direct computation: each sequence alone, unpadded, the policy's tokens only (1/|y_i| over them).
    from types import SimpleNamespace
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    prompt = C.encode_prompts(tok, [[{"role": "user", "content": "12 * 3 + 4?"}]])[0]
    episodes = [(list(torch.randint(100, 1000, (7,))), [1, 1, 1, 0, 0, 1, 1]), (list(torch.randint(100, 1000, (4,))), [1, 0, 1, 1])]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    episodes = [(ids + [end], policy + [1]) for ids, policy in episodes]
    groups = [{"prompt_ids": [prompt, prompt], "completion_ids": [i for i, _ in episodes], "policy": [p for _, p in episodes],
               "sampled_logp": [[0.0] * len(i) for i, _ in episodes]}]
    args = SimpleNamespace(mask_truncated_completions=False)
    b = grpo.as_tensors(groups, tok, args, torch.device("cpu"))
    assert b["mask"].tolist() == [[1, 1, 1, 0, 0, 1, 1, 1], [1, 0, 1, 1, 1, 0, 0, 0]]
    assert b["lengths"].tolist() == [6, 4]  # the policy's tokens
    rt = C.Runtime(torch.device("cpu"), torch.float32)
    A = torch.tensor([1.0, -1.0])
    logp, _ = C.completion_logprobs(model, b["P"], b["P_mask"], b["Y"], b["Y_mask"], rt)
    with torch.no_grad():
        ref = logp + 0.0  # the reference is the policy: k3 = 0
    loss, kl, _, _ = grpo.per_token_loss(logp, logp.detach(), ref, A, 0.2, 0.2, 0.1, b["mask"])
    assert torch.all(kl == 0)
    total = grpo.aggregate(loss, b["mask"], "grpo", 2, b["mask"].sum(), 8)
    total.backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    direct = 0
    for (ids, policy), a in zip(episodes, A):
        x = torch.tensor([prompt + ids])
        lp = torch.log_softmax(model(x).logits[0, len(prompt) - 1 : -1].float(), -1).gather(-1, torch.tensor(ids)[:, None])[:, 0]
        keep = torch.tensor(policy, dtype=torch.bool)
        direct = direct - a * torch.exp(lp[keep] - lp[keep].detach()).sum() / keep.sum() / 2  # ratio exactly 1
    assert total.item() == pytest.approx(direct.item(), abs=1e-6)
    direct.backward()
    for g, p in zip(ours, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


PET_TOOL = '''
def pet() -> str:
    """Names a pet."""
    return "cat"

def found(completions, **kw):  # 1 where a tool answered: the episode used the tool
    return [float(any(m["role"] == "tool" and m["content"] == "cat" for m in c)) for c in completions]
'''


def test_the_tool_call_rate_rises_when_the_reward_needs_the_tool(tok, tiny_model_dir, tmp_path):
    # A tiny model that calls the tool about half the time; the reward is 1 only for episodes that got its answer.
    box_file = tmp_path / "pet_tools.py"
    box_file.write_text(PET_TOOL)
    box = tools.Tools(f"{box_file}:pet")
    import tasks
    prompt, _ = box.prompt(tok, tasks.rl_prompt(PETS))  # the prompt grpo.py will sample from
    model = teach_answers(tok, tiny_model_dir, tmp_path / "caller",
                          ['<tool_call>{"name": "pet", "arguments": {}}</tool_call>', "dog dog", "cat dog", "dog cat"],
                          prompt, steps=150)
    data = write_jsonl(tmp_path / "pets.jsonl", [PETS] * 16)
    out = str(tmp_path / "out")
    ok(run_script("grpo.py", "--model", model, "--output_dir", out, "--dataset", data, "--eval_size", "0",
                  "--precision", "fp32", "--batch_size", "2", "--num_generations", "8", "--max_new_tokens", "40",
                  "--learning_rate", "2e-3", "--reward_funcs", f"{box_file}:found", "--tools", f"{box_file}:pet",
                  "--save_every", "0", "--no_dynamic_sampling", "--beta", "0", "--max_steps", "10",
                  "--log_completions_every", "1"))
    rows = read_metrics(out)
    for key in ("tools/call_frequency", "tools/failure_frequency", "tools/episodes_with_call", "tools/turns"):
        assert all(key in r for r in rows), key
    rate = [r["tools/episodes_with_call"] for r in rows]  # the first step's: the start model's
    assert sum(rate[-3:]) / 3 > rate[0] + 0.3 and sum(rate[-3:]) / 3 > 0.6, [round(x, 2) for x in rate]
    # the reward is the share of episodes the tool answered: at most those with a call (a garbled one fails)
    assert all(r["reward"] <= r["tools/episodes_with_call"] + 1e-6 for r in rows)
    reward = [r["reward"] for r in rows]  # the tiny model garbles some calls: those fail, are counted, score 0
    assert sum(reward[-3:]) / 3 > reward[0] + 0.2, [round(x, 2) for x in reward]
    samples = [json.loads(l) for l in open(f"{out}/completions.jsonl")]
    episode = next(s["completion"] for s in samples if isinstance(s["completion"], list) and len(s["completion"]) > 1)
    assert episode[1] == {"role": "tool", "name": "pet", "content": "cat"}  # the whole episode is logged


def test_arithmetic_tools_demonstrations_teach_what_grpo_parses(tok):
    import sft
    import tasks
    rows = [tasks.BUILTIN_TASKS["arithmetic_tools"]("train")[i] for i in range(64)]
    calls = [r for r in rows if len(r["completion"]) == 3]  # half call the calculator, half answer at once
    assert 20 <= len(calls) <= 44 and all(len(r["completion"]) == 1 for r in rows if r not in calls)
    direct = next(r for r in rows if r not in calls)
    messages, kw = sft.with_tools(direct, tok)
    ids, labels = C.tokenize_conversation(tok, messages, 512, **kw)
    trained = tok.decode([t for t, l in zip(ids, labels) if l != C.IGNORE_INDEX])
    assert '"name": "calculator"' in messages[0]["content"]  # the tool described there too
    assert trained == f"The answer is \\boxed{{{direct['answer']}}}.<|im_end|>"
    row = calls[0]
    expression = row["completion"][0]["tool_calls"][0]["function"]["arguments"]["expression"]
    assert row["completion"][1]["content"] == tools.calculator(expression) == row["answer"]
    messages, kw = sft.with_tools(row, tok)  # SmolLM2: the tools in the system prompt, the call in the content
    assert kw == {} and messages[0]["role"] == "system" and '"name": "calculator"' in messages[0]["content"]
    assert messages[0]["content"] == tools.Tools("calculator").prompt(tok, [])[0][0]["content"]  # as grpo.py --tools
    ids, labels = C.tokenize_conversation(tok, messages, 512, **kw)
    trained = tok.decode([t for t, l in zip(ids, labels) if l != C.IGNORE_INDEX])
    call = f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{expression}"}}}}</tool_call>'
    assert trained == f"{call}<|im_end|>The answer is \\boxed{{{row['answer']}}}.<|im_end|>"  # not the result
    [parsed] = tools.TOOL_CALL.findall(trained)
    assert tools.Tools("calculator").call(parsed) == ({"role": "tool", "name": "calculator", "content": row["answer"]}, False)
