"""The rollout sampler (common.generate_ids): the distribution it draws from is exactly softmax(logits / T) (with
top-p where asked), its log-probs are the training forward's, completions stop after their first EOS, and nothing
in a checkpoint's generation_config.json changes what is sampled."""
import math

import pytest
import torch

import common as C
from plumbing import models as M
from conftest import PETS

FP32 = C.Runtime(torch.device("cpu"), torch.float32)


def test_sample_tokens_follows_softmax_over_temperature_and_top_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(200_000, 1)
    torch.manual_seed(0)
    freq = torch.bincount(C.sample_tokens(logits, temperature=1.0), minlength=4).float() / len(logits)
    assert freq.tolist() == pytest.approx(probs.tolist(), abs=4e-3)
    # T = 2: p ∝ sqrt(p) = [0.7071, 0.5477, 0.3873, 0.2236] / 1.8657
    freq = torch.bincount(C.sample_tokens(logits, temperature=2.0), minlength=4).float() / len(logits)
    assert freq.tolist() == pytest.approx([0.3790, 0.2936, 0.2076, 0.1198], abs=4e-3)
    # top_p 0.7: the mass before the second token (0.5) is under 0.7, before the third (0.8) is not: keep two,
    # renormalised to 0.5 / 0.8 and 0.3 / 0.8.
    freq = torch.bincount(C.sample_tokens(logits, temperature=1.0, top_p=0.7), minlength=4).float() / len(logits)
    assert freq.tolist() == pytest.approx([0.625, 0.375, 0.0, 0.0], abs=4e-3)
    # top_p smaller than the first token's mass keeps that one token; temperature 0 is the argmax.
    assert set(C.sample_tokens(logits[:1000], 1.0, top_p=0.1).tolist()) == {0}
    assert C.sample_tokens(torch.tensor([[0.0, 2.0, 1.0]]), temperature=0).tolist() == [1]


def prompts_of(tok):
    """Prompts of different lengths (left padding), a repeated one (a GRPO group, prefilled once), and the pets
    prompt the pets model answers in six words and EOS (rows that finish early and leave the batch)."""
    pets = C.encode_prompts(tok, [[{"role": "user", "content": PETS["prompt"]}]])[0]
    other = C.encode_prompts(tok, [[{"role": "user", "content": "What is 12 + 30? Put the final answer in \\boxed{}."}]])[0]
    return [pets, pets, other, pets[:5], pets]


def test_greedy_equals_transformers_generate(tok, pets_model):
    # The KV cache, position ids under left padding, shared prefills and rows leaving the batch change nothing:
    # greedy completions are token for token those of transformers' own generate, each prompt alone.
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(pets_model).eval()
    prompts = prompts_of(tok)
    ours = C.generate_ids(model, tok, prompts, FP32, max_new_tokens=12, batch_size=8)
    for p, mine in zip(prompts, ours):
        ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)[0, len(p) :].tolist()
        if tok.eos_token_id in ref:
            ref = ref[: ref.index(tok.eos_token_id) + 1]
        assert mine == ref
    assert any(r[-1] == tok.eos_token_id for r in ours) and any(len(r) == 12 for r in ours)  # both cases happen


def test_completions_stop_after_their_first_eos(tok, pets_model):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(pets_model)
    torch.manual_seed(0)
    ids = C.generate_ids(model, tok, prompts_of(tok) * 4, FP32, max_new_tokens=10, batch_size=8, temperature=1.0)
    eos = tok.eos_token_id
    for row in ids:
        assert eos not in row[:-1]  # the first EOS ends the completion and is kept: the stop action is trained
        assert row[-1] == eos or len(row) == 10  # otherwise it hit the length limit (truncated)
    assert {row[-1] == eos for row in ids} == {True, False}
    Y, mask = C.pad(ids, tok.pad_token_id)
    assert mask.sum(1).tolist() == [len(r) for r in ids]


def test_sampler_logprobs_equal_the_training_forward(tok, pets_model):
    # fp32: the log-prob the sampler saw for each token is the one completion_logprobs computes for it in
    # training (the layout of a whole batch: prompts left-padded, completions right-padded).
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(pets_model)
    prompts = prompts_of(tok)
    torch.manual_seed(1)
    ids, logps = C.generate_ids(model, tok, prompts, FP32, 12, batch_size=3, temperature=0.7, return_logprobs=True)
    P, Pm = C.pad(prompts, tok.pad_token_id, side="left")
    Y, Ym = C.pad(ids, tok.pad_token_id)
    with torch.no_grad():
        train, _ = C.completion_logprobs(model, P, Pm, Y, Ym, FP32, temperature=0.7)
    for i, lp in enumerate(logps):
        assert len(lp) == len(ids[i])
        assert lp == pytest.approx(train[i, : len(lp)].tolist(), abs=1e-5)
    assert min(min(lp) for lp in logps) < math.log(0.9)  # the test sampled tokens that were not certain


def test_sampling_is_reproducible_with_a_seed(tok, pets_model):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(pets_model)
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(C.generate_ids(model, tok, prompts_of(tok), FP32, 10, batch_size=4, temperature=1.0))
    assert runs[0] == runs[1]  # the same seed samples the same tokens
    assert runs[0] != runs[2]  # and another seed other ones: the sampler does draw from the seeded RNG


def test_generation_config_does_not_change_what_is_sampled(tok, pets_model, tmp_path):
    # A checkpoint whose generation_config.json asks for a repetition penalty, an n-gram ban and min-p (as some
    # instruct models ship) samples the same tokens as without it: RL computes every ratio and KL against
    # softmax(logits / T), so that is what must be sampled.
    from transformers import AutoModelForCausalLM, GenerationConfig
    plain = AutoModelForCausalLM.from_pretrained(pets_model)
    odd = AutoModelForCausalLM.from_pretrained(pets_model)
    odd.generation_config = GenerationConfig(do_sample=True, repetition_penalty=5.0, no_repeat_ngram_size=1, min_p=0.5, top_k=2,
                                             temperature=0.1, eos_token_id=tok.eos_token_id)
    odd.save_pretrained(tmp_path)
    odd = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert odd.generation_config.repetition_penalty == 5.0
    for temperature in (0.0, 1.0):
        runs = []
        for m in (plain, odd):
            torch.manual_seed(4)
            runs.append(C.generate_ids(m, tok, prompts_of(tok) * 2, FP32, 12, batch_size=10, temperature=temperature))
        assert runs[0] == runs[1]
    # The samples repeat tokens, which no_repeat_ngram_size=1 would have forbidden had it been applied.
    assert any(len(set(r[:-1])) < len(r[:-1]) for r in runs[1])


def test_frozen_model_gives_the_autocast_outputs(tiny_model_dir):
    # freeze() stores the linear weights in bf16; under bf16 autocast the outputs are those of the fp32 model,
    # because autocast casts the same weights to the same bf16 values at every call.
    from transformers import AutoModelForCausalLM
    bf16 = C.Runtime(torch.device("cpu"), torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    frozen = M.freeze(AutoModelForCausalLM.from_pretrained(tiny_model_dir), bf16)
    assert frozen.lm_head.weight.dtype == torch.bfloat16 and frozen.model.embed_tokens.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    x = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    with torch.no_grad(), bf16.autocast():
        a, b = model(x).logits.float(), frozen(x).logits.float()
    assert torch.equal(a, b)


def test_completions_stop_at_the_templates_end_of_turn_and_every_eos_id(tok, pets_model, tmp_path):
    # Another family's layout: the template closes a turn with <|im_end|> while the tokenizer's EOS is <|endoftext|>
    # (as Qwen2.5 base's), and generation_config.json names only that EOS: the sampler still stops at the end of
    # the turn, in every path that reads its output (grpo's truncation flag, opd's dataset completions).
    import json
    import shutil
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import grpo
    import opd
    folder = tmp_path / "qwenlike"
    shutil.copytree(pets_model, folder)
    other = AutoTokenizer.from_pretrained(folder)
    other.eos_token = other.pad_token = "<|endoftext|>"
    other.save_pretrained(folder)
    im_end, endoftext = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": endoftext}))
    other = M.load_tokenizer(str(folder))
    assert other.eos_token_id == endoftext != im_end
    assert other.stop_ids == (im_end, endoftext)  # the end of turn first
    model = AutoModelForCausalLM.from_pretrained(pets_model)
    pets = [prompts_of(tok)[0]] * 6
    torch.manual_seed(0)
    ids = C.generate_ids(model, other, pets, FP32, max_new_tokens=20, batch_size=8, temperature=1.0)
    assert all(r[-1] == im_end and im_end not in r[:-1] and len(r) < 20 for r in ids)  # six words, then the turn ends
    groups = [{"prompt_ids": pets[:2], "completion_ids": [ids[0], ids[1][:3]], "sampled_logp": [[0.0] * 20] * 2,
               "policy": [[1] * len(ids[0]), [1] * 3]}]
    b = grpo.as_tensors(groups, other, grpo.Args(), "cpu")
    assert b["truncated"].tolist() == [False, True]
    assert opd.dataset_completion({"prompt": "a", "completion": "cat"}, other)[-1] == im_end
    # generation_config.json lists several EOS ids (as Llama 3 and Gemma 3 do): each of them stops a completion.
    word = ids[0][2]  # a word the pets model writes mid-answer
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [endoftext, word]}))
    other = M.load_tokenizer(str(folder))
    assert other.stop_ids == (im_end, endoftext, word)
    torch.manual_seed(0)
    cut = C.generate_ids(model, other, pets, FP32, max_new_tokens=20, batch_size=8, temperature=1.0)
    for row in cut:
        first = next(j for j, t in enumerate(row) if t in other.stop_ids)
        assert len(row) == first + 1  # cut after its first stop token, which is kept
    assert any(r[-1] == word for r in cut) and sum(map(len, cut)) < sum(map(len, ids))
