"""A run's life: its output folder, its logs, its optimizer, its checkpoints, and how it ends.

--output_dir is claimed before any work (a folder holding another run is refused unless --resume or
--overwrite_output_dir) and locked against a second run; args.json and metrics.jsonl (and the
trackers of --report_to) are written once every check has passed, the RL scripts' samples to
completions.jsonl; checkpoint.pt is written atomically (with --save_model_checkpoints a loadable
checkpoint-N/ beside it) and --resume continues from it. `run` turns a user's mistake into one line
(exit 2), divergence into a stop that names the last good checkpoint, Ctrl-C into a pointer to the
last checkpoint (exit 130); `finish` leaves cleanly under torchrun. The optimizer is AdamW with
linear warmup and cosine decay.
"""
import copy
import glob
import importlib
import importlib.util
import json
import math
import os
import pickle
import random
import shutil
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict

import torch
import torch.distributed as dist

from plumbing.errors import Diverged, Timeout, UserError


# --------------------------------------------------------------------------------------------------
# Users' functions: loading them, and their time limits
_DEADLINES = []  # the time limits in force, innermost last: (deadline, what, seconds)


def _expire(signum, frame):
    if _DEADLINES and time.monotonic() >= _DEADLINES[-1][0]:
        raise Timeout(f"{_DEADLINES[-1][1]} ran past its limit of {_DEADLINES[-1][2]:g} s")


@contextmanager
def time_limit(seconds, what):
    """Stop the code inside after `seconds` (0: no limit) by raising Timeout in it, and print a
    line if it is still running halfway (at most after 10 s). A watchdog thread sends SIGUSR1 to
    the main thread, whose handler raises: Python code and waits (sleep, sockets) are interrupted,
    a C call when it returns. SIGALRM is left alone: libraries such as math-verify use it for their
    own timeouts. Off the main thread there is no limit."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGUSR1) is not _expire:
        signal.signal(signal.SIGUSR1, _expire)  # kept: a late signal finds no deadline and passes
    main = threading.main_thread().ident
    _DEADLINES.append((time.monotonic() + seconds, what, seconds))
    timers = [threading.Timer(min(10.0, seconds / 2), lambda: print(
                  f"{what} is still running after {min(10.0, seconds / 2):g} s (stopped at "
                  f"{seconds:g} s)", flush=True)),
              threading.Timer(seconds, signal.pthread_kill, (main, signal.SIGUSR1))]
    for t in timers:
        t.daemon = True
        t.start()
    try:
        yield
    finally:
        for t in timers:
            t.cancel()
        _DEADLINES.pop()


def load_function(spec, what):
    """'path/to/file.py:function' -> the function (a user's reward rule or tool), its file run as
    code (the user passed it as code). what: the start of the error message."""
    path, _, name = spec.rpartition(":")
    if not path:
        raise UserError(f"{what} path/to/file.py:function")
    if not os.path.isfile(path):
        flag = what.split(": ", 1)[0]  # "--reward_funcs nope.py:f"
        raise UserError(f"{flag}: the file {path} does not exist (give path/to/file.py:function)")
    module_spec = importlib.util.spec_from_file_location(
        os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise UserError(f"{spec}: importing {path} failed: {type(e).__name__}: {e}") from None
    if not callable(getattr(module, name, None)):
        raise UserError(f"{spec}: {path} has no function {name!r}")
    return getattr(module, name)


# --------------------------------------------------------------------------------------------------
# Starting and ending
def run(main):
    """Call main(). A UserError becomes one line on stderr and exit code 2 instead of a traceback
    (Diverged adds where the last good checkpoint is); Ctrl-C says where the last checkpoint is and
    exits with 130. Either way the output folder's lock and half-written files go."""
    try:
        main()
    except Diverged as e:
        ckpt = _run.get("checkpoint")
        good = f"the last good checkpoint (step {ckpt[1]}) is {ckpt[0]}; " if ckpt else ""
        _leave(2, f"error: {e}; {good}lower --learning_rate or check the data")
    except UserError as e:
        _leave(2, f"error: {e}")
    except KeyboardInterrupt:
        ckpt = _run.get("checkpoint")
        _leave(130, (f"interrupted; the last checkpoint (step {ckpt[1]}) is {ckpt[0]}: "
                     "continue with --resume") if ckpt
               else "interrupted before the first checkpoint was written: nothing to resume")
    except BaseException:
        release_output_dir()
        raise


def _leave(code, message):
    from tqdm import tqdm
    for bar in list(getattr(tqdm, "_instances", [])):  # end a progress bar's line first
        bar.close()
    release_output_dir()
    rank = int(os.environ.get("RANK", 0))
    # under torchrun rank 0 says it (a mistake in the arguments stops every rank), and torchrun then
    # stops the others; a rank whose error is its own says it, after waiting for rank 0 to go first
    if rank:
        time.sleep(3)
    print(f"[rank {rank}] {message}" if rank else message, file=sys.stderr, flush=True)
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # torchrun's report names this as the cause
        with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {
                "py_callstack": message, "timestamp": str(int(time.time()))}}}, f)
    os._exit(code)  # skip interpreter teardown: under torchrun it can abort after the work is done


def finish(rt):
    """Leave cleanly: under torchrun a barrier and destroy_process_group, then os._exit to skip a
    teardown that sometimes aborts ("terminate called without an active exception") after all the
    work is done."""
    sys.stdout.flush()
    sys.stderr.flush()
    if rt.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    release_output_dir()
    os._exit(0)



class Run:
    """The plumbing of one training loop, after the models and the optimizer are set up (and a
    checkpoint restored): the metrics log (and, with samples, completions.jsonl), the progress bar,
    when to evaluate and to checkpoint, and the end (the final model saved, or where to continue).
    step: the step to start from."""

    def __init__(self, args, rt, step, ckpt_path, samples=False):
        from tqdm import tqdm
        self.args, self.rt, self.ckpt_path = args, rt, ckpt_path
        self.log = begin_log(args, rt, step)
        self.samples = (SampleLog(args.output_dir, rt, step, args.num_completions_to_print)
                        if samples else None)
        stop = args.stop_after_steps
        # this invocation's last step
        self.last = min(args.max_steps, step + stop) if stop else args.max_steps
        self.bar = tqdm(total=args.max_steps, initial=step, disable=not rt.is_main,
                        dynamic_ncols=True)

    def first(self, row):
        """Log and print the metrics measured before the first step (row: {"step": 0, ...}), if
        any."""
        if len(row) > 1:
            self.log.log(row)
            self.rt.print("before training: " + _numbers(row))

    def eval_due(self, step):
        every = self.args.eval_every
        return (every and step % every == 0) or step == self.args.max_steps

    def logged(self, row, **postfix):
        """Log a step's metrics and show the named ones beside the progress bar."""
        self.log.log(row)
        self.bar.update(1)
        self.bar.set_postfix(**{k: f"{v:.4g}" for k, v in postfix.items()})

    def checkpoint(self, step, model, opt, sched, tok, saved=None, **extra):
        """Every --save_every steps and at this invocation's last: checkpoint.pt (model, opt, sched,
        extra), and with --save_model_checkpoints the model `saved` (default: model) as a loadable
        folder."""
        every = self.args.save_every
        if (every and step % every == 0) or step == self.last:
            save_state(self.ckpt_path, model, opt, sched, step, self.args, self.rt, **extra)
            save_checkpoint_model(saved or model, tok, self.args, step, self.rt)

    def end(self, step, model, tok, row, name="model"):
        """After the loop: at --max_steps the trained model is saved to --output_dir; otherwise the
        run stopped early (--stop_after_steps) and says how to continue. Then leave (finish)."""
        self.bar.close()
        if step == self.args.max_steps:
            save_pretrained(model, tok, self.args.output_dir, self.rt)
            evals = {k: v for k, v in row.items() if k.startswith("eval")}
            if evals:
                self.rt.print("after training: " + _numbers(evals))
            self.rt.print(f"saved the {name} to {self.args.output_dir}")
        else:
            self.rt.print(f"stopped at step {step} of {self.args.max_steps}; "
                          "continue with --resume")
        finish(self.rt)


def _numbers(row):
    return " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step")

# --------------------------------------------------------------------------------------------------
# The output folder
# _run holds this process's lock on it, whether this process created it, and the last checkpoint
# written or read (for the messages on Ctrl-C and divergence).
_run = {}
# What a run writes into its --output_dir (and bench/heldout.py its answer cache):
# --overwrite_output_dir removes these, config.json first so that the folder never looks finished
# on the way.
RUN_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json",
             "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
             "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
             "chat_template.jinja", "args.json", "metrics.jsonl", "completions.jsonl",
             "tensorboard", "checkpoint.pt", "checkpoint.pt.tmp", "checkpoint-*", "adapter",
             "heldout", ".saving")


def claim_output_dir(args, rt):
    """Check --output_dir before any work and lock it for this run; returns the checkpoint path.
    Refused: a file, one of the run's input models, a folder holding another run (unless --resume or
    --overwrite_output_dir), a folder another live run has locked, a folder that cannot be written.
    Nothing in it is changed here."""
    out = args.output_dir
    ckpt = os.path.join(out, "checkpoint.pt")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output_dir {out} is a file; give a folder")
    for name in ("model", "ref_model", "reward_model", "teacher"):
        src = os.path.expanduser(getattr(args, name, None) or "")
        if src and os.path.exists(src) and os.path.realpath(src) == os.path.realpath(out):
            raise UserError(f"--output_dir {out} is the --{name}: the run would overwrite its own "
                            "input; choose another --output_dir")
    if args.resume:
        if not os.path.isfile(ckpt):
            raise UserError(f"--resume: no checkpoint at {ckpt}; "
                            "run without --resume to start afresh")
    elif not args.overwrite_output_dir:
        found = [n for n in ("config.json", "args.json", "metrics.jsonl", "checkpoint.pt")
                 if os.path.exists(os.path.join(out, n))]
        if found:
            raise UserError(f"--output_dir {out} holds another run ({', '.join(found)}): pass "
                            "--resume to continue it or --overwrite_output_dir to replace it, or "
                            "choose another folder")
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
                if (host == socket.gethostname() and pid.isdigit()
                        and (int(pid) == os.getpid() or not _alive(int(pid)))):
                    # left behind by a run that was killed (or by this process, called twice)
                    os.remove(path)
                    continue
                raise UserError(f"another run (process {pid or '?'} on {host or '?'}) is writing "
                                f"to {folder}; wait for it or choose another --output_dir "
                                f"(delete {path} if no run is)") from None
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
    """Close the trackers; drop this process's lock and half-written files; the folder too if this
    run created it and left it empty."""
    for close in _run.pop("close", []):  # the trackers of --report_to
        try:
            close()
        except Exception:
            pass
    lock = _run.pop("lock", None)
    if lock is None:
        return
    folder = os.path.dirname(lock)
    clean_torn(folder)
    if os.path.exists(lock):
        os.remove(lock)
    if _run.get("created") and not os.listdir(folder):
        os.rmdir(folder)


def begin_log(args, rt, step):
    """Once every check has passed (data, models, a resumed checkpoint): a fresh run clears what an
    earlier run left in --output_dir, a resumed one what a kill left half-written (clean_torn),
    args.json records this run's arguments, and the metrics log opens (a resumed run keeps the
    lines up to its checkpoint)."""
    rt.print("arguments: " + json.dumps(asdict(args)))
    if rt.is_main:
        if not args.resume:
            for pattern in RUN_FILES:
                for p in glob.glob(os.path.join(glob.escape(args.output_dir), pattern)):
                    shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        else:  # what a kill mid-write left (the lock of a killed run is taken over: _lock)
            clean_torn(args.output_dir)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
    return MetricsLog(args.output_dir, rt, step, trackers=report_to(args), config=asdict(args))

def save_pretrained(model, tok, output_dir, rt):
    """save_pretrained into output_dir (by rank 0; every rank calls it) so that the folder only
    looks complete (config.json present) once the weights are fully written: everything goes to a
    temporary folder first (publish). Under FSDP the ranks first gather the whole weights onto rank
    0's CPU. With LoRA, the adapter alone in adapter/ and the merged model (W + (alpha/r) BA)."""
    model = getattr(model, "module", model)  # unwrap DDP
    full = None
    if _sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        # a tied weight once (named_parameters lists it once)
        full = {k: v for k, v in full.items() if k in names}
    if not rt.is_main:
        return
    try:
        _save_pretrained(model, full, tok, output_dir)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(temporary(output_dir), ignore_errors=True)
        ckpt = _run.get("checkpoint")
        raise write_error(e, f"the model to {output_dir}", (
            f"{ckpt[0]} (step {ckpt[1]}) is kept: free some space and continue with --resume, "
            "which writes the model" if ckpt else "free some space and run again")) from None


def write_error(e, what, then):
    """The UserError of a failed write (a full disk comes as OSError or RuntimeError); anything
    else that is not an OSError is raised as it is."""
    full = "No space left" in str(e) or getattr(e, "errno", None) == 28
    if not full and not isinstance(e, OSError):
        raise e
    return UserError(f"cannot write {what}: "
                     + (f"the disk is full; {then}" if full else str(e).splitlines()[0]))


def _save_pretrained(model, full, tok, output_dir):
    tmp = temporary(output_dir)
    if hasattr(model, "peft_config"):
        adapter = os.path.join(tmp, "adapter")
        model.save_pretrained(adapter)
        base = model.get_base_model()
        # QLoRA: merged into the base model's fp32 weights, not NF4 ones
        if getattr(base, "is_loaded_in_4bit", False):
            from peft import PeftModel
            # a reward model's one label and pad id, without the 4-bit setting
            config = copy.deepcopy(base.config)
            del config.quantization_config
            fp32 = type(base).from_pretrained(model.peft_config["default"].base_model_name_or_path,
                                              config=config, dtype=torch.float32)
            model = PeftModel.from_pretrained(fp32, adapter)
        model = model.merge_and_unload()
    model.save_pretrained(tmp, state_dict=full)
    tok.save_pretrained(tmp)
    publish(tmp, output_dir)


def save_checkpoint_model(model, tok, args, step, rt):
    """With --save_model_checkpoints, beside each checkpoint.pt: the model as a loadable folder
    <output_dir>/checkpoint-<step>/, to evaluate a run mid-way (--model <that folder>). The last
    step's model is --output_dir itself. With LoRA the folder holds the adapter, which transformers
    loads onto its base model when peft is installed."""
    if getattr(args, "save_model_checkpoints", False) and step < args.max_steps:
        out = os.path.join(args.output_dir, f"checkpoint-{step}")
        if not hasattr(model, "peft_config"):
            save_pretrained(model, tok, out, rt)
        elif rt.is_main:  # LoRA: the adapter (merging would change the model being trained)
            tmp = temporary(out)
            try:
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)
            except (OSError, RuntimeError) as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise write_error(e, f"the adapter to {out}",
                                  "free some space and continue with --resume") from None
            publish(tmp, out)


def temporary(out):
    """An empty folder to write the model folder `out` into: checkpoint-N.saving/ beside a
    checkpoint-N/ folder, which is renamed whole; .saving/ inside --output_dir, which also holds
    the run's logs. A kill mid-write leaves only these, which a resume removes (clean_torn)."""
    parent = os.path.dirname(out)
    whole = os.path.basename(out).startswith("checkpoint-")
    tmp = f"{out}.saving" if whole else os.path.join(out, ".saving")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(parent or ".", exist_ok=True)
    return tmp


def publish(tmp, out):
    """The complete folder tmp (from temporary) becomes the model folder out: a checkpoint-N/ is
    renamed whole (an older one of that step replaced); into --output_dir the files are moved one
    by one, config.json last, so that the folder looks like a model only once it is one."""
    if tmp == f"{out}.saving":
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
        return
    for n in sorted(os.listdir(tmp), key=lambda n: n == "config.json"):
        target = os.path.join(out, n)
        if os.path.isdir(target):
            shutil.rmtree(target)  # adapter/ of an earlier save
        os.replace(os.path.join(tmp, n), target)
    os.rmdir(tmp)


def clean_torn(folder):
    """What a run killed mid-write leaves in its folder: temporary files and model folders
    (checkpoint.pt.tmp, .saving/, checkpoint-N.saving/), and checkpoint-N/ folders without a model
    in them (written in place by earlier versions). Called on --resume, and on the way out."""
    torn = [os.path.join(folder, n) for n in ("checkpoint.pt.tmp", ".saving")]
    torn += glob.glob(os.path.join(glob.escape(folder), "checkpoint-*.saving"))
    torn += [d for d in glob.glob(os.path.join(glob.escape(folder), "checkpoint-*[0-9]"))
             if os.path.isdir(d) and not any(os.path.exists(os.path.join(d, f))
                                             for f in ("config.json", "adapter_config.json"))]
    for p in torn:
        if os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.exists(p):
            os.remove(p)


# The trackers of --report_to, beside metrics.jsonl, and the module each needs
TRACKERS = {"wandb": "wandb", "trackio": "trackio", "tensorboard": "tensorboard"}


def report_to(args):
    return [t.strip() for t in (getattr(args, "report_to", None) or "none").split(",")
            if t.strip() not in ("", "none")]


class MetricsLog:
    """Appends one JSON object per logged step to <output_dir>/<name> (rank 0 only); a resumed run
    keeps the lines up to its checkpoint's step. With trackers (--report_to), each row goes to them
    too: wandb and trackio (project: $WANDB_PROJECT or $TRACKIO_PROJECT, default "posttrain"; run
    name: the --output_dir), tensorboard (event files in <output_dir>/tensorboard)."""

    def __init__(self, output_dir, rt, resume_step=0, name="metrics.jsonl", trackers=(),
                 config=None):
        self.path = os.path.join(output_dir, name)
        self.rt = rt
        if rt.is_main and os.path.exists(self.path):
            kept = [l for l in open(self.path)
                    if resume_step and l.strip() and json.loads(l)["step"] <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(kept)
        self.sinks = []  # (log(row, step), close())
        for name in trackers if rt.is_main else ():
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter
                folder = os.path.join(output_dir, "tensorboard")
                try:
                    w = SummaryWriter(folder)
                except OSError as e:
                    raise UserError(f"--report_to tensorboard: cannot write to {folder} "
                                    f"({e.strerror or e}); make it a writable folder") from None
                self.sinks.append(
                    (lambda row, step, w=w: [w.add_scalar(k, v, step) for k, v in row.items()],
                     w.close))
            else:  # wandb and trackio share the API: init, log(row, step=), finish
                lib = importlib.import_module(TRACKERS[name])
                lib.init(project=os.environ.get(f"{name.upper()}_PROJECT", "posttrain"),
                         config=config, name=os.path.basename(os.path.abspath(output_dir)))
                self.sinks.append((lambda row, step, lib=lib: lib.log(row, step=step), lib.finish))
        _run.setdefault("close", []).extend(close for _, close in self.sinks)

    def log(self, row):
        if self.rt.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps(row, default=str) + "\n")
            numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
            for log, _ in self.sinks:
                log(numbers, row["step"])


class SampleLog(MetricsLog):
    """The RL scripts' sampled completions: every record of a step (prompt, completion, rewards,
    ...; a dict each), gathered from every rank, as one JSON line each with its step in
    <output_dir>/completions.jsonl; the first n_print are printed."""

    def __init__(self, output_dir, rt, resume_step, n_print):
        super().__init__(output_dir, rt, resume_step, "completions.jsonl")
        self.n_print = n_print

    def log(self, step, records):
        if self.rt.world_size > 1:
            parts = [None] * self.rt.world_size
            dist.all_gather_object(parts, records)
            records = [r for part in parts for r in part]
        for r in records:
            super().log({"step": step, **r})
        if self.rt.is_main and self.n_print:
            from tqdm import tqdm
            for r in records[: self.n_print]:
                p = r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"]
                numbers = " ".join(f"{k}={v:.3g}" for k, v in r.items()
                                   if isinstance(v, (int, float)))
                tqdm.write(f"step {step} sample: {p!r} -> {r['completion']!r} {numbers}")


# --------------------------------------------------------------------------------------------------
# Checkpoints
# Arguments that fix the data stream and the schedule: a run can only resume with the same values.
RESUME_ARGS = ("model", "dataset", "dataset_weights", "dataset_split", "dataset_config",
               "eval_size", "max_length", "batch_size", "seed", "max_steps", "lora_r", "lora_alpha",
               "lora_target_modules", "fsdp")


def rng_state():
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _weights(model):
    """What a checkpoint holds of the model: its state dict, or where weights are frozen (LoRA's
    base model) only the trained parameters (the adapters, a new score head); --resume has the
    frozen ones from --model again."""
    if all(p.requires_grad for p in model.parameters()):
        return model.state_dict()
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _sharded(model):
    from torch.distributed.fsdp import FSDPModule
    return any(isinstance(m, FSDPModule) for m in model.modules())


def save_state(path, model, opt, sched, step, args, rt, **extra):
    """Write the checkpoint (model, optimizer, scheduler, step, RNG states, anything in extra; the
    data position is the step) to a temporary file and rename it, so a crash mid-write never leaves
    a torn checkpoint. Weights that are no longer finite never replace the last good checkpoint.
    Under FSDP each rank writes its shards of the model and optimizer (torch.distributed.checkpoint)
    into checkpoint-<step>.dcp/, complete before checkpoint.pt names it; the older shard folders go
    after."""
    bad = torch.tensor(float(sum(
        not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()
        for p in model.parameters())))
    if dist.is_initialized():
        dist.all_reduce(bad)
    if bad:
        raise Diverged(f"the weights became inf or nan by step {step}")
    state = {"scheduler": sched.state_dict(), "step": step, "rng": rng_state(),
             "args": asdict(args), "script": _script(), **extra}
    if _sharded(model):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        state["shards"] = f"checkpoint-{step}.dcp"
        weights, optimizer = get_state_dict(model, opt)
        dcp.save({"model": weights, "optimizer": optimizer},
                 checkpoint_id=os.path.join(os.path.dirname(path), state["shards"]))
    else:
        state.update(model=_weights(model), optimizer=opt.state_dict())
    if rt.is_main:
        try:
            torch.save(state, f"{path}.tmp")
        except (OSError, RuntimeError) as e:  # a full disk comes as either
            if os.path.exists(f"{path}.tmp"):
                os.remove(f"{path}.tmp")
            raise write_error(e, f"the checkpoint {path}",
                              "free some space and continue with --resume") from None
        os.replace(f"{path}.tmp", path)
        for old in glob.glob(os.path.join(glob.escape(os.path.dirname(path)), "checkpoint-*.dcp")):
            if os.path.basename(old) != state.get("shards"):
                shutil.rmtree(old)
    _run["checkpoint"] = (path, step)


def _same_setting(a, b):
    """Two values of an argument are the same, comparing paths (and comma-separated lists of them)
    as paths."""
    if a == b or not (isinstance(a, str) and isinstance(b, str)):
        return a == b
    norm = lambda x: [os.path.realpath(os.path.expanduser(p))
                      if os.path.exists(os.path.expanduser(p)) else p for p in x.split(",")]
    return norm(a) == norm(b)


# torch.distributed.checkpoint unpickles a shard folder's .metadata, and its non-tensor items, with
# no restriction: a crafted folder could run code on --resume. These two read them admitting only
# what DCP writes (its metadata classes, torch sizes and dtypes) and tensors and plain data.
_DCP_CLASSES = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
                ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                *(("torch.distributed.checkpoint.metadata", name) for name in (
                    "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                    "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                    "_MEM_FORMAT_ENCODING"))}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _DCP_CLASSES or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not what a checkpoint holds")


def _safe_shard_reader(folder):
    from torch.distributed.checkpoint import FileSystemReader

    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):  # FileSystemReader's, with _MetadataUnpickler
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata
    return Reader(folder)


def _safe_load_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            try:  # only tensors and plain data; the base class then reads what was checked
                torch.load(value, weights_only=True)
            except Exception as e:
                raise pickle.UnpicklingError(str(e).splitlines()[0]) from None
            value.seek(0)
            super().load_bytes(read_item, value)
    return Planner()


def _script():
    """The running script's file name (sft.py, ...), under python and torchrun alike."""
    return os.path.basename(sys.argv[0])


def restore_state(path, model, opt, sched, args, rt, must_match=()):
    """Load a checkpoint written by save_state into model, opt and sched; returns it (for "step" and
    extras). RESUME_ARGS and the script's own must_match arguments must equal the checkpoint's; any
    other argument that changed applies from here on (the optimizer's learning rates, betas and
    weight decay included) and is listed."""
    # weights_only: tensors and plain data only, so a crafted file cannot run code when it is loaded
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"--resume: {path} is not a checkpoint these scripts wrote "
                        f"({type(e).__name__}); not loading it") from None
    if state.get("script", _script()) != _script():  # its extras and arguments are another's
        raise UserError(f"--resume: {path} was written by {state['script']}, not {_script()}; "
                        f"resume it with {state['script']}, or give another --output_dir")
    for k in RESUME_ARGS + tuple(must_match):
        if not _same_setting(state["args"].get(k, getattr(args, k, None)), getattr(args, k, None)):
            raise UserError(f"--resume: the checkpoint was made with --{k} "
                            f"{state['args'].get(k)}, not {getattr(args, k)}")
    # from this run's arguments
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    if "shards" in state:  # FSDP: each rank reads its shards back
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        weights, optimizer = get_state_dict(model, opt)
        shards = {"model": weights, "optimizer": optimizer}
        folder = os.path.join(os.path.dirname(path), os.path.basename(state["shards"]))
        reader = _safe_shard_reader(folder)
        try:
            reader.read_metadata()  # dcp.load would fall back from its error to another file
            dcp.load(shards, storage_reader=reader, planner=_safe_load_planner())
        except pickle.UnpicklingError as e:
            raise UserError(f"--resume: {folder} holds more than tensors and plain data "
                            f"({str(e).splitlines()[0]}); not loading it") from None
        set_state_dict(model, opt, model_state_dict=shards["model"],
                       optim_state_dict=shards["optimizer"])
    else:
        missing, unexpected = model.load_state_dict(state["model"], strict=False)
        if unexpected or {n for n, p in model.named_parameters() if p.requires_grad} & set(missing):
            raise UserError(f"--resume: the weights in {path} do not fit this model "
                            f"({(unexpected or missing)[0]}...)")
        opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    for g, h, f in zip(opt.param_groups, hyper, sched.lr_lambdas):
        g.update(h, lr=h["initial_lr"] * f(sched.last_epoch))
    sched.base_lrs = [h["initial_lr"] for h in hyper]
    sched._last_lr = [g["lr"] for g in opt.param_groups]
    set_rng_state(state["rng"])
    before = state["args"]
    changed = [f"--{k} {v} (was {before[k]})" for k, v in asdict(args).items()
               if k not in ("resume", "stop_after_steps") and k in before
               and not _same_setting(v, before[k])]
    rt.print(f"resumed from {path} at step {state['step']}"
             + (f"; changed: {', '.join(changed)}" if changed else ""))
    _run["checkpoint"] = (path, state["step"])
    return state


# --------------------------------------------------------------------------------------------------
# The optimizer, its schedule, and what a rank holds for it
_memory_reported = []


def split_batch(args, rt, cap):
    """Check that --batch_size splits over the ranks into micro-batches; --micro_batch_size 0 (the
    default) becomes the largest micro-batch up to cap that divides a rank's share of the batch."""
    if args.batch_size % rt.world_size:
        raise UserError(f"--batch_size {args.batch_size} must be a multiple of the "
                        f"{rt.world_size} ranks")
    share = args.batch_size // rt.world_size
    if not args.micro_batch_size:
        args.micro_batch_size = max(d for d in range(1, min(cap, share) + 1) if share % d == 0)
    elif share % args.micro_batch_size:
        raise UserError(f"--batch_size {args.batch_size} must be a multiple of --micro_batch_size "
                        f"x ranks ({args.micro_batch_size} x {rt.world_size})")


def report_memory(model, opt, rt):
    """Print, once and after the first optimizer step, what this rank holds for training, counted
    from the tensors: weights, gradients and AdamW's state (under FSDP the rank's shards of
    them)."""
    if _memory_reported:
        return
    _memory_reported.append(True)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t
    weights = sum(local(p).nbytes for p in model.parameters())
    grads = sum(local(p.grad).nbytes for p in model.parameters() if p.grad is not None)
    state = sum(local(v).nbytes for s in opt.state.values() for v in s.values()
                if torch.is_tensor(v))
    rt.print(f"memory per rank: weights {weights / 2**20:.1f} MiB, "
             f"gradients {grads / 2**20:.1f} MiB, AdamW state {state / 2**20:.1f} MiB")


# Learning-rate schedule, logging, checkpoints
def warmup_cosine(step, warmup_steps, total_steps, min_ratio=0.0):
    """Multiplier of the peak learning rate: linear warmup, then cosine decay to min_ratio at
    total_steps."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def optimizer_and_schedule(model, args, groups=None):
    """AdamW over the trainable parameters, linear warmup then cosine decay (--learning_rate,
    --warmup_steps, --min_lr_ratio, --weight_decay, --adam_beta1, --adam_beta2, --max_steps).
    groups: [(parameters, peak learning rate)] to give parts of the model their own rate (the
    schedule scales each)."""
    groups = [{"params": [p for p in ps if p.requires_grad], "lr": lr}
              for ps, lr in (groups or [(model.parameters(), args.learning_rate)])]
    # The fused kernel updates all parameters in one pass over memory (~2x faster than the default
    # on a CPU).
    fused = groups[0]["params"][0].device.type in ("cpu", "cuda")
    opt = torch.optim.AdamW(groups, weight_decay=args.weight_decay,
                            betas=(args.adam_beta1, args.adam_beta2), fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, args.warmup_steps, args.max_steps, args.min_lr_ratio))
    return opt, sched
