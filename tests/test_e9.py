"""E9: the modified flow of Multilayer Lookahead (Pushkin & Barba eq. 27) against the exact
average of an epoch over the orderings of the mini-batches."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.linalg import expm

from experiments import e9_implicit_regularizer as e9
from tests.test_experiments import check_outputs


def paper_epoch(problem, order, ks, alphas, lr, y0):
    """One epoch by the paper's recursion (appendix A.2), written independently of the project:
    LA-n does r rounds of ``x = LA-(n-1)(y, k_n rounds); y = y + alpha_n (x - y)``, LA-0 is SGD;
    level 1 innermost.  Gradients in closed form, numpy."""
    H = problem.hessians.numpy()
    q = problem.linear.numpy()
    batches = iter(order)

    def run(y, n, rounds):
        for _ in range(rounds):
            if n == 0:
                a = next(batches)
                y = y - lr * (H[a] @ y - q[a])
            else:
                x = run(y, n - 1, ks[n - 1])
                y = y + alphas[n - 1] * (x - y)
        return y

    return run(y0.numpy().copy(), len(ks), len(order) // math.prod(ks))


@pytest.mark.parametrize("ks, alphas, m", [((2,), (0.5,), 4), ((2, 2), (0.5, 0.8), 4), ((2, 1, 2), (0.5, 0.7, 0.9), 4)])
def test_enumerated_average_equals_brute_force(ks, alphas, m):
    problem = e9.least_squares(m, 3, 3, seed=1)
    y0 = torch.tensor([0.3, -1.0, 0.7], dtype=torch.float64)
    lr = 0.2
    brute = np.mean([paper_epoch(problem, order, ks, alphas, lr, y0)
                     for order in itertools.permutations(range(m))], axis=0)
    enumerated = e9.expected_epoch(problem, ks, alphas, lr, y0)
    assert np.abs(brute).max() > 0.1  # not a trivial value
    np.testing.assert_allclose(enumerated.numpy(), brute, rtol=0, atol=1e-13)


def test_simulator_matches_reference_on_one_ordering():
    problem = e9.least_squares(4, 3, 3, seed=2)
    y0 = torch.tensor([1.0, 0.5, -0.5], dtype=torch.float64)
    order = [2, 0, 3, 1]
    ref = e9.lookahead_epochs(problem, (2, 2), (0.5, 0.8), 0.3, y0, torch.tensor([order]))[0]
    sim = e9.simulator_epoch(problem, (2, 2), (0.5, 0.8), 0.3, y0, order)
    assert (ref - y0).abs().max() > 0.01
    torch.testing.assert_close(sim, ref, rtol=0, atol=1e-14)


def test_an_ai_and_their_gradients_match_autograd():
    problem = e9.least_squares(5, 3, 4, seed=3)
    w = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    losses = problem.batch_losses(w)
    # per-batch gradients by autograd, from the data (not from H_a, q_a)
    g = torch.stack([torch.autograd.grad(losses[a], w, create_graph=True)[0] for a in range(5)])
    an = g.pow(2).sum(1).mean()
    ai = sum(g[a] @ g[b] for a in range(5) for b in range(5) if a != b) / 20
    torch.testing.assert_close(problem.an(w.detach()), an.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(problem.ai(w.detach()), ai.detach(), rtol=1e-12, atol=0)
    an_grad, = torch.autograd.grad(an, w, retain_graph=True)
    ai_grad, = torch.autograd.grad(ai, w)
    torch.testing.assert_close(problem.an_gradient(w.detach()), an_grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(problem.ai_gradient(w.detach()), ai_grad, rtol=1e-12, atol=1e-14)
    assert ai_grad.norm() > 0.1 and (ai_grad - an_grad).norm() > 0.1  # AI and AN differ here


def test_flow_endpoint_matches_matrix_exponential():
    problem = e9.least_squares(4, 3, 3, seed=5)
    y0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    c_an, c_ai, time = 0.03, 0.05, 0.7
    # grad f~(y) = M y - c is affine: read M and c off it, then y(t) from the augmented exponential.
    c = -problem.modified_gradient(torch.zeros(3, dtype=torch.float64), c_an, c_ai).numpy()
    M = np.stack([problem.modified_gradient(torch.eye(3, dtype=torch.float64)[i], c_an, c_ai).numpy() + c
                  for i in range(3)], 1)
    augmented = np.zeros((4, 4))
    augmented[:3, :3], augmented[:3, 3] = -M, c
    exact = (expm(time * augmented) @ np.append(y0.numpy(), 1.0))[:3]
    got = e9.flow_endpoint(problem, y0, time, c_an, c_ai).numpy()
    assert np.abs(exact - y0.numpy()).max() > 0.1
    np.testing.assert_allclose(got, exact, rtol=0, atol=1e-11)


@pytest.mark.parametrize("ks, alphas", [((3,), (0.3,)), ((2, 3), (0.5, 0.8)), ((3, 2), (0.9, 0.4)),
                                         ((2, 2, 2), (0.5, 0.7, 0.9)), ((2, 3, 2, 1), (0.6, 0.75, 0.85, 0.5))])
def test_backward_error_analysis_gives_eq27_constants(ks, alphas):
    period = math.prod(ks)
    for rounds in (1, 2):
        derived = e9.derived_constants(ks, alphas, rounds * period)
        assert derived == pytest.approx(e9.eq27_constants(ks, alphas), rel=1e-12, abs=1e-15)
    if len(ks) > 1:  # eq. 27 with level 1 the outermost is another flow
        assert e9.eq27_constants(ks[::-1], alphas[::-1])[1] != pytest.approx(e9.eq27_constants(ks, alphas)[1])


def test_slopes_three_for_eq27_two_for_the_wrong_flows():
    problem = e9.least_squares(4, 4, 3, seed=0)
    y0 = torch.tensor([0.5, -1.0, 1.5], dtype=torch.float64)
    r = e9.measure(problem, (2, 2), (0.5, 0.8), [0.004, 0.0126, 0.04], y0)
    slopes = r["slopes"]
    assert 2.85 < slopes["eq. 27"] < 3.15
    for wrong in ("gradient flow", "eq. 27, AI sign flipped", "eq. 27, levels read outer-first"):
        assert 1.85 < slopes[wrong] < 2.15, wrong
    a, b = e9.eq27_constants((2, 2), (0.5, 0.8))
    assert r["measured"] == pytest.approx((a, b), rel=1e-3)


def test_tiny_main_writes_its_files(tmp_path):
    out = e9.main(["--out", str(tmp_path), "--tiny"])
    text = check_outputs(tmp_path, e9.NAME)
    assert set(out["results"]) == {"LA-1", "LA-2", "LA-3"} and len(out["gammas"]) == 3
    for label, r in out["results"].items():
        assert r["slopes"]["eq. 27"] > 2.8 and r["slopes"]["gradient flow"] < 2.2, label
        assert f"| {label}: k=" in text
    flows = [line.split(" | ")[1] for line in text.splitlines() if line.startswith("| LA-")]
    assert flows.count("eq. 27") == 3 and flows.count("eq. 27, levels read outer-first") == 2
    assert flows.count("a (AN)") == flows.count("b (AI)") == 3  # the constants' table


def test_bad_input():
    problem = e9.least_squares(6, 2, 2)
    y0 = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="m .*multiple of k_1 ... k_n = 4"):
        e9.expected_epoch(problem, (2, 2), (0.5, 0.5), 0.1, y0)
    with pytest.raises(ValueError, match=r"m \(mini-batches per epoch\) must be an int in 1..9"):
        e9.orderings(10)
    with pytest.raises(ValueError, match="alpha"):
        e9.eq27_constants((2,), (1.5,))
    with pytest.raises(ValueError, match="--gamma-max must be a positive"):
        e9.main(["--gamma-max", "0"])
    with pytest.raises(ValueError, match="--points must be an integer >= 2"):
        e9.main(["--points", "1"])
