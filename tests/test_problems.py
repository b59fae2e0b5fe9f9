"""The built-in problems: each runs through the co-located simulator; data, splits and loaders."""

import pickle

import numpy as np
import pytest
import torch

import topology
from experiments import cifar, digits, nqm
from experiments.base import epoch_batches
from topology.checks import dtype_from_name
from experiments.models import ResNet18
from experiments.problems import PROBLEMS, make_problem
from experiments.report import agent_module, sgd_schedule, simulation

CLASSIFIERS = ("digits_logistic", "digits_mlp", "digits_cnn")


def sgd_momentum(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


# -- every problem through the simulator --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["teacher_student", "noisy_quadratic", *CLASSIFIERS, "teacher_classification"])
def test_problem_trains_through_the_simulator(name):
    """A few LA-2 iterations co-located: finite worker losses, the documented metrics, and a test
    loss below the initial one (for every agent: the fast one and the slow levels)."""
    problem = PROBLEMS[name]()
    schedule = topology.multilayer((3, 2), (0.5, 0.5))
    sim = simulation(problem, schedule, sgd_momentum)
    initial = problem.evaluate(problem.model())
    for _ in range(60):
        losses = sim.step()
        assert all(torch.isfinite(v) for v in losses.values())
    expected = {"loss", "accuracy"} if name in CLASSIFIERS else {"loss"}
    fast = problem.evaluate(agent_module(problem, sim, 0))
    for agent in range(schedule.num_agents):
        metrics = problem.evaluate(agent_module(problem, sim, agent))
        # 60 iterations = 10 periods: the last sync was a level-2 one, so every agent holds the
        # same weights (and a passive agent's module is loaded from its buffer).
        assert metrics == pytest.approx(fast, rel=1e-6)
        assert expected <= set(metrics)
        assert all(np.isfinite(v) for v in metrics.values())
        assert metrics["loss"] < initial["loss"]
        if "accuracy" in metrics:
            assert 0.0 <= metrics["accuracy"] <= 1.0
            assert metrics["accuracy"] > initial["accuracy"] + 0.3  # 10 classes: 0.1 at chance


def test_registry_and_options():
    assert set(PROBLEMS) >= {"teacher_student", "noisy_quadratic", *CLASSIFIERS, "cifar10_resnet18"}
    with pytest.raises(ValueError, match="problem must be one of"):
        make_problem("mnist")
    with pytest.raises(ValueError, match="dtype"):
        make_problem("digits_mlp", dtype="int8")
    assert next(make_problem("digits_logistic", dtype="float64").model().parameters()).dtype == torch.float64
    assert dtype_from_name("torch.float32", "dtype") is torch.float32
    with pytest.raises(ValueError, match="batch_size"):
        make_problem("digits_cnn", batch_size=0)
    with pytest.raises(ValueError, match="curvatures must be 3"):
        make_problem("noisy_quadratic", dim=3, curvatures=[1.0, 2.0])
    with pytest.raises(ValueError, match="test_fraction"):
        make_problem("digits_mlp", test_fraction=1.5)


def test_streams_are_seeded_per_agent():
    problem = PROBLEMS["digits_mlp"](batch_size=8, seed=3)
    a, b, c = problem.batches(0), problem.batches(0), problem.batches(1)
    for _ in range(3):
        (xa, ya), (xb, yb), (xc, _) = next(a), next(b), next(c)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, xc)
    with pytest.raises(ValueError, match="agent"):
        next(problem.batches(-1))


def test_epoch_batches_cover_each_epoch_once():
    stream = epoch_batches(10, 3, torch.Generator().manual_seed(0))
    epoch = torch.cat([next(stream) for _ in range(3)])  # 3 full batches, 1 example dropped
    assert len(set(epoch.tolist())) == 9


# -- digits --------------------------------------------------------------------------------------------
def test_digits_split_is_fixed_and_standardized():
    first = digits.digits_split(0)
    digits.digits_split.cache_clear()  # a fresh load and split, not the cached tensors
    again = digits.digits_split(0)
    assert first is not again
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    other = digits.digits_split(1)
    assert not torch.equal(first.y_test, other.y_test)
    assert len(first.y_train) + len(first.y_test) == 1797 and len(first.y_test) == 360
    # Stratified: every class in the test split, in proportion.
    assert torch.bincount(first.y_test, minlength=10).min() >= 35
    # Standardized with the training split's statistics.
    assert first.x_train.mean(0).abs().max() < 1e-12
    std = first.x_train.std(0)
    assert ((std - 1).abs() < 1e-12).logical_or(std == 0).all()
    # The same test split whatever the training seed.
    p0, p1 = PROBLEMS["digits_logistic"](seed=0), PROBLEMS["digits_logistic"](seed=1)
    model = p0.model()
    assert p0.evaluate(model) == p1.evaluate(model)


# -- noisy quadratic model -----------------------------------------------------------------------------
def test_nqm_gradient_is_a_times_x_minus_mean_sample_per_replica():
    problem = nqm.noisy_quadratic(dim=4, batch_size=3, replicas=5, init=0.7)
    module = problem.model()
    c = next(problem.batches(0))
    assert c.shape == (3, 5, 4)
    problem.loss_fn(module, c).backward()
    expected = problem.curvatures * (module.x.detach() - c.mean(0))
    assert torch.allclose(module.x.grad, expected, rtol=1e-13, atol=0)
    metrics = problem.evaluate(module)
    h, s = problem.curvatures, problem.noise
    assert metrics["loss"] == pytest.approx(float(0.5 * (h * (0.49 + s)).sum()), rel=1e-13)
    assert metrics["grad_norm_sq"] == pytest.approx(float(((h * 0.7) ** 2).sum()), rel=1e-13)
    assert problem.gradient_noise == pytest.approx(float((h**2 * s).sum() / 3), rel=1e-13)


def test_nqm_closed_forms_match_the_unrolled_recursions():
    """sgd_moments / lookahead_moments (geometric sums) against eqs. 9 and 11 iterated literally."""
    h = torch.tensor([1.3, 0.4, 0.05], dtype=torch.float64)
    noise, lr, k, alpha = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64), 0.9, 4, 0.3
    x0 = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    r = 1 - lr * h
    mean, var = x0.clone(), torch.zeros(3, dtype=torch.float64)
    for _ in range(37):
        mean, var = r * mean, r**2 * var + lr**2 * h**2 * noise
    m, v = nqm.sgd_moments(h, noise, lr, x0, 37)
    assert torch.allclose(m[0], mean, rtol=1e-12) and torch.allclose(v[0], var, rtol=1e-12)
    mean, var = x0.clone(), torch.zeros(3, dtype=torch.float64)
    c = 1 - alpha + alpha * r**k
    inner_noise = sum(r ** (2 * i) for i in range(k)) * lr**2 * h**2 * noise
    for _ in range(11):
        mean, var = c * mean, c**2 * var + alpha**2 * inner_noise
    m, v = nqm.lookahead_moments(h, noise, lr, k, alpha, x0, 11)
    assert torch.allclose(m[0], mean, rtol=1e-12) and torch.allclose(v[0], var, rtol=1e-12)
    # The fixed points: many iterations converge to eqs. 6 and 7; alpha = 1 is SGD.
    assert torch.allclose(nqm.lookahead_moments(h, noise, lr, k, alpha, x0, 10**5)[1][0],
                          nqm.lookahead_variance(h, noise, lr, k, alpha), rtol=1e-12)
    assert torch.allclose(nqm.lookahead_variance(h, noise, lr, k, 1.0), nqm.sgd_variance(h, noise, lr), rtol=1e-12)
    with pytest.raises(ValueError, match="lr must be in"):
        nqm.sgd_variance(h, noise, 2 / 1.3)


def test_nqm_closed_form_against_monte_carlo():
    """Steady-state variances simulated (1500 runs through the simulator) against Proposition 2,
    within 4 standard errors; the variants a wrong derivation gives (the paper's printed Sigma^2
    for Sigma, or the LA variance without its alpha^2 numerator) are many standard errors off."""
    from experiments.e1_noisy_quadratic import steady_second_moments
    from experiments.report import mean_se

    h = [1.0, 0.5, 0.25]
    problem = nqm.noisy_quadratic(dim=3, curvatures=h, replicas=1500, init=0.0, seed=5)
    h, s = problem.curvatures, problem.noise
    lr, k, alpha = 0.7, 3, 0.4
    cases = {
        "sgd": (sgd_schedule(), nqm.sgd_variance(h, s, lr), nqm.sgd_variance(h, s**2, lr)),
        "lookahead": (topology.lookahead(k, alpha), nqm.lookahead_variance(h, s, lr, k, alpha),
                      nqm.lookahead_variance(h, s, lr, k, alpha) / alpha),
    }
    for name, (schedule, theory, wrong) in cases.items():
        mean, se = mean_se(steady_second_moments(problem, schedule, lr, burn_in=150, window=300))
        assert ((mean - theory).abs() <= 4 * se).all(), (name, mean, theory, se)
        assert ((mean - wrong).abs() > 10 * se).any(), (name, mean, wrong, se)


# -- CIFAR-10 ------------------------------------------------------------------------------------------
def write_fake_cifar(folder, per_batch=3, n_test=4):
    """The real format: protocol-2 pickles of dicts with bytes keys; pixel values encode
    (batch, image, channel) so the layout can be checked."""
    folder.mkdir(parents=True)
    images = {}
    for b, name in enumerate([*cifar.TRAIN_FILES, cifar.TEST_FILE]):
        n = n_test if name == cifar.TEST_FILE else per_batch
        data = np.zeros((n, 3072), dtype=np.uint8)
        for i in range(n):
            for ch in range(3):
                data[i, ch * 1024 : (ch + 1) * 1024] = 40 * b + 10 * i + ch
            data[i, 5] = 255  # red channel, row 0, column 5
        labels = [(b + i) % 10 for i in range(n)]
        entry = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        images[name] = (data, labels)
    return images


def test_cifar_loader_reads_the_pickle_format(tmp_path):
    images = write_fake_cifar(tmp_path / "cifar-10-batches-py")
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        data = cifar.load_cifar10(root)
        assert data.x_train.shape == (15, 3, 32, 32) and data.x_train.dtype == torch.uint8
        assert data.x_test.shape == (4, 3, 32, 32)
        # Image 1 of data_batch_2 is training image 3 + 1: channel ch holds 40 + 10 + ch.
        assert data.x_train[4, 2, 10, 10] == 40 + 10 + 2 and data.x_train[4, 0, 0, 5] == 255
        assert data.x_train[4, 1, 0, 5] == 40 + 10 + 1
        assert data.y_train.tolist() == [l for name in cifar.TRAIN_FILES for l in images[name][1]]
        assert data.y_test.tolist() == images[cifar.TEST_FILE][1]


def test_cifar_problem_runs_through_the_simulator(tmp_path):
    write_fake_cifar(tmp_path / "cifar-10-batches-py")
    problem = PROBLEMS["cifar10_resnet18"](root=str(tmp_path), batch_size=2, test_size=3)
    x, y = next(problem.batches(0))
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (2,)
    sim = simulation(problem, topology.lookahead(2, 0.5), lambda p: torch.optim.SGD(p, lr=0.01))
    for _ in range(2):
        assert all(torch.isfinite(v) for v in sim.step().values())
    metrics = problem.evaluate(sim.agents[0].module)
    assert set(metrics) == {"loss", "accuracy"} and np.isfinite(metrics["loss"])
    assert metrics["accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0)
    with pytest.raises(ValueError, match="test_size"):
        PROBLEMS["cifar10_resnet18"](root=str(tmp_path), test_size=5)


def test_cifar_missing_files_name_the_path_and_the_files(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        PROBLEMS["cifar10_resnet18"](root=str(tmp_path / "nowhere"))
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message and str(tmp_path / "nowhere" / "cifar-10-batches-py") in message
    assert "data_batch_1" in message and "test_batch" in message
    write_fake_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="missing from both: data_batch_3"):
        cifar.find_batches(tmp_path)


def test_cifar_batch_files_cannot_run_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Exploit(), b"labels": []}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="print is not allowed in a CIFAR-10 batch file"):
        cifar.load_batch(path)


def test_cifar_augmentation_is_a_shifted_window_and_a_flip():
    x = torch.randn(6, 3, 32, 32)
    out = cifar.augment(x, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)  # the same draws, in the same order
    dy, dx = torch.randint(0, 9, (6,), generator=g), torch.randint(0, 9, (6,), generator=g)
    flip = torch.rand(6, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(6):
        crop = padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
        assert torch.equal(out[i], crop.flip(-1) if flip[i] else crop)


def test_resnet18_forward_backward_on_two_images():
    torch.manual_seed(0)
    model = ResNet18()
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # the CIFAR ResNet-18, 10 classes
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    torch.nn.functional.cross_entropy(logits, torch.tensor([3, 7])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
