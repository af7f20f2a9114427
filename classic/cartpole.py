"""Classical policy gradients on CartPole-v1: REINFORCE, REINFORCE with a learned baseline,
actor-critic and PPO, the progression the documents behind this project start from ("Implement
vanilla REINFORCE to understand policy gradients. Add a baseline to see variance reduction in
action. Progress to actor-critic for value function estimation. Implement PPO to understand trust
regions and stable optimization.").

Each rung changes one thing:

    --algo        advantage A_t of the action a_t taken in s_t               updates per batch
    reinforce     G_t = Σ_k γ^k r_{t+k}, the Monte-Carlo return              one gradient step
    baseline      G_t - V(s_t), V regressed on G_t                           one gradient step
    actor_critic  GAE Σ_k (γλ)^k δ_{t+k}, δ_t = r_t + γ V(s_{t+1}) - V(s_t)  one gradient step
    ppo           the same GAE, normalised per mini-batch                    clipped epochs

The algorithm is ppo.py's own functions, imported, not copied: what trains a language model with
PPO trains CartPole. An episode is laid out as a response is: each of --envs environments plays one
episode per batch, right-padded into (N, T) tensors with a mask. Then
- ppo.gae with V = 0 and λ = 1 is the discounted return G_t; with a learned V and λ = 1 it is
  G_t - V(s_t) (the sum of the δ telescopes); with λ < 1 it bootstraps (Schulman et al. 2016,
  Eq. 16, https://arxiv.org/abs/1506.02438). Past a terminated episode's last step V is 0, as past
  a response's last token; an episode cut by the time limit (truncated, 500 steps) gets γ V(s_T)
  added to its last reward: its future is bootstrapped, not taken for 0 (reinforce has no V: its
  G_t stops at the cut).
- ppo.policy_loss at the policy that sampled has ratio 1: the clip cannot engage and its gradient
  is -mean_t A_t ∇ log π(a_t|s_t), the policy gradient (Williams 1992,
  https://doi.org/10.1007/BF00992696). The first three take one step of it per batch; ppo takes
  --epochs passes of --minibatches, where the ratio moves and the clip bounds it (Schulman et al.
  2017, Eq. 7, https://arxiv.org/abs/1707.06347).
- ppo.value_loss with an infinite clip range is ½ (V - R)²; ppo clips it at ±--clip_coef
  (cleanrl's clip_vloss).

The rest is cleanrl's CartPole setup (https://docs.cleanrl.dev/rl-algorithms/ppo/), for all four:
two 64-unit tanh networks with orthogonal initialisation, Adam (eps 1e-5) with the learning rate
annealed linearly to 0, gradients clipped at norm 0.5, an entropy bonus of 0.01, γ = 0.99,
λ = 0.95. The learning rates (LEARNING_RATES) are ours, not cleanrl's 2.5e-4 (tuned for 500k
steps): from a scan of 200-episode runs, 1e-2 for the one-step algorithms (one step per batch)
and 1e-3 for ppo (sixteen per batch).

    python classic/cartpole.py --algo ppo                          # one run of 1,000 episodes
    python classic/cartpole.py --runs 20 --episodes 1000           # the four, 20 runs each
    python classic/cartpole.py --algo ppo --steps 500000 --runs 3  # cleanrl's anchor

Writes --output_dir/returns.json (every episode's return and the environment steps so far, per
algorithm and run), table.md (the mean return of each run's last 100 episodes: the mean over runs
with its 95% interval) and, with matplotlib, cartpole.png (the mean learning curves with 95%
bands). Runs go to --workers processes of one thread each. Needs gymnasium (pip install
gymnasium), for this file only. It lives in classic/, outside the LLM scripts, because it shares
nothing with them but ppo.py's functions: no model, tokenizer or chat template.
"""
import importlib.util
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root
from plumbing.args import POSITIVE, arg, at_least, between, check_args, parse_args  # noqa: E402
from plumbing.errors import UserError  # noqa: E402
from plumbing.runs import run  # noqa: E402
from ppo import gae, masked_whiten, policy_loss, value_loss  # noqa: E402

ALGOS = ("reinforce", "baseline", "actor_critic", "ppo")
LEARNING_RATES = {"reinforce": 1e-2, "baseline": 1e-2, "actor_critic": 1e-2, "ppo": 1e-3}


@dataclass
class Args:
    algo: str = arg("all", "reinforce, baseline, actor_critic, ppo, or all (the four)")
    runs: int = arg(1, "independent runs of each algorithm (seeds --seed, --seed + 1, ...)")
    episodes: int = arg(1000, "training episodes per run")
    steps: int = arg(0, "train for this many environment steps instead of --episodes (0: off)")
    envs: int = arg(4, "environments played in parallel: the episodes of one batch")
    learning_rate: Optional[float] = arg(None, "Adam's learning rate (default: the "
                                         f"algorithm's own, {LEARNING_RATES})")
    gamma: float = arg(0.99, "discount γ")
    gae_lambda: float = arg(0.95, "λ of actor_critic's and ppo's advantages")
    epochs: int = arg(4, "ppo: passes over each batch")
    minibatches: int = arg(4, "ppo: mini-batches per pass")
    clip_coef: float = arg(0.2, "ppo: ε of the clipped surrogate and of the value clipping")
    ent_coef: float = arg(0.01, "weight of the entropy bonus")
    vf_coef: float = arg(0.5, "weight of the value loss")
    max_grad_norm: float = arg(0.5, "clip the gradient's norm to this")
    hidden: int = arg(64, "units of each of the networks' two hidden layers")
    seed: int = arg(1, "seed of the first run")
    workers: int = arg(2, "processes the runs are spread over, one thread each")
    output_dir: str = arg("out/cartpole", "where returns.json, table.md and cartpole.png go")
    overwrite_output_dir: bool = arg(False, "replace the results --output_dir already holds")

    def __post_init__(self):
        if self.algo not in ALGOS + ("all",):
            raise UserError(f"--algo {self.algo}: choose {', '.join(ALGOS)} or all")
        check_args(self, runs=at_least(1), episodes=at_least(1), steps=at_least(0),
                   envs=at_least(1), gamma=between(0, 1), gae_lambda=between(0, 1),
                   epochs=at_least(1), minibatches=at_least(1), clip_coef=POSITIVE,
                   ent_coef=at_least(0), vf_coef=at_least(0), hidden=at_least(1),
                   workers=at_least(1))
        if importlib.util.find_spec("gymnasium") is None:
            raise UserError("classic/cartpole.py needs gymnasium: pip install gymnasium")


# --------------------------------------------------------------------------------------------------
# The algorithm: a batch's advantages and its update. ppo.py's functions do the math.
def advantages(algo, rewards, values, mask, truncated, final_values, gamma, lam):
    """The table in the docstring. rewards, values, mask: (N, T), one right-padded episode per row;
    truncated: (N,) bool, the episode was cut by the time limit; final_values: (N,) V of the state
    it was cut in. Returns (advantages, value targets), (N, T), 0 on padding."""
    if algo == "reinforce":
        returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)  # G_t
        return returns, returns
    last = mask.sum(1).long() - 1
    rewards = rewards.clone()
    rewards[torch.arange(len(last)), last] += gamma * final_values * truncated  # bootstrap a cut
    return gae(rewards, values, mask, gamma, 1.0 if algo == "baseline" else lam)


def update(algo, actor, critic, opt, batch, args, generator):
    """One batch's updates; batch: flat (M,) tensors over the batch's real steps (obs (M, 4)). The
    first three: one gradient step on the whole batch, at the policy that sampled it (ratio 1).
    ppo: --epochs passes over --minibatches, against the log-probs and values it was sampled with
    (cleanrl: advantages normalised per mini-batch, the value loss clipped)."""
    ppo = algo == "ppo"
    epochs, minibatches = (args.epochs, args.minibatches) if ppo else (1, 1)
    params = [p for g in opt.param_groups for p in g["params"]]
    for _ in range(epochs):
        for i in torch.randperm(len(batch["actions"]), generator=generator).chunk(minibatches):
            logits = torch.log_softmax(actor(batch["obs"][i]), -1)
            logp = logits.gather(-1, batch["actions"][i, None]).squeeze(-1)
            entropy = -(logits.exp() * logits).sum(-1).mean()
            A, ones = batch["advantages"][i], torch.ones_like(logp)
            A = masked_whiten(A, ones) if ppo else A
            old_logp = batch["logp"][i] if ppo else logp.detach()  # one step: ratio 1, no clip
            loss = policy_loss(logp, old_logp, A, ones, args.clip_coef)[0] - args.ent_coef * entropy
            if critic is not None:
                v = critic(batch["obs"][i]).squeeze(-1)
                old_v = batch["values"][i] if ppo else v.detach()
                clip = args.clip_coef if ppo else math.inf  # an infinite range: ½ (V - R)²
                v_loss = value_loss(v, old_v, batch["returns"][i], ones, clip)[0]
                loss = loss + args.vf_coef * v_loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            opt.step()


# --------------------------------------------------------------------------------------------------
# Playing: a batch of episodes, and the networks.
def mlp(n_in, n_out, hidden, last_std):
    """cleanrl's network: two tanh hidden layers, orthogonal weights (gain √2, the output layer's
    last_std: 0.01 for the policy, 1 for the value), zero biases."""
    layers = [torch.nn.Linear(n_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden),
              torch.nn.Tanh(), torch.nn.Linear(hidden, n_out)]
    for layer, std in zip(layers[::2], (math.sqrt(2), math.sqrt(2), last_std)):
        torch.nn.init.orthogonal_(layer.weight, std)
        torch.nn.init.zeros_(layer.bias)
    return torch.nn.Sequential(*layers)


@torch.no_grad()
def play(envs, actor, generator):
    """One episode in each of the vector's N environments, actions sampled from the policy. Returns
    obs (N, T, 4), actions (N, T), rewards (N, T), mask (N, T), right-padded as responses are,
    truncated (N,) (cut by the time limit, not fallen) and final_obs (N, 4), the state each episode
    ended in. gymnasium resets an environment on the step after its episode ends (its autoreset):
    those steps are masked out."""
    obs, _ = envs.reset()
    alive = np.ones(envs.num_envs, bool)
    truncated, final_obs, steps = np.zeros_like(alive), np.zeros_like(obs), []
    while alive.any():
        probs = torch.softmax(actor(torch.from_numpy(obs)), -1)
        action = torch.multinomial(probs, 1, generator=generator).squeeze(1).numpy()
        next_obs, reward, term, trunc, _ = envs.step(action)
        steps.append((obs, action, reward, alive.copy()))
        ended = alive & (term | trunc)
        final_obs[ended], truncated[ended] = next_obs[ended], (trunc & ~term)[ended]
        alive &= ~ended
        obs = next_obs
    obs, actions, rewards, mask = (torch.from_numpy(np.stack(x, 1)) for x in zip(*steps))
    return (obs, actions.long(), rewards.float(), mask.float(), torch.from_numpy(truncated),
            torch.from_numpy(final_obs))


def train(algo, seed, args):
    """One run of one algorithm. Returns {"returns": each episode's return in the order they ended,
    "steps": the environment steps after each, "seconds": the run's wall time}."""
    import gymnasium
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    envs = gymnasium.make_vec("CartPole-v1", num_envs=args.envs,
                              vectorization_mode="vector_entry_point")  # numpy-vectorised
    envs.reset(seed=seed)
    actor = mlp(4, 2, args.hidden, 0.01)
    critic = None if algo == "reinforce" else mlp(4, 1, args.hidden, 1.0)
    lr = args.learning_rate or LEARNING_RATES[algo]
    params = [*actor.parameters(), *(critic.parameters() if critic else [])]
    opt = torch.optim.Adam(params, lr=lr, eps=1e-5)
    returns, steps, start = [], [], time.perf_counter()

    def spent():  # the share of the run's budget (--steps or --episodes) used so far
        if args.steps:
            return (steps[-1] if steps else 0) / args.steps
        return len(returns) / args.episodes
    while spent() < 1:
        opt.param_groups[0]["lr"] = lr * (1 - spent())  # annealed linearly to 0
        obs, actions, rewards, mask, truncated, final_obs = play(envs, actor, generator)
        real = mask.bool()
        with torch.no_grad():
            values = critic(obs).squeeze(-1) * mask if critic else torch.zeros_like(rewards)
            final_values = critic(final_obs).squeeze(-1) if critic else torch.zeros(len(rewards))
            A, R = advantages(algo, rewards, values, mask, truncated, final_values, args.gamma,
                              args.gae_lambda)
            logp = torch.log_softmax(actor(obs[real]), -1)
            logp = logp.gather(-1, actions[real, None]).squeeze(-1)
        batch = {"obs": obs[real], "actions": actions[real], "logp": logp, "values": values[real],
                 "advantages": A[real], "returns": R[real]}
        update(algo, actor, critic, opt, batch, args, generator)
        for length in mask.sum(1).long().tolist():  # a CartPole return is the episode's length
            returns.append(float(length))
            steps.append((steps[-1] if steps else 0) + length)
    n = len(returns) if args.steps else args.episodes
    return {"returns": returns[:n], "steps": steps[:n], "seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------------------------------
# The experiment: runs in parallel, the table with intervals over runs, the figure.
def t_quantile(df):
    """The 0.975 quantile of Student's t with df degrees of freedom: tabled for 1 to 3, else the
    Cornish-Fisher expansion around the normal's (Abramowitz & Stegun 26.7.5; within 0.001)."""
    if df <= 3:
        return {1: 12.706, 2: 4.303, 3: 3.182}[df]
    z = statistics.NormalDist().inv_cdf(0.975)
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * df**4))


def mean_interval(xs):
    """(mean, low, high): the mean of xs with its 95% t-interval (one value: no interval)."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, m, m
    half = t_quantile(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return m, m - half, m + half


def table(results, last=100):
    rows = ["| algorithm | runs | mean return, last 100 episodes [95% interval over runs] "
            "| std over runs | env steps | seconds per run |", "|---|---|---|---|---|---|"]
    for algo, runs in results.items():
        finals = [statistics.fmean(r["returns"][-last:]) for r in runs]
        m, lo, hi = mean_interval(finals)
        std = statistics.stdev(finals) if len(finals) > 1 else 0.0
        rows.append(f"| {algo} | {len(runs)} | {m:.1f} [{lo:.1f}, {hi:.1f}] | {std:.1f} "
                    f"| {statistics.fmean(r['steps'][-1] for r in runs):,.0f} "
                    f"| {statistics.fmean(r['seconds'] for r in runs):.1f} |")
    return "\n".join(rows) + "\n"


def figure(results, path, window=10):
    """The mean learning curve of each algorithm over its runs (each run's returns averaged over
    `window` episodes), with its 95% band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for algo, runs in results.items():
        n = min(len(r["returns"]) for r in runs)
        window = min(window, n)
        kernel = np.ones(window) / window
        curves = np.stack([np.convolve(r["returns"][:n], kernel, "valid") for r in runs])
        mean = curves.mean(0)
        half = (t_quantile(len(runs) - 1) * curves.std(0, ddof=1) / math.sqrt(len(runs))
                if len(runs) > 1 else 0 * mean)
        x = np.arange(window, n + 1)
        ax.plot(x, mean, label=algo)
        ax.fill_between(x, mean - half, mean + half, alpha=0.25)
    ax.set(xlabel="episode", ylabel=f"return (mean of {window} episodes)", title="CartPole-v1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _train(job):
    return train(*job)


def main():
    args = parse_args(Args)
    out = os.path.join(args.output_dir, "returns.json")
    if os.path.exists(out) and not args.overwrite_output_dir:
        raise UserError(f"--output_dir {args.output_dir} already holds results; choose another "
                        "or pass --overwrite_output_dir")
    os.makedirs(args.output_dir, exist_ok=True)
    algos = ALGOS if args.algo == "all" else (args.algo,)
    jobs = [(algo, args.seed + r, args) for algo in algos for r in range(args.runs)]
    start = time.perf_counter()
    if args.workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(min(args.workers, len(jobs))) as pool:
            done = pool.map(_train, jobs, chunksize=1)
    else:
        done = [_train(job) for job in jobs]
    results = {algo: done[i * args.runs:(i + 1) * args.runs] for i, algo in enumerate(algos)}
    text = table(results)
    seconds = time.perf_counter() - start
    print(text + f"\n{len(jobs)} runs in {seconds:.0f} s on {args.workers} worker(s)")
    saved = {"args": asdict(args), "seconds": seconds, "results": results}
    for name, write in (("returns.json", lambda f: json.dump(saved, f)),
                        ("table.md", lambda f: f.write(text))):
        path = os.path.join(args.output_dir, name)
        with open(path + ".tmp", "w") as f:  # written whole, then renamed: never half a file
            write(f)
        os.replace(path + ".tmp", path)
    if importlib.util.find_spec("matplotlib"):
        figure(results, os.path.join(args.output_dir, "cartpole.png"))


if __name__ == "__main__":
    run(main)
