"""E8: time to accuracy at cluster scale, on the simulated clock of :mod:`topology.network`.

    python -m experiments.e8_cluster_time            # about 7 minutes on 2 shared cores
    python -m experiments.e8_cluster_time --tiny     # CI: seconds

**Problem.**  :func:`experiments.teacher_classification.teacher_classification`: 10-class labels of
a random tanh teacher on Gaussian inputs in R^16, a 16-32-10 ReLU student (874 float32 parameters,
n = 3496 bytes per synchronized vector), cross-entropy, 2^19 training examples, 10 000 held out.
Not the digits: their 1437 training images cannot give each of 64 or 256 workers a batch under a
Dirichlet(0.1) split; 2^19 examples can.  Every worker takes SGD steps (lr 0.5, no momentum) on
batches of 16 of its own examples, co-located in one :class:`launch.Simulation` (W inner steps per
iteration).  The learning rate is the same for every W and schedule (no scaling rule).

**Data.**  ``iid``: every worker reads shuffled epochs of the whole training set (its own order).
``dirichlet``: Dirichlet(0.1) label skew (:mod:`experiments.partition`), with the smallest
``split_seed`` that leaves every worker at least one batch
(:func:`experiments.teacher_classification.first_valid_split_seed`; reported in the results).

**Schedules**, W workers (:mod:`topology.decentralized`): all-reduce every step (``local_sgd(W,
1)``: mini-batch SGD on W x 16 examples), local SGD averaging every 8 steps, Lookahead over local
SGD (k = 8, alpha = 0.5: every 8 steps the slow agent and every worker get (1 - alpha) z + alpha
mean(workers), no averaging in between: local SGD's communication), and gossip every step on the
ring (Metropolis weights 1/3), the static exponential graph (uniform weights over the 1 + log2 W
peers) and the one-peer exponential graph.

**Clock** (:class:`topology.network.SimClock`).  One agent per GPU, agent i on GPU i; Lookahead's
slow agent (agent W) on GPU 0 with worker 0, so its syncs are one all-reduce over the W GPUs, as
local SGD's.  Two presets of :data:`topology.network.PRESETS`, each with its own nodes of 8 H100
GPUs on NVLink 4 and its own inter-node network, as many nodes as the W GPUs need
(:func:`cluster_for`): ``ethernet_100g_64`` (100 Gb/s Ethernet, 20 us per message; extended to
32 such nodes for 256 agents) and ``infiniband_400g_1024`` (400 Gb/s NDR InfiniBand, 2 us).
The step time is compute_s + the plan's communication time; compute_s = :data:`COMPUTE_S`.

**Compute time per inner step**, 0.2 ms: the student's arithmetic (about 0.2 MFLOP per step of 16
examples) takes nanoseconds on an H100, so an eager PyTorch step of this model is bound by the CPU
overhead of launching its kernels.  One inner step of the project's agent (counted with a
``TorchDispatchMode``) makes 45 ATen calls, 20 of which launch a kernel (2 index gathers, 2 addmm,
relu, log-softmax, nll-loss, and their backward: ones_like, nll-loss and log-softmax backward,
3 mm, 2 sums, threshold-backward; 4 in-place adds of SGD); at about 10 us of dispatch and launch
per kernel (the usual 5-25 us of eager CPU overhead per operator), 20 x 10 us = 0.2 ms.  (Option
``--compute-us``.)

**Measurement.**  Each (data split, W, schedule) trains once per seed for ``--steps`` iterations;
its clock is advanced on both presets at once (the training does not depend on the preset).
Every ``--eval-every`` iterations (a multiple of 8, so local SGD and Lookahead are evaluated right
after a sync, where every agent holds the same model) and at iteration 0 we evaluate the held-out
accuracy of the *workers' average* (1/W) sum_i x_i: for gossip (doubly stochastic) the virtual
iterate of the consensus vector 1/W, the model a final all-reduce would return.  With several
seeds the accuracy curves are averaged over seeds (same iterations, same simulated times).  The
*time to target* is the simulated time of the first evaluation whose accuracy is at least the
target, with no interpolation between evaluations (:func:`time_to_target`: a resolution of
``--eval-every`` iterations, an upper bound on the first crossing); "> T" when the run never
reached it, T being the run's total simulated time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch

from agents.flat import load_flat_
from experiments.report import Timer, markdown_table, parser, pyplot, save_figure, write_markdown
from experiments.teacher_classification import first_valid_split_seed, teacher_classification
from launch import Simulation
from launch.engine.readout import consensus_distance
from topology import decentralized as dec
from topology.network import PRESETS, Cluster, SimClock
from topology.schedule import Schedule

NAME = "e8_cluster_time"
#: Seconds of one inner step on an H100 (module docstring: 20 kernel launches x 10 us).
COMPUTE_S = 200e-6
#: Local SGD's averaging period and Lookahead's k and alpha.
TAU = 8
ALPHA = 0.5
PRESET_NAMES = ("ethernet_100g_64", "infiniband_400g_1024")
SPLITS = ("iid", "dirichlet")
BETA = 0.1
#: Examples per inner step of every worker.
BATCH = 16


@dataclasses.dataclass(frozen=True)
class Arm:
    """A schedule of W workers and where its agents sit (None: agent i on GPU i)."""

    schedule: Schedule
    agent_gpus: tuple[int, ...] | None = None


def _lookahead(w: int) -> Arm:
    # The slow agent (agent W) shares GPU 0 with worker 0: its syncs span the W workers' GPUs.
    return Arm(dec.lookahead_local_sgd(w, TAU, ALPHA), tuple(range(w)) + (0,))


#: The compared schedules by label: ``SCHEDULES[label](W) -> Arm``.
SCHEDULES: dict[str, Callable[[int], Arm]] = {
    "all-reduce every step": lambda w: Arm(dec.local_sgd(w, 1)),
    f"local SGD, tau={TAU}": lambda w: Arm(dec.local_sgd(w, TAU)),
    f"Lookahead over local SGD, k={TAU}, alpha={ALPHA}": _lookahead,
    "ring gossip": lambda w: Arm(dec.ring(w)),
    "exponential gossip": lambda w: Arm(dec.exponential(w)),
    "one-peer exponential gossip": lambda w: Arm(dec.one_peer_exponential(w)),
}


def cluster_for(preset_name: str, num_gpus: int) -> Cluster:
    """The preset's nodes and links with as many nodes as ``num_gpus`` GPUs need (one agent per
    GPU uses GPUs 0 .. num_gpus - 1 only, so on a preset that is large enough this changes no
    time; ``ethernet_100g_64`` grows to 32 nodes for 256 agents).

    Example:
        >>> cluster_for("ethernet_100g_64", 256).nodes, cluster_for("infiniband_400g_1024", 20).nodes
        (32, 3)
    """
    base = PRESETS[preset_name]
    return dataclasses.replace(base, nodes=math.ceil(num_gpus / base.gpus_per_node))


# -- one run ------------------------------------------------------------------------------------------
def run(problem, arm: Arm, clusters: dict[str, Cluster], *, steps: int, eval_every: int, lr: float,
        compute_s: float) -> list[dict]:
    """``steps`` iterations of ``arm`` on ``problem``, clocked on every cluster of ``clusters``.

    Returns the evaluations at iteration 0, every ``eval_every`` and at ``steps``:
    ``{"step", "accuracy", "loss", "consensus", "time": {cluster name: simulated seconds}}``,
    accuracy and loss of the workers' average on the held-out set, consensus the workers'
    consensus distance (:func:`launch.engine.readout.consensus_distance`).
    """
    schedule = arm.schedule
    model = problem.model()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sim = Simulation(model, problem.loss_fn, problem.batches, schedule,
                     lambda params: torch.optim.SGD(params, lr=lr))
    clocks = {name: SimClock(schedule, cluster, nbytes, compute_s, agent_gpus=arm.agent_gpus)
              for name, cluster in clusters.items()}
    probe = problem.model()
    workers = list(schedule.workers)
    curve = []

    def evaluate():
        average = torch.stack([sim.agents[i].debiased() for i in workers]).mean(0)
        metrics = problem.evaluate(load_flat_(probe, average))
        curve.append({"step": sim.t, "accuracy": metrics["accuracy"], "loss": metrics["loss"],
                      "consensus": consensus_distance(sim), "time": {n: c.time for n, c in clocks.items()}})

    evaluate()
    for t in range(1, steps + 1):
        sim.step()
        for clock in clocks.values():
            clock.advance()
        if t % eval_every == 0 or t == steps:
            evaluate()
    return curve


def average_curves(curves: Sequence[list[dict]]) -> list[dict]:
    """The seeds' curves averaged point by point (accuracy, loss, consensus; steps and times are
    the same for every seed)."""
    keys = ("accuracy", "loss", "consensus")
    return [{**point, **{key: sum(c[j][key] for c in curves) / len(curves) for key in keys}}
            for j, point in enumerate(curves[0])]


def time_to_target(curve: Sequence[dict], target: float, cluster: str) -> tuple[int, float] | None:
    """(iteration, simulated seconds) of the first evaluation whose accuracy is at least
    ``target``; None if none is.  No interpolation: a curve crossing the target between two
    evaluations is charged the time of the later one.

    Example:
        >>> curve = [{"step": 0, "accuracy": 0.1, "time": {"c": 0.0}},
        ...          {"step": 8, "accuracy": 0.7, "time": {"c": 2.0}},
        ...          {"step": 16, "accuracy": 0.9, "time": {"c": 4.0}}]
        >>> time_to_target(curve, 0.8, "c"), time_to_target(curve, 0.7, "c"), time_to_target(curve, 0.95, "c")
        ((16, 4.0), (8, 2.0), None)
    """
    for point in curve:
        if point["accuracy"] >= target:
            return point["step"], point["time"][cluster]
    return None


# -- the experiment ------------------------------------------------------------------------------------
def arguments(argv):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, nargs="+", default=[16, 64, 256], help="worker counts (default %(default)s)")
    p.add_argument("--steps", type=int, default=192, help="iterations per run (default %(default)s)")
    p.add_argument("--eval-every", type=int, default=8, help="iterations between evaluations, a multiple of "
                   f"{TAU} (default %(default)s)")
    p.add_argument("--lr", type=float, default=0.5, help="SGD learning rate (default %(default)s)")
    p.add_argument("--seeds", type=int, default=1, help="training seeds 0 .. SEEDS - 1 (default %(default)s)")
    p.add_argument("--targets", type=float, nargs="+", default=[0.75, 0.8],
                   help="held-out accuracy targets; the last is the headline (default %(default)s)")
    p.add_argument("--compute-us", type=float, default=COMPUTE_S * 1e6,
                   help="simulated microseconds per inner step (default %(default)s)")
    p.add_argument("--train-size", type=int, default=2**19, help="training examples (default %(default)s)")
    p.add_argument("--test-size", type=int, default=10_000, help="held-out examples (default %(default)s)")
    p.add_argument("--tiny", action="store_true", help="CI: 4 and 8 agents, 16 iterations, 4096 examples")
    args = p.parse_args(argv)
    if args.tiny:
        args.agents, args.steps, args.train_size, args.test_size = [4, 8], 16, 4096, 512
    if min(args.agents) < 2 or args.steps < 1 or args.seeds < 1 or args.eval_every < 1 or args.eval_every % TAU:
        p.error(f"--agents must be >= 2, --steps and --seeds >= 1, --eval-every a positive multiple of {TAU}")
    if any(w & (w - 1) for w in args.agents):
        p.error(f"--agents must be powers of two (the one-peer exponential graph's exact averaging); got {args.agents}")
    if not all(0 < t <= 1 for t in args.targets):
        p.error(f"--targets must be accuracies in (0, 1]; got {args.targets}")
    return args


def problem_for(split: str, w: int, seed: int, args) -> tuple[object, int | None]:
    """The problem of ``split`` over ``w`` workers and its split seed (None under iid)."""
    sizes = {"train_size": args.train_size, "test_size": args.test_size, "batch_size": BATCH}
    if split == "iid":
        return teacher_classification(seed=seed, num_workers=w, **sizes), None
    split_seed = first_valid_split_seed(w, BETA, **sizes)
    return teacher_classification(seed=seed, partition="dirichlet", num_workers=w, beta=BETA,
                                  split_seed=split_seed, **sizes), split_seed


def main(argv=None) -> dict:
    args = arguments(argv)
    torch.set_num_threads(1)
    timer = Timer()
    compute_s = args.compute_us * 1e-6
    results: dict[tuple[str, int, str], list[dict]] = {}
    split_seeds: dict[tuple[str, int], int | None] = {}
    for split in SPLITS:
        for w in args.agents:
            clusters = {name: cluster_for(name, w) for name in PRESET_NAMES}
            curves: dict[str, list] = {label: [] for label in SCHEDULES}
            for seed in range(args.seeds):
                problem, split_seeds[split, w] = problem_for(split, w, seed, args)
                for label, make in SCHEDULES.items():
                    curves[label].append(run(problem, make(w), clusters, steps=args.steps,
                                             eval_every=args.eval_every, lr=args.lr, compute_s=compute_s))
            for label in SCHEDULES:
                results[split, w, label] = average_curves(curves[label])
            print(f"{split}, {w} workers: done ({timer.stop().elapsed:.0f} s)", flush=True)
    plot(results, args)
    body = report(results, split_seeds, args)
    write_markdown(args.out, NAME, "E8: time to accuracy at cluster scale", argv, timer, body)
    return {"results": results, "split_seeds": split_seeds, "body": body}


# -- writing ------------------------------------------------------------------------------------------
def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}"


def headline(results, args, preset: str, target: float) -> str:
    """Rows: schedules; columns: (split, W); cells: simulated ms to ``target`` (bold: the fastest
    of the column; "> T": not reached in the run's T ms)."""
    columns = [(split, w) for split in SPLITS for w in args.agents]
    cells = {}
    for column in columns:
        reached = {}
        for label in SCHEDULES:
            curve = results[(*column, label)]
            hit = time_to_target(curve, target, preset)
            cells[column, label] = f"> {_ms(curve[-1]['time'][preset])}" if hit is None else _ms(hit[1])
            if hit is not None:
                reached[label] = hit[1]
        if reached:
            best = min(reached, key=reached.get)
            cells[column, best] = f"**{cells[column, best]}**"
    headers = ["schedule", *(f"{split}, W={w}" for split, w in columns)]
    return markdown_table(headers, [[label, *(cells[c, label] for c in columns)] for label in SCHEDULES])


def details(results, args) -> str:
    """One row per (split, W, schedule): per-iteration cost, iterations and time to each target,
    final accuracy and consensus distance."""
    headers = ["split", "W", "schedule", *(f"ms / iteration, {p}" for p in PRESET_NAMES),
               *(f"iterations to {t:g}" for t in args.targets), "final accuracy", "final consensus distance"]
    rows = []
    for (split, w, label), curve in results.items():
        last = curve[-1]
        hits = [time_to_target(curve, t, PRESET_NAMES[0]) for t in args.targets]
        rows.append([split, w, label, *(_ms(last["time"][p] / last["step"]) for p in PRESET_NAMES),
                     *("not reached" if h is None else h[0] for h in hits),
                     f"{last['accuracy']:.4f}", f"{last['consensus']:.3g}"])
    return markdown_table(headers, rows)


def report(results, split_seeds, args) -> str:
    seeds = ", ".join(f"W={w}: {split_seeds['dirichlet', w]}" for w in args.agents)
    parts = [
        f"Teacher-student classification ({args.train_size} training and {args.test_size} held-out examples, "
        f"16-32-10 ReLU student, 3496-byte vectors), SGD lr {args.lr} on batches of 16 per worker, "
        f"{args.steps} iterations, {args.seeds} training seed(s) (accuracy curves averaged over seeds), evaluation "
        f"of the workers' average every {args.eval_every} iterations; simulated compute {args.compute_us:g} us per "
        f"inner step, one agent per GPU (Lookahead's slow agent with worker 0). Dirichlet(beta={BETA}) split seeds "
        f"(the first that leaves every worker a batch): {seeds}.",
        "Time to target: the simulated time of the first evaluation at or above the target accuracy (no "
        "interpolation); **bold**: the fastest schedule of the column; \"> T\": not reached within the run's T ms.",
    ]
    for target in reversed(args.targets):
        for preset in PRESET_NAMES:
            parts.append(f"## Simulated ms to {target:g} held-out accuracy, {preset}\n\n"
                         + headline(results, args, preset, target))
    parts.append("## Every run\n\nms / iteration: the run's total simulated time over its iterations "
                 "(compute + communication).\n\n" + details(results, args))
    parts.append(f"![E8: held-out accuracy against simulated time]({NAME}.png)")
    return "\n\n".join(parts)


def plot(results, args) -> None:
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows = [(preset, split) for preset in PRESET_NAMES for split in SPLITS]
    fig, axes = plt.subplots(len(rows), len(args.agents), figsize=(4.2 * len(args.agents), 3.2 * len(rows)),
                             squeeze=False, sharey=True)
    for r, (preset, split) in enumerate(rows):
        for c, w in enumerate(args.agents):
            ax = axes[r][c]
            for label in SCHEDULES:
                curve = results[split, w, label][1:]   # iteration 0 has time 0 (a log axis)
                ax.plot([p["time"][preset] * 1e3 for p in curve], [p["accuracy"] for p in curve], label=label, lw=1.2)
            ax.axhline(args.targets[-1], color="grey", ls="--", lw=0.8)
            ax.set(xscale="log", title=f"{preset}, {split}, W={w}", xlabel="simulated time (ms)")
            # Labels at 1, 2 and 5 times the powers of ten, whatever the axis' range.
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.tick_params(labelsize=8)
            if c == 0:
                ax.set_ylabel("held-out accuracy, workers' average")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, args.out, NAME)


if __name__ == "__main__":
    main()
