"""Time our post-training scripts against TRL's trainers: same model, data, batch and precision.

    HF_HUB_OFFLINE=1 python bench/speed.py [--methods sft,dpo,rm,grpo,ppo,opd] [--steps 6] [--repeats 1]
                                           [--out results.json]

Every measurement is a fresh subprocess, run one at a time (ours, then TRL, per method and repeat). Time per
optimizer step is the median over the steps after the first, timed inside the process: for our scripts the
`seconds_per_step` rows of <output_dir>/metrics.jsonl (plus `time/generate_s` / `time/train_s` for RL), for TRL a
TrainerCallback (on_step_begin -> on_step_end). Peak memory is the ru_maxrss of each finished subprocess (os.wait4).
Wall time is the whole subprocess (imports, loading, tokenizing, DPO's reference precompute, saving).
`python bench/speed.py --trl METHOD --model DIR --data DIR --steps N --result FILE` is the TRL runner used inside.
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
METHODS = ["sft", "dpo", "rm", "grpo", "ppo", "opd"]
BATCH = {"sft": "8 seqs", "dpo": "8 pairs", "rm": "8 pairs", "grpo": "2 prompts x 8", "ppo": "16 prompts",
         "opd": "16 prompts"}
# Our scripts' defaults that TRL's differ from (printed next to what the TRL run actually used).
OURS = {"gradient_checkpointing": False, "model dtype": "torch.float32",
        "optim": "torch AdamW (fused), betas (0.9, 0.95)", "lr_scheduler_type": "cosine"}


# ---------------------------------------------------------------------------------------------------------------
# Data: temporary JSONL files from the repo's built-in arithmetic task
def write_data(folder, n):
    import tasks as T
    sft, pref = T.Arithmetic("train"), T.ArithmeticPreferences("train")
    files = {
        "sft": [{k: sft[i][k] for k in ("prompt", "completion")} for i in range(n)],
        "pref": [{k: pref[i][k] for k in ("prompt", "chosen", "rejected")} for i in range(n)],
        "rl": [{k: sft[i][k] for k in ("prompt", "answer")} for i in range(n)],
        "messages": [{"messages": sft[i]["prompt"] + sft[i]["completion"]} for i in range(n)],  # GKD's collator
    }
    for name, rows in files.items():
        with open(os.path.join(folder, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


# ---------------------------------------------------------------------------------------------------------------
# Our side: the command line of each script
def ours_command(method, model, data, out, steps):
    common = ["--model", model, "--output_dir", out, "--overwrite_output_dir", "--max_steps", str(steps),
              "--eval_size", "0", "--save_every", "0", "--seed", "0", "--precision", "bf16"]
    rl = ["--dataset", f"{data}/rl.jsonl", "--max_new_tokens", "64"]
    args = {
        "sft": ["sft.py", "--dataset", f"{data}/sft.jsonl", "--batch_size", "8", "--micro_batch_size", "8",
                "--max_length", "512", "--learning_rate", "1e-5", "--eval_generations", "0"],
        "dpo": ["dpo.py", "--dataset", f"{data}/pref.jsonl", "--batch_size", "8", "--micro_batch_size", "8",
                "--beta", "0.1", "--max_length", "512", "--eval_generations", "0"],
        "rm": ["reward_model.py", "--dataset", f"{data}/pref.jsonl", "--batch_size", "8", "--micro_batch_size", "8",
               "--max_length", "512"],
        "grpo": ["grpo.py", *rl, "--batch_size", "2", "--num_generations", "8", "--generation_batch_size", "16",
                 "--micro_batch_size", "16", "--beta", "0", "--temperature", "1.0", "--top_p", "1.0",
                 "--num_iterations", "1", "--reward_funcs", "accuracy,format", "--no_dynamic_sampling"],
        "ppo": ["ppo.py", *rl, "--reward", "verifiable", "--batch_size", "16"],
        "opd": ["opd.py", *rl, "--teacher", model, "--batch_size", "16"],
    }[method]
    return [sys.executable, os.path.join(ROOT, args[0]), *args[1:], *common]


def read_ours(out):
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if l.strip()]
    rows = [r for r in rows if "seconds_per_step" in r]
    res = {"step_times": [r["seconds_per_step"] for r in rows]}
    res["mean_lengths"] = [r["completions/mean_length"] for r in rows if "completions/mean_length" in r]
    if rows and "time/generate_s" in rows[0]:
        res["gen_times"] = [r["time/generate_s"] for r in rows]
        res["train_times"] = [r["time/train_s"] for r in rows]
    return res


# ---------------------------------------------------------------------------------------------------------------
# TRL side: runs inside its own subprocess (--trl METHOD)
def accuracy_reward(completions, answer, **kwargs):
    import tasks as T
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if T.grade(t, a)[1] else 0.0 for t, a in zip(texts, answer)]


def format_reward(completions, **kwargs):
    import tasks as T
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [0.2 if T.last_boxed(t) is not None else 0.0 for t in texts]


def trl_run(a):
    import datasets
    import trl
    from transformers import AutoTokenizer, TrainerCallback

    class StepTimer(TrainerCallback):
        times = []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):  # after on_step_end: outside the timing
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    lengths = []
    load = lambda name: datasets.load_dataset("json", data_files=f"{a.data}/{name}.jsonl", split="train")
    common = dict(output_dir=a.output_dir, max_steps=a.steps, bf16=True, use_cpu=True, eval_strategy="no",
                  save_strategy="no", report_to=[], seed=0, gradient_accumulation_steps=1, logging_steps=1)
    if os.environ.get("BENCH_TRL_NO_GRADIENT_CHECKPOINTING"):  # set by --trl_no_gradient_checkpointing
        common["gradient_checkpointing"] = False
    kw = dict(model=a.model, callbacks=[StepTimer()])
    if a.trl == "sft":
        cfg = trl.SFTConfig(per_device_train_batch_size=8, max_length=512, learning_rate=1e-5, **common)
        trainer = trl.SFTTrainer(args=cfg, train_dataset=load("sft"), **kw)
    elif a.trl == "dpo":
        cfg = trl.DPOConfig(per_device_train_batch_size=8, beta=0.1, max_length=512, **common)
        trainer = trl.DPOTrainer(args=cfg, train_dataset=load("pref"), **kw)
    elif a.trl == "rm":
        cfg = trl.RewardConfig(per_device_train_batch_size=8, max_length=512, **common)
        trainer = trl.RewardTrainer(args=cfg, train_dataset=load("pref"), **kw)
    elif a.trl == "grpo":  # one step = one generation batch of 16 completions (steps_per_generation = 1)
        cfg = trl.GRPOConfig(per_device_train_batch_size=16, num_generations=8, generation_batch_size=16,
                             max_completion_length=64, temperature=1.0, top_p=1.0, beta=0.0, num_iterations=1,
                             **common)
        trainer = trl.GRPOTrainer(args=cfg, reward_funcs=[accuracy_reward, format_reward],
                                  train_dataset=load("rl"), **kw)
    elif a.trl == "ppo":  # TRL 1.x dropped PPOTrainer: check rather than assume
        found = hasattr(trl, "PPOTrainer") or importlib.util.find_spec("trl.experimental.ppo") is not None
        raise NotImplementedError("a PPOTrainer exists in this TRL but is not wired into this benchmark" if found
                                  else f"TRL {trl.__version__} has no PPOTrainer (not in trl, no trl.experimental.ppo)")
    elif a.trl == "opd":  # GKD with lmbda=1: always the student's own samples (on-policy)
        from trl.experimental.gkd import GKDConfig, GKDTrainer
        cfg = GKDConfig(per_device_train_batch_size=16, lmbda=1.0, max_new_tokens=64, temperature=1.0, **common)
        trainer = GKDTrainer(args=cfg, teacher_model=a.model, train_dataset=load("messages"),
                             processing_class=AutoTokenizer.from_pretrained(a.model), **kw)
    keys = ["gradient_checkpointing", "lr_scheduler_type", "optim", "learning_rate", "max_length", "disable_dropout"]
    keys += {"dpo": ["loss_type", "precompute_ref_log_probs"], "opd": ["beta", "seq_kd"],
             "grpo": ["loss_type", "scale_rewards", "generation_batch_size", "steps_per_generation"]}.get(a.trl, [])
    settings = {k: getattr(getattr(cfg, k), "value", getattr(cfg, k)) for k in keys if hasattr(cfg, k)}
    settings["model dtype"] = str(next(trainer.model.parameters()).dtype)
    trainer.train()
    return {"step_times": StepTimer.times, "settings": settings, "mean_lengths": lengths}


# ---------------------------------------------------------------------------------------------------------------
# The benchmark: sequential subprocesses, one table
def busy_cpu_s():
    """CPU seconds the whole machine has been busy (all processes), from /proc/stat."""
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, open("/proc/stat").readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_quiet(max_wait):
    """Wait (at most max_wait s) until other processes use under 0.2 cores: they would skew the timings."""
    t_end = time.time() + max_wait
    while True:
        b0 = busy_cpu_s()
        time.sleep(2)
        load = (busy_cpu_s() - b0) / 2
        if load < 0.2 or time.time() > t_end:
            return load


def launch(cmd, log):
    """Run cmd to completion: exit code, wall seconds, peak RSS in GB of that process alone, and the cores that
    OTHER processes used on average meanwhile (machine busy time minus the child's own CPU time, over wall time)."""
    t0, b0 = time.perf_counter(), busy_cpu_s()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"})
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    others = max(0.0, (busy_cpu_s() - b0 - usage.ru_utime - usage.ru_stime) / wall)
    return p.returncode, wall, usage.ru_maxrss / 1024**2, others  # Linux: ru_maxrss is in KiB


def measure(side, method, model, data, steps, tmp, tag, max_wait):
    out, log = os.path.join(tmp, f"{side}-{method}-{tag}"), os.path.join(tmp, f"{side}-{method}-{tag}.log")
    result_file = out + ".json"
    if side == "ours":
        cmd = ours_command(method, model, data, out, steps)
    else:
        cmd = [sys.executable, os.path.abspath(__file__), "--trl", method, "--model", model, "--data", data,
               "--steps", str(steps), "--output_dir", out, "--result", result_file]
    before = wait_quiet(max_wait)
    print(f"[{time.strftime('%H:%M:%S')}] {side} {method} #{tag}" +
          (f" (other processes use {before:.1f} cores)" if before >= 0.2 else ""), flush=True)
    rc, wall, rss, others = launch(cmd, log)
    res = {"rc": rc, "wall_s": wall, "peak_rss_gb": rss, "other_cores": others, "log": log}
    try:
        res.update(read_ours(out) if side == "ours" else json.load(open(result_file)))
    except (OSError, ValueError):
        pass
    if rc != 0 and "error" not in res:
        lines = [l.strip() for l in open(log, errors="replace") if l.strip()]
        res["error"] = lines[-1][:200] if lines else f"exit code {rc}"
    if rc == 0 and len(res.get("step_times", [])) < 2:
        res["error"] = f"only {len(res.get('step_times', []))} steps timed"
    return res


def summary(runs, key="step_times"):
    """Median over repeats of each run's median step time after the first step (None if no run succeeded)."""
    meds = [statistics.median(r[key][1:]) for r in runs if "error" not in r and len(r.get(key, [])) > 1]
    return statistics.median(meds) if meds else None


def fmt_time(ours_runs, ours_t):
    if ours_t is None:
        return "failed: " + ours_runs[0].get("error", "?")
    g, t = summary(ours_runs, "gen_times"), summary(ours_runs, "train_times")
    return f"{ours_t:.2f}" + (f" (gen {g:.2f} / train {t:.2f})" if g is not None else "")


def table(results, header):
    lines = [header, "", "| method | batch | ours s/step (gen / train) | TRL s/step | ratio TRL/ours | "
                         "wall ours / TRL (s) | peak RSS ours | peak RSS TRL |", "|" + "---|" * 8]
    for m, r in results.items():
        o, t = summary(r["ours"]), summary(r["trl"])
        trl_cell = f"{t:.2f}" if t is not None else "n/a: " + r["trl"][0].get("error", "?")
        ratio = f"{t / o:.2f}x" if o and t else "-"
        ok = lambda side: [x for x in r[side] if "error" not in x]  # repeats are joined with "/"
        wall = lambda side: "/".join(f"{x['wall_s']:.0f}" for x in ok(side)) or "-"
        rss = lambda side: "/".join(f"{x['peak_rss_gb']:.2f}" for x in ok(side)) + " GB" if ok(side) else "-"
        lines.append(f"| {m} | {BATCH[m]} | {fmt_time(r['ours'], o)} | {trl_cell} | {ratio} | "
                     f"{wall('ours')} / {wall('trl')} | {rss('ours')} | {rss('trl')} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--rows", type=int, default=256, help="rows of each temporary JSONL file")
    p.add_argument("--max_wait", type=float, default=300,
                   help="before each run wait up to this many seconds for other processes to go quiet")
    p.add_argument("--out", default=None, help="also write the raw numbers as JSON here")
    p.add_argument("--trl_no_gradient_checkpointing", action="store_true",
                   help="turn off TRL's default gradient checkpointing (ours is off by default), for a like-for-like run")
    p.add_argument("--trl", choices=METHODS, help=argparse.SUPPRESS)  # runner mode: one TRL run
    for name in ("--model", "--data", "--output_dir", "--result"):
        p.add_argument(name, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.trl:
        try:
            res = trl_run(a)
        except Exception as e:
            res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
        json.dump(res, open(a.result, "w"), default=str)
        sys.exit(1 if "error" in res else 0)

    if a.trl_no_gradient_checkpointing:
        os.environ["BENCH_TRL_NO_GRADIENT_CHECKPOINTING"] = "1"  # read by the TRL runner subprocesses
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    if unknown := set(methods) - set(METHODS):
        p.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    from plumbing import models as M
    import torch
    model = M.resolve_model(M.DEFAULT_MODEL)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    header = (f"CPU: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; torch {version('torch')},"
              f" transformers {version('transformers')}, trl {version('trl')}; model {model}; bf16 autocast; "
              f"{a.steps} steps per run (median of steps 2..{a.steps}), {a.repeats} repeat(s)")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        write_data(data, a.rows)
        for m in methods:
            results[m] = {"ours": [], "trl": []}
            for r in range(a.repeats):
                for side in ("ours", "trl"):
                    for attempt in range(3):  # a run that shared the CPUs with another process is redone
                        res = measure(side, m, model, data, a.steps, tmp, r, a.max_wait)
                        if res["other_cores"] < 0.3 or "error" in res:
                            break
                        print(f"  other processes used {res['other_cores']:.2f} cores meanwhile: redoing", flush=True)
                    results[m][side].append(res)
                    if "error" in res:
                        tail = open(res["log"], errors="replace").read().strip().splitlines()[-5:]
                        print(f"  {side} {m} failed: {res['error']}\n    " + "\n    ".join(tail), flush=True)
                    else:
                        print(f"  {side} {m}: {summary([res]):.2f} s/step, {res['wall_s']:.0f} s wall", flush=True)
        print("\n" + table(results, header))
        mean = lambda runs: statistics.mean([v for x in runs for v in x.get("mean_lengths", [])] or [float("nan")])
        lens = [f"{m} {mean(results[m]['ours']):.0f} / {mean(results[m]['trl']):.0f}" for m in methods
                if any(x.get("mean_lengths") for side in results[m].values() for x in side)]
        if lens:
            print("\nMean completion length in tokens, ours / TRL (nan: not logged): " + ", ".join(lens))
        busy = [f"{side} {m} #{i}: {x['other_cores']:.2f}" for m in methods for side in ("ours", "trl")
                for i, x in enumerate(results[m][side]) if x["other_cores"] > 0.1]
        if busy:
            print("\nWARNING: other processes used CPU during these runs (average cores), which inflates their "
                  "times: " + ", ".join(busy))
        print("\nTRL settings that differ from ours (TRL value as used / ours):")
        for m in methods:
            s = next((x["settings"] for x in results[m]["trl"] if "settings" in x), {})
            diffs = [f"{k}={s[k]} (ours {OURS[k]})" for k in OURS if k in s and str(s[k]) != str(OURS[k])]
            extra = [f"{k}={v}" for k, v in s.items() if k not in OURS]
            if s:
                print(f"- {m}: " + "; ".join(diffs) + "; other TRL values: " + ", ".join(extra))
        if a.out:
            for m in results.values():  # the logs vanish with the temp folder
                for side in m.values():
                    for x in side:
                        x.pop("log", None)
            json.dump({"header": header, "steps": a.steps, "repeats": a.repeats, "results": results},
                      open(a.out, "w"), indent=1, default=str)
            print(f"\nraw numbers: {a.out}")


if __name__ == "__main__":
    main()
