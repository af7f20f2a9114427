"""Fixtures: the real SmolLM2 tokenizer (from the embedded model, converted offline once) and a tiny
random-initialised Llama that uses it, so every test runs on 2 CPU cores in seconds."""
import json
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # never wait on the Hub; the embedded model is the offline default
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pytest
import torch

import common as C
from plumbing import models as M


@pytest.fixture(scope="session")
def default_model_dir():
    return M.resolve_model(M.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tok(default_model_dir):
    return M.load_tokenizer(default_model_dir)


def tiny_llama(tok, path, hidden_size=64, num_attention_heads=4, num_key_value_heads=2):
    """A random-initialised 2-layer Llama with the real tokenizer, saved to path (seeded: the same weights each
    time)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=num_attention_heads,
                         num_key_value_heads=num_key_value_heads, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tok):
    return tiny_llama(tok, tmp_path_factory.mktemp("tiny"))


PETS = {"prompt": "Name six pets.", "answer": "cat"}
RULES = '''
def cats(completions, **kw):  # the share of the words that are "cat"
    return [sum(w == "cat" for w in c.split()) / max(1, len(c.split())) for c in completions]

def picky(completions, **kw):  # fails on every batch, and on completions that start with "dog"
    if len(completions) > 1 or completions[0].split()[:1] == ["dog"]:
        raise ValueError("picky")
    return [1.0]
'''


def teach_words(tok, tiny_model_dir, path, words):
    """The tiny model taught (by a short SFT in-process) to answer 'Name six pets.' with six words, each drawn at
    random from `words`."""
    import random
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rng = random.Random(0)
    rows = [C.tokenize_conversation(tok, [{"role": "user", "content": PETS["prompt"]},
                                          {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(6))}], 64)
            for _ in range(32)]
    x, _ = C.pad([r[0] for r in rows], tok.pad_token_id)
    y, _ = C.pad([r[1] for r in rows], C.IGNORE_INDEX)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(x).logits[:, :-1].flatten(0, 1), y[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def teach_answers(tok, tiny_model_dir, path, answers, prompt, steps=100):
    """The tiny model taught (by a short SFT in-process: `steps` full-batch Adam steps, the logits computed at the
    answer's tokens only) to answer `prompt` (a message list) with the `answers`, 32 rows in turn."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = [C.tokenize_conversation(tok, prompt + [{"role": "assistant", "content": a}], 512)
            for a in (answers * 32)[:32]]
    x, _ = C.pad([r[0] for r in rows], tok.pad_token_id)
    y, _ = C.pad([r[1] for r in rows], C.IGNORE_INDEX)
    keep = y[:, 1:] != C.IGNORE_INDEX
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        hidden = model.model(x).last_hidden_state[:, :-1][keep]
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden), y[:, 1:][keep])
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def pets_model(tok, tiny_model_dir, tmp_path_factory):
    """'cat' or 'dog' at random: its samples vary, so a reward that prefers cats has something to choose from."""
    return teach_words(tok, tiny_model_dir, tmp_path_factory.mktemp("pets"), ["cat", "dog"])


@pytest.fixture(scope="session")
def cats_model(tok, tiny_model_dir, tmp_path_factory):
    """Only 'cat': a teacher for the pets model to move towards."""
    return teach_words(tok, tiny_model_dir, tmp_path_factory.mktemp("cats"), ["cat"])


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def run_script(script, *args, nproc=1, timeout=600):
    """Run a script as a user would; returns the CompletedProcess (stdout+stderr captured)."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + os.getpid() % 1000), os.path.join(ROOT, script), *map(str, args)]
    else:
        cmd = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


def ok(proc):
    """Assert that a run_script process succeeded, showing its output's tail when it did not."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
