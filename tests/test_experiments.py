"""Each experiment's main runs in a tiny configuration and writes its table and plot."""

import pytest

from experiments import e1_noisy_quadratic, e2_digits, e3_convergence_bound, e4_nested, e5_slrla, e6_adaptive

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_outputs(folder, name):
    md, png = folder / f"{name}.md", folder / f"{name}.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    text = md.read_text()
    assert text.startswith("# ") and "![" in text and f"({name}.png)" in text
    assert f"python -m experiments.{name}" in text  # the command that regenerates it
    return text


def test_e1_tiny(tmp_path):
    out = e1_noisy_quadratic.main([
        "--out", str(tmp_path), "--replicas", "200", "--burn-in", "100", "--window", "100",
        "--match-steps", "20", "--match-replicas", "16", "--fig-dim", "8", "--fig-steps", "50",
        "--fig-lrs", "4", "--fig-alphas", "3",
    ])
    text = check_outputs(tmp_path, "e1_noisy_quadratic")
    # 5 coordinates + the loss, for SGD and for LA; each row says whether it agrees.
    assert len(out["steady_rows"]) == 12 and len(out["agree"]) == 12
    assert text.count("| SGD | V_") == 5 and text.count("| LA (k=5, alpha=0.5) | V_") == 5
    # Burn-in 100 is long enough here (contraction <= 0.88 per step): the estimates agree.
    assert sum(out["agree"]) >= 11
    # The matched pair starts from the same loss and shares L*.
    la, sgd = out["curves"]["LA"], out["curves"]["SGD"]
    assert la["theory"][0] == pytest.approx(sgd["theory"][0], rel=1e-12)
    assert la["steps"] == [0, 5, 10, 15, 20] and sgd["steps"] == list(range(21))


def test_e1_matched_learning_rate_gives_equal_steady_state_loss():
    from experiments import nqm

    problem = nqm.noisy_quadratic(dim=6)
    h, s = problem.curvatures, problem.noise
    target = float(nqm.expected_loss(h, s, 0.0, nqm.lookahead_variance(h, s, 0.6, 5, 0.5)))
    lr = e1_noisy_quadratic.matched_sgd_lr(h, s, 1, target)
    assert 0 < lr < 0.6
    assert e1_noisy_quadratic.steady_loss_sgd(h, s, 1, lr) == pytest.approx(target, rel=1e-12)


def test_e2_tiny(tmp_path):
    out = e2_digits.main([
        "--out", str(tmp_path), "--problems", "digits_logistic", "--optimizers", "SGD", "LA-1", "LA-2",
        "--seeds", "2", "--steps", "40", "--eval-every", "20",
    ])
    text = check_outputs(tmp_path, "e2_digits")
    runs = out["curves"]["digits_logistic"]
    assert set(runs) == {"SGD", "LA-1", "LA-2"} and all(len(r) == 2 for r in runs.values())
    assert [t for t, _, _ in runs["LA-2"][0]] == [0, 20, 40]
    # Seeds differ; the same seed starts from the same model for every optimizer.
    assert runs["SGD"][0][0] == runs["LA-2"][0][0] != runs["SGD"][1][0]
    for opt in runs:
        assert f"| {opt} | 0.05 |" in text
    accuracy = [run[-1][1] for r in runs.values() for run in r]
    assert min(accuracy) > 0.5  # 40 steps of logistic regression learn the digits well beyond chance


def test_e2_rejects_steps_not_a_multiple_of_the_evaluation_period(tmp_path):
    with pytest.raises(SystemExit):
        e2_digits.main(["--out", str(tmp_path), "--steps", "30", "--eval-every", "20"])


def test_e3_tiny(tmp_path):
    out = e3_convergence_bound.main(["--out", str(tmp_path), "--steps", "60", "--replicas", "16"])
    text = check_outputs(tmp_path, "e3_convergence_bound")
    results = out["results"]
    assert len(results) == len(e3_convergence_bound.CONFIGS)
    assert [r["condition"] <= 1 for r in results] == [True, True, True, False, False, False]
    assert text.count("| holds |") == 3 and text.count("| **fails** |") == 3
    # y_0 = x_0 = (1, ..., 1): the running average starts at ||A x_0||^2.
    first = sum((1 / i) ** 2 for i in range(1, 11))  # h_i = 1 / i, d = 10
    assert all(r["running"][0].item() == pytest.approx(first, rel=1e-12) for r in results)


def test_e3_bound_terms():
    # (13): alpha gamma L + (1 - alpha)^2 gamma^2 L^2 tau (tau - 1)
    assert e3_convergence_bound.step_size_condition(0.1, 0.5, 5, 1.0) == pytest.approx(0.05 + 0.25 * 0.01 * 20)
    gap_term, variance, drift = e3_convergence_bound.theorem2_bound(100, 0.1, 0.5, 5, 2.0, 3.0, 1.5)
    assert gap_term == pytest.approx(2 * 1.5 / (0.5 * 0.1 * 100))
    assert variance == pytest.approx(0.5 * 0.1 * 2.0 * 3.0)
    assert drift == pytest.approx(0.25 * 0.01 * 4.0 * 3.0 * 4)
    # alpha = 1 is SGD: no drift term, SGD's bound 2 gap / (gamma K) + gamma L sigma^2.
    assert e3_convergence_bound.theorem2_bound(100, 0.1, 1.0, 5, 2.0, 3.0, 1.5)[2] == 0.0


def test_e4_to_e6_use_the_registered_digits_problem():
    """E4-E6 (experiments.report.digits_with_train_metrics) run PROBLEMS["digits_mlp"], with
    training-split metrics added: the same model, the same batches, the same test metrics."""
    import itertools

    import torch

    from experiments import digits
    from experiments.base import classification_metrics
    from experiments.problems import PROBLEMS
    from experiments.report import digits_with_train_metrics

    ours, registered = digits_with_train_metrics(3), PROBLEMS["digits_mlp"](seed=3)
    a, b = ours.model(), registered.model()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    for (x, y), (u, v) in itertools.islice(zip(ours.batches(1), registered.batches(1)), 3):
        assert torch.equal(x, u) and torch.equal(y, v)
    metrics = ours.evaluate(a)
    assert metrics["loss"] == registered.evaluate(b)["loss"]
    split = digits.digits_split()
    train = classification_metrics(a, split.x_train.float(), split.y_train)
    assert metrics["train_loss"] == train["loss"] and metrics["train_accuracy"] == train["accuracy"]
    assert metrics["train_loss"] != metrics["loss"]


def table_rows(text):
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")
            and not line.startswith("| Adam lr")]


def check_header(folder, name, argv):
    """The .md starts with the title and the command that regenerates it, arguments included."""
    text = (folder / f"{name}.md").read_text()
    assert (folder / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    assert text.startswith("# E") and f"`python -m experiments.{name} {' '.join(argv)}`" in text
    return text


def test_e4_tiny(tmp_path):
    argv = ["--out", str(tmp_path), "--steps", "15", "--seeds", "2"]
    results = e4_nested.main(argv)["results"]
    text = check_header(tmp_path, "e4_nested", argv)
    assert "15 inner steps, batch 32, 2 seeds" in text
    configs = list(e4_nested.configs())
    assert len(results) == 2 * len(configs) == 22 and all(len(finals) == 2 for finals in results.values())
    rows = table_rows(text)
    assert [row.split(" | ")[:2] for row in rows] == [[f"| {m}", p] for m, p, _ in configs]
    # Row "alone": SGD's accuracy cell is the mean ± std over the two seeds, in percent.
    sgd = [100 * f["accuracy"] for f in results["SGD", "alone", "-"]]
    mean = sum(sgd) / 2
    std = (sum((a - mean) ** 2 for a in sgd)) ** 0.5  # n - 1 = 1
    assert rows[0].split(" | ")[2] == f"{mean:.2f} ± {std:.2f}"
    # 15 steps (one nested period) of SGD with momentum learn well beyond chance (10%).
    assert min(sgd) > 30
    # The momentum policy matters: reset and maintain differ after the syncs.
    assert results["SGD", "Nested", "maintain"] != results["SGD", "Nested", "reset_both"]


def test_e5_tiny(tmp_path):
    argv = ["--out", str(tmp_path), "--stage-steps", "10", "--seeds", "2"]
    results = e5_slrla.main(argv)["results"]
    text = check_header(tmp_path, "e5_slrla", argv)
    assert "(k 5, alpha 0.5), 30 steps," in text
    assert [row.split(" | ")[0] for row in table_rows(text)] == [f"| {name}" for name in e5_slrla.configs(10)]
    for runs in results.values():
        for seed, run in enumerate(runs):
            assert [c["step"] for c in run["curve"]] == [0, 30]
            # Every configuration of a seed starts from that seed's model.
            assert run["curve"][0] == results["SLRLA"][seed]["curve"][0]
    # The regularizer changes the run: SLRLA (beta > 0) differs from its beta = 0 ablation.
    assert results["SLRLA"][0]["final"] != results["LA, stagewise lr (beta = 0)"][0]["final"]


def test_e6_tiny(tmp_path):
    argv = ["--out", str(tmp_path), "--steps", "20", "--seeds", "2"]
    out = e6_adaptive.main(argv)
    text = check_header(tmp_path, "e6_adaptive", argv)
    assert len(table_rows(text)) == len(e6_adaptive.LRS) * len(e6_adaptive.CONFIGS)
    for lr in e6_adaptive.LRS:
        histories = out["alphas"][lr]
        assert len(histories) == 2 and all(len(h) == 20 // 5 for h in histories)  # one alpha* per sync
        assert all(0.2 <= a <= 1.0 for h in histories for a in h)
        every = [a for h in histories for a in h]
        assert f"| {sum(every) / len(every):.3f} |" in text
