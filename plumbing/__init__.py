"""The run machinery: everything a reader never needs to open to understand a method.

    errors.py  UserError (a user's mistake: one line, exit 2) and Diverged; every module may
               import it
    args.py    the argument dataclasses: the fields every script shares (Shared), --config YAML,
               range checks
    models.py  model loading (Hub id, local folder, .gguf, the embedded default offline),
               tokenizers, frozen models, LoRA and QLoRA adapters (peft)
    data.py    dataset sources (built-in tasks, local files, Hub ids, mixtures) and their row
               formats
    runs.py    the output folder and its lock, metrics.jsonl and trackers, completions.jsonl,
               checkpoints and --resume, the optimizer and its schedule, and how a run ends

The algorithm-facing code is elsewhere: each method's script, common.py (what defines the policy's
numbers) and tasks.py (the environment). Nothing here imports them back except data.py (tasks for
the built-in tasks, common for the prompt encoding), so there is no import cycle.
"""
