"""classic/cartpole.py: each algorithm's advantages by hand on a batch with a terminated and a truncated episode,
the episodes of a real vector environment laid out as responses, the one-step update as the policy gradient, PPO's
clip on its limiting side, the interval's t quantile, a short seeded run of each algorithm that learns, bad inputs."""
import json
import math
import os
import sys

import pytest
import torch

from conftest import ROOT, ok, run_script

gymnasium = pytest.importorskip("gymnasium")
sys.path.insert(0, os.path.join(ROOT, "classic"))
import cartpole  # noqa: E402

# two episodes, γ = 0.9, λ = 0.5: A fell after 3 steps (terminated), B was cut after 2 (truncated) in a state
# whose value is 3; A's final state has value 7, which must not count (a fallen pole has no future)
REWARDS = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
VALUES = torch.tensor([[0.5, 0.4, 0.3], [2.0, 1.0, 0.0]])
TRUNCATED, FINAL_VALUES = torch.tensor([False, True]), torch.tensor([7.0, 3.0])


def advantages(algo):
    A, R = cartpole.advantages(algo, REWARDS, VALUES, MASK, TRUNCATED, FINAL_VALUES, 0.9, 0.5)
    assert (A[MASK == 0] == 0).all() and (R[MASK == 0] == 0).all()
    return A[MASK.bool()].tolist(), R[MASK.bool()].tolist()


def test_reinforce_is_the_monte_carlo_return_and_never_bootstraps():
    # A: G_2 = 1, G_1 = 1 + 0.9 = 1.9, G_0 = 1 + 0.9 x 1.9 = 2.71; B: 1.9, 1 (no critic: nothing to bootstrap)
    A, R = advantages("reinforce")
    assert A == pytest.approx([2.71, 1.9, 1.0, 1.9, 1.0])
    assert R == A


def test_baseline_is_the_return_minus_the_value_and_bootstraps_the_truncated_episode():
    # A: G - V = (2.71 - 0.5, 1.9 - 0.4, 1 - 0.3); B: the last reward gets 0.9 x 3: G_1 = 3.7, G_0 = 1 + 0.9 x 3.7
    A, R = advantages("baseline")
    assert A == pytest.approx([2.21, 1.5, 0.7, 4.33 - 2.0, 3.7 - 1.0])
    assert R == pytest.approx([2.71, 1.9, 1.0, 4.33, 3.7])


def test_actor_critic_is_gae():
    # δ = r + γ V' - V, V' = 0 past A's end, 3 past B's cut. A: δ = (1 + 0.36 - 0.5, 1 + 0.27 - 0.4, 1 - 0.3)
    # = (0.86, 0.87, 0.7); A_2 = 0.7, A_1 = 0.87 + 0.45 x 0.7 = 1.185, A_0 = 0.86 + 0.45 x 1.185 = 1.39325.
    # B: δ = (1 + 0.9 - 2, 1 + 2.7 - 1) = (-0.1, 2.7); A_1 = 2.7, A_0 = -0.1 + 0.45 x 2.7 = 1.115
    A, R = advantages("actor_critic")
    assert A == pytest.approx([1.39325, 1.185, 0.7, 1.115, 2.7])
    assert R == pytest.approx([1.89325, 1.585, 1.0, 3.115, 3.7])  # A + V: the value targets
    assert advantages("ppo") == (A, R)


def test_play_lays_episodes_out_as_right_padded_responses():
    envs = gymnasium.make_vec("CartPole-v1", num_envs=8, vectorization_mode="vector_entry_point",
                              max_episode_steps=20)
    envs.reset(seed=0)
    torch.manual_seed(0)
    actor = cartpole.mlp(4, 2, 8, 0.01)
    obs, actions, rewards, mask, truncated, final_obs = cartpole.play(envs, actor, torch.Generator().manual_seed(0))
    lengths = mask.sum(1).long()
    assert obs.shape[:2] == actions.shape == rewards.shape == mask.shape and obs.shape[2] == 4
    assert mask.shape[1] == lengths.max() <= 20
    for row, n in zip(mask, lengths.tolist()):  # a block of ones, then padding
        assert row[:n].eq(1).all() and row[n:].eq(0).all()
    assert ((rewards * mask).sum(1) == lengths).all()  # CartPole: 1 per step
    assert truncated.tolist() == (lengths == 20).tolist()  # cut by the limit, else fallen
    assert truncated.any() and not truncated.all()
    # a fallen pole: its final state is outside the limits (12 degrees, 2.4 units)
    fallen = final_obs[~truncated]
    assert ((fallen[:, 2].abs() > 12 * 2 * math.pi / 360) | (fallen[:, 0].abs() > 2.4)).all()


def test_one_step_at_the_sampling_policy_is_the_policy_gradient():
    """ppo.policy_loss with old_logp = logp.detach(): ratio 1, the clip never engages (even for
    advantages far outside ±ε), and the gradient is -mean A ∇ log π."""
    torch.manual_seed(0)
    logits = torch.randn(5, 2, requires_grad=True)
    actions, A = torch.tensor([0, 1, 1, 0, 1]), torch.tensor([30.0, -2.0, 5.0, 0.5, -40.0])
    logp = torch.log_softmax(logits, -1).gather(-1, actions[:, None]).squeeze(-1)
    loss, clipfrac, _ = cartpole.policy_loss(logp, logp.detach(), A, torch.ones(5), 0.2)
    g = torch.autograd.grad(loss, logits, retain_graph=True)[0]
    direct = torch.autograd.grad(-(A * logp).mean(), logits)[0]
    assert torch.allclose(g, direct) and clipfrac == 0


def test_the_ppo_clip_engages_on_its_limiting_side_only():
    # ε = 0.2. Ratio 1.5 with A = +1: clipped at 1.2, no gradient; ratio 0.5 with A = -1: clipped at 0.8, no
    # gradient; ratio 1.5 with A = -1 and ratio 0.5 with A = +1: not clipped (the pessimistic side), gradient -A ρ.
    ratio = torch.tensor([1.5, 0.5, 1.5, 0.5])
    A = torch.tensor([1.0, -1.0, -1.0, 1.0])
    logp = torch.zeros(4, requires_grad=True)
    loss, clipfrac, _ = cartpole.policy_loss(logp, -torch.log(ratio), A, torch.ones(4), 0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8 + 1.5 - 0.5) / 4)
    assert clipfrac.item() == pytest.approx(0.5)
    assert torch.autograd.grad(loss, logp)[0].tolist() == pytest.approx([0, 0, 1.5 / 4, -0.5 / 4])


def test_an_infinite_value_clip_is_plain_regression():
    v, old, R = torch.tensor([1.0, 5.0]), torch.tensor([0.0, 0.0]), torch.tensor([2.0, 1.0])
    assert cartpole.value_loss(v, old, R, torch.ones(2), math.inf)[0].item() == pytest.approx(0.5 * (1 + 16) / 2)
    # clipped at ±0.2 around old: (0.2 - 2)² = 3.24 > 1, (0.2 - 1)² = 0.64 < 16
    assert cartpole.value_loss(v, old, R, torch.ones(2), 0.2)[0].item() == pytest.approx(0.5 * (3.24 + 16) / 2)


def test_t_quantile_and_interval():
    for df, t in ((1, 12.706), (2, 4.303), (3, 3.182), (9, 2.262), (19, 2.093), (100, 1.984)):
        assert cartpole.t_quantile(df) == pytest.approx(t, abs=0.001)
    m, lo, hi = cartpole.mean_interval([1.0, 2.0, 3.0])  # sd 1: half-width 4.303 / √3
    assert (m, hi - m) == pytest.approx((2.0, 4.303 / math.sqrt(3)), abs=1e-3) and lo == pytest.approx(2 * m - hi)


@pytest.mark.parametrize("algo", cartpole.ALGOS)
def test_each_algorithm_learns_in_a_short_seeded_run(algo):
    """A random policy's return is ~22; 200 episodes take each algorithm well above it."""
    args = cartpole.Args(algo=algo, episodes=200)
    out = cartpole.train(algo, 1, args)
    assert len(out["returns"]) == 200 and out["steps"][-1] == sum(out["returns"])
    first, last = sum(out["returns"][:20]) / 20, sum(out["returns"][-20:]) / 20
    assert first < 40 and last > 80, (first, last)


def test_the_experiment_writes_its_table_and_figure(tmp_path):
    out = tmp_path / "cp"
    p = ok(run_script("classic/cartpole.py", "--algo", "reinforce", "--runs", 2, "--episodes", 8,
                      "--workers", 2, "--output_dir", out))
    assert "| reinforce | 2 |" in p.stdout
    results = json.load(open(out / "returns.json"))["results"]["reinforce"]
    assert [len(r["returns"]) for r in results] == [8, 8] and results[0]["returns"] != results[1]["returns"]
    assert (out / "table.md").read_text() in p.stdout and (out / "cartpole.png").stat().st_size > 0
    p = run_script("classic/cartpole.py", "--algo", "reinforce", "--episodes", 8, "--output_dir", out)
    assert p.returncode == 2 and "--overwrite_output_dir" in p.stderr


@pytest.mark.parametrize("argv, says", [
    (["--algo", "dqn"], "--algo dqn: choose reinforce, baseline, actor_critic, ppo or all"),
    (["--envs", "0"], "--envs 0: must be at least 1"),
    (["--gamma", "1.5"], "--gamma 1.5: must be in [0, 1]"),
    (["--learning_rate", "-1"], "--learning_rate -1.0: must be above 0"),
    (["--runs", "2", "--bogus", "1"], "unknown arguments: --bogus 1; see --help"),
])
def test_bad_arguments_are_one_line(argv, says, tmp_path):
    p = run_script("classic/cartpole.py", *argv, "--output_dir", tmp_path / "x")
    assert p.returncode == 2 and p.stderr.strip() == f"error: {says}", p.stderr
    assert not (tmp_path / "x").exists()


def test_without_gymnasium_it_says_what_to_install(monkeypatch):
    import importlib.util
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "gymnasium" else find(name))
    with pytest.raises(cartpole.UserError, match="needs gymnasium: pip install gymnasium"):
        cartpole.Args()


def test_the_algorithm_is_ppo_py_s_own_functions():
    import ppo
    assert (cartpole.gae, cartpole.policy_loss, cartpole.value_loss, cartpole.masked_whiten) == \
        (ppo.gae, ppo.policy_loss, ppo.value_loss, ppo.masked_whiten)
