"""Draw runs' metrics.jsonl against steps into one PNG: one panel per metric, one line per run.

    python bench/plot.py out/grpo out/sft_more --metrics eval/accuracy,reward,kl --out grpo.png
    python bench/plot.py out/grpo --x time     # against wall time (the sum of seconds_per_step) instead of steps

A run is an output folder (or its metrics.jsonl). A metric missing from a run is left out of its panel; rows of a
resumed run that repeat a step are drawn once (the last one). Needs matplotlib (pip install matplotlib).
"""
import argparse
import json
import os


def read_metrics(run):
    """{metric: [(step, seconds since the start, value)]} of one run."""
    path = run if run.endswith(".jsonl") else os.path.join(run, "metrics.jsonl")
    by_step = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                by_step.setdefault(row["step"], {}).update(row)
    series, elapsed = {}, 0.0
    for step in sorted(by_step):
        row = by_step[step]
        elapsed += row.get("seconds_per_step", 0.0)
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                series.setdefault(k, []).append((step, elapsed, v))
    return series


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="output folders or metrics.jsonl files")
    p.add_argument("--metrics", default="eval/accuracy,reward,kl,loss", help="comma-separated metric names")
    p.add_argument("--labels", default="", help="comma-separated names of the runs (default: their folders)")
    p.add_argument("--x", default="step", choices=["step", "time"], help="steps, or minutes of training")
    p.add_argument("--out", default="metrics.png")
    args = p.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    labels = args.labels.split(",") if args.labels else [r.rstrip("/") for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"--labels has {len(labels)} names for {len(args.runs)} runs")
    runs = [read_metrics(r) for r in args.runs]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, (label, series) in enumerate(zip(labels, runs)):
            points = series.get(metric)
            if points:  # a run keeps its colour in every panel, also where another run has no such metric
                xs = [s if args.x == "step" else t / 60 for s, t, _ in points]
                ax.plot(xs, [v for _, _, v in points], marker="o" if len(points) < 30 else None, ms=3, label=label,
                        color=f"C{i}")
        ax.set_title(metric)
        ax.set_xlabel("step" if args.x == "step" else "minutes of training")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
