"""From a configuration (``launch/conf``) to the objects of a run.

:func:`build_job` reads the four groups and returns a :class:`Job`:

- ``problem``: ``name`` and the keyword options of ``experiments.problems.PROBLEMS[name]``.  The
  run's ``seed``, ``dtype`` and ``device`` are passed to the factory too, for those of these
  parameters it accepts and the problem's options do not set;
- ``topology``: ``name`` and the options of ``launch.cli.registry.SCHEDULES[name]``;
- ``agents``: ``optimizer`` (``name``, any ``torch.optim`` optimizer by its lower-case class name,
  and its keyword hyperparameters), ``state_policy`` (``maintain`` | ``reset`` | ``pullback``, or
  for a multilayer / nested schedule a per-level form of :mod:`agents.level_policy`: a name such
  as ``pullback_inner``, a list level 1 first, or a mapping ``{level: policy}``) and ``outer``
  (null; ``{name: sgd, lr, momentum, nesterov}``: outer SGD / SlowMo / DiLoCo,
  :class:`agents.outer.OuterOptimizer`; ``{name: adaptive, alpha_low}``: Zhang et al.'s adaptive
  alpha, :class:`agents.adaptive.AdaptiveAlpha`);
- ``launch``: ``name`` (serial | colocated | torch | mpi), ``device``, ``dtype``, ``seed``,
  ``steps``, ``log_every`` (null: the schedule's period, so that logged steps fall on syncs),
  ``num_threads``, ``eval_every``, ``tensorboard``; ``check_reference`` (colocated);
  ``checkpoint_every``, ``checkpoint_dir``, ``resume``, ``resume_allow``, ``overlap`` (true | false |
  auto), ``exact`` (true | false | null: every sync's sums added in agent order, bit for bit the same
  co-located and on ranks; null, the default, is false for ``python -m launch`` and true for
  ``python -m launch.equivalence``), ``cluster``, ``compute_s`` (simulated time on a preset cluster, :mod:`launch.engine.record.clock`)
  (the simulator's launches); ``agents_per_rank``, ``timeout_s`` (torch, mpi: every collective
  completes or fails within it, naming the rank that seems lost: :mod:`launch.engine.guard.health`).  A
  key a launch does not take is an error.  The yaml files hold the defaults of each launch:
  ``launch=torch`` is set up for training (``device=auto``: one GPU per local rank when CUDA is
  there, else CPU; float32; torch's own threads), ``launch=colocated`` for equivalence checks
  (CPU, float64, the serial reference compared at every step).

One builder per group (:func:`build_launch`, :func:`build_topology`, :func:`build_agents`,
:func:`build_problem`); the names they accept are those of :mod:`launch.cli.registry`.  Everything
is validated here, locally and identically on every rank, before any communicator exists: a wrong
value is a ``ValueError`` naming the configuration key as the user types it, what is wrong and
what is allowed (a factory's own message is put in those terms by
:func:`launch.cli.errors.in_group_terms`; a missing data file is one too, naming ``problem.root``).
"""

from __future__ import annotations

import copy
import inspect
import numbers
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from agents.level_policy import resolve_policy
from launch.cli.resume import CheckpointOptions, build_checkpoints
from launch.cli.deviation import tolerance_for
from launch.cli.errors import in_group_terms, launcher_world
from launch.cli.registry import OUTER_RULES, SCHEDULES, make_schedule, optimizers, problems
from launch.engine.record.clock import MAX_COMPUTE_S
from launch.engine.record.tensorboard import MISSING, summary_writer_class
from launch.comm import LAUNCHES
from launch.comm.base import check_timeout
from launch.engine.simulation import convert_batch
from topology.checks import (check_bool, check_choice, check_integer, check_number, check_real, dtype_from_name,
                             is_finite_real)
from topology.network import PRESETS
from topology.schedule import MultilayerSchedule, Schedule

#: Where a run can take place: the serial reference, or the simulator's communicators.
MODES = ("serial",) + LAUNCHES


#: The top-level keys of the configuration.
TOP_LEVEL = ("agents", "topology", "problem", "launch", "tolerance")

#: The ``launch`` keys every launch takes, and those of some launches only.
LAUNCH_KEYS = ("name", "device", "dtype", "seed", "steps", "log_every", "num_threads", "eval_every", "tensorboard")
SIMULATOR_KEYS = ("checkpoint_every", "checkpoint_dir", "resume", "resume_allow", "overlap", "exact", "cluster",
                  "compute_s")
DISTRIBUTED_KEYS = SIMULATOR_KEYS + ("agents_per_rank", "timeout_s")
MODE_KEYS = {"serial": (), "colocated": SIMULATOR_KEYS + ("check_reference",), "torch": DISTRIBUTED_KEYS,
             "mpi": DISTRIBUTED_KEYS}

#: ``launch.seed`` is at most this (every generator seeded from it accepts it, agents' offsets included).
MAX_SEED = 2**32 - 1

#: The command line runs at most this many agents: every P_t is a dense m x m float64 matrix,
#: compiled on every rank, and the spectral gap is an eigenvalue problem of that size.
MAX_AGENTS = 1024

#: Options of the topology factories that count agents (``rows`` x ``cols`` for the torus).
AGENT_COUNTS = ("n", "num_workers", "rows", "cols")


@dataclass(frozen=True)
class LaunchOptions:
    """The ``launch`` group, validated (see the module docstring for each key)."""

    mode: str
    dtype: torch.dtype
    device: str
    seed: int
    steps: int
    log_every: int | None                   # None: the schedule's period
    overlap: bool | str
    num_threads: int | None = None          # None: torch's default
    eval_every: int | None = None           # None: held-out metrics at the end only (auto: resolved)
    tensorboard: bool = False
    agents_per_rank: int | None = None      # torch, mpi
    timeout_s: float = 300.0                # the communicator's collective timeout
    cluster: str | None = None              # a preset of topology.network.PRESETS, or None
    compute_s: float | None = None          # simulated seconds per inner step (None: measured)
    check_reference: bool = False           # colocated: the serial reference stepped beside it
    exact: bool | None = None               # None: the command's default (run: False, equivalence: True)


@dataclass
class Job:
    """A run, fully built: what to simulate (the problem, schedule, agents), and where and how
    long (``launch``, the validated ``launch`` group)."""

    problem: object                         # experiments.problems.Problem
    problem_name: str
    schedule: Schedule
    optimizer: Callable[[list], torch.optim.Optimizer]
    state_policy: object                    # a str, or per-level (list / {level: policy})
    launch: LaunchOptions
    log_every: int                          # launch.log_every, resolved (null: the schedule's period)
    tolerance: float                        # tolerance, resolved (null: by launch.dtype)
    evaluate_on_device: bool                # the problem was built for ``launch.device``
    outer: dict | None = None               # agents.outer, validated (see OUTER_RULES)
    stages: tuple | None = None             # SLRLA's agents.slrla.Stage list (topology=stagewise)
    topology_name: str = ""                 # topology.name, and its options as configured
    topology_options: dict | None = None
    checkpoints: CheckpointOptions | None = None  # launch.checkpoint_every, resume ... (None: no checkpoints)

    def make_outer(self):
        """A fresh slow rule for the simulator (``Simulation(outer=...)``), or None."""
        return None if self.outer is None else OUTER_RULES[self.outer["name"]].make(self.outer)

    def model(self) -> nn.Module:
        """A fresh model in the run's dtype (global RNG seeded with ``launch.seed`` first)."""
        torch.manual_seed(self.launch.seed)
        return self.problem.model().to(dtype=self.launch.dtype)

    def batches(self, agent: int) -> Iterator:
        """Worker ``agent``'s stream, its floating tensors in the run's dtype, on the run's device."""
        for batch in self.problem.batches(agent):
            yield convert_batch(batch, self.launch.dtype, self.launch.device)

    def evaluate(self, module: nn.Module) -> dict:
        """The problem's held-out metrics of ``module`` (a CPU copy unless the problem was built
        for the run's device)."""
        if not self.evaluate_on_device:
            module = copy.deepcopy(module).to("cpu")
        return {key: float(value) for key, value in self.problem.evaluate(module).items()}


def build_job(cfg: DictConfig) -> Job:
    """Validate ``cfg`` and build the problem, schedule and inner optimizer of the run."""
    unknown = sorted(set(cfg) - set(TOP_LEVEL))
    if unknown:
        raise ValueError(f"unknown top-level key(s) {unknown}; the configuration has {', '.join(TOP_LEVEL)}")
    launch = build_launch(cfg.launch)
    schedule, stages = build_topology(cfg.topology, launch.steps)
    state_policy, optimizer, outer = build_agents(cfg.agents, schedule, stages)
    problem, problem_name, on_device = build_problem(cfg.problem, launch, schedule)
    if outer is not None:
        try:  # the rule's own checks (adaptive: Adam's second moment), also for launch=serial
            OUTER_RULES[outer["name"]].make(outer).check(problem.model().to(dtype=launch.dtype), optimizer)
        except ValueError as err:
            raise ValueError(f"agents.outer={{name: {outer['name']}}}: {err}") from None
    topology_options = {k: v for k, v in _options(cfg.topology, "topology").items() if k != "name"}
    log_every = launch.log_every if launch.log_every is not None else schedule.period
    if launch.cluster is not None and outer is not None:
        raise ValueError(f"launch.cluster={launch.cluster} does not model a slow rule's sync (agents.outer="
                         f"{{name: {outer['name']}}}): its collectives are not those of the schedule's plan; "
                         f"set launch.cluster=null or agents.outer=null")
    job = Job(problem, problem_name, schedule, optimizer, state_policy, launch, log_every,
              tolerance_for(cfg.get("tolerance"), launch.dtype), evaluate_on_device=on_device, outer=outer,
              stages=stages, topology_name=str(cfg.topology.name), topology_options=topology_options)
    job.checkpoints = build_checkpoints(cfg, job)
    return job


def build_launch(node) -> LaunchOptions:
    """The ``launch`` group (see the module docstring); a launch that would run the whole job in
    each of several processes (``serial`` / ``colocated`` under torchrun or mpiexec) is an error."""
    mode = check_choice(node.get("name"), MODES, "launch.name")
    allowed = LAUNCH_KEYS + MODE_KEYS[mode]
    unknown = sorted(set(node) - set(allowed))
    if unknown:
        hint = (" (launch.agents_per_rank is a key of launch=torch and launch=mpi)"
                if "agents_per_rank" in unknown else "")
        raise ValueError(f"launch has key(s) {unknown} that launch={mode} does not take{hint}; "
                         f"allowed: {', '.join(allowed)}")
    _check_world(mode)
    tensorboard = check_bool(node.get("tensorboard", False), "launch.tensorboard")
    if tensorboard:
        try:
            summary_writer_class()  # the package is there, or the same error on every rank
        except ValueError:
            raise ValueError(f"launch.tensorboard=true {MISSING} (or leave launch.tensorboard=false)") from None
    return LaunchOptions(
        mode=mode, dtype=dtype_from_name(node.dtype, "launch.dtype"), device=_device(str(node.device), mode),
        seed=check_integer(node.seed, "launch.seed", minimum=0, maximum=MAX_SEED),
        steps=check_integer(node.steps, "launch.steps", minimum=1),
        log_every=check_integer(node.get("log_every"), "launch.log_every", minimum=1, optional="the schedule's period"),
        overlap=_overlap(node.get("overlap", "auto")),
        exact=_exact(node.get("exact")),
        num_threads=check_integer(node.get("num_threads"), "launch.num_threads", minimum=1, optional="torch's default"),
        eval_every=_eval_every(node.get("eval_every", "auto"), node.steps),
        tensorboard=tensorboard,
        agents_per_rank=check_integer(node.get("agents_per_rank"), "launch.agents_per_rank", minimum=1,
                                      optional="number of agents / number of processes"),
        timeout_s=check_timeout(node.get("timeout_s", 300.0), name="launch.timeout_s"),
        check_reference=check_bool(node.get("check_reference", False), "launch.check_reference"),
        **dict(zip(("cluster", "compute_s"), check_cluster_options(node.get("cluster"), node.get("compute_s")))))


def _overlap(value) -> bool | str:
    """``launch.overlap``: true, false, or auto (the default: overlapped wherever it applies)."""
    if isinstance(value, str) and value == "auto":
        return value
    try:
        return check_bool(value, "launch.overlap")
    except ValueError as err:
        raise ValueError(f"{err} (or auto, the default: overlapped wherever it applies)") from None


#: ``launch.eval_every=auto`` evaluates this many times over a run of at least
#: :data:`AUTO_EVAL_MIN_STEPS` steps (a held-out curve), and only at the end of a shorter one.
AUTO_EVALUATIONS, AUTO_EVAL_MIN_STEPS = 20, 100


def _eval_every(value, steps) -> int | None:
    """``launch.eval_every``: N, null (at the end only) or auto (the default: every
    ``steps // 20`` steps from 100 steps on, so the held-out panel is a curve; at the end only
    below).  ``steps`` is ``launch.steps``, already validated."""
    if isinstance(value, str) and value == "auto":
        return steps // AUTO_EVALUATIONS if steps >= AUTO_EVAL_MIN_STEPS else None
    try:
        return check_integer(value, "launch.eval_every", minimum=1, optional="only at the end")
    except ValueError as err:
        raise ValueError(f"{err} (or auto, the default: {AUTO_EVALUATIONS} evaluations over a run of "
                         f"{AUTO_EVAL_MIN_STEPS} steps or more)") from None


def _exact(value) -> bool | None:
    """``launch.exact``: true, false, or null (the default: false for ``python -m launch``, true
    for ``python -m launch.equivalence``)."""
    if value is None:
        return None
    try:
        return check_bool(value, "launch.exact")
    except ValueError as err:
        raise ValueError(f"{err} (or null, the default: false for python -m launch, true for "
                         f"python -m launch.equivalence)") from None


def _check_world(mode: str) -> None:
    """``launch=serial`` / ``colocated`` run every agent in one process: started as one of several
    processes (torchrun, mpiexec) each would run the whole job into the same folder."""
    size, launcher, variable = launcher_world()
    if size > 1 and mode in ("serial", "colocated"):
        fix = "launch=torch" if launcher == "torchrun" else "launch=mpi"
        raise ValueError(f"launch={mode} runs the whole job in one process, but {launcher} started {size} "
                         f"processes ({variable}={size}): add {fix} (the agents spread over the processes)")
    if size > 1 and mode == "mpi" and launcher == "torchrun":
        raise ValueError(f"launch=mpi needs mpiexec, but torchrun started {size} processes: use launch=torch")


def build_topology(node, steps: int) -> tuple[Schedule, tuple | None]:
    """The ``topology`` group: the schedule, and SLRLA's stages (``topology=stagewise``) or None."""
    options = _options(node, "topology")
    name = options.pop("name", None)
    if name not in SCHEDULES:
        raise ValueError(f"topology.name must be one of {', '.join(sorted(SCHEDULES))}; got {name!r}")
    _check_options(SCHEDULES[name], options, f"topology {name!r}", "topology")
    _check_agent_count(options)
    try:
        schedule = make_schedule(name, **options)
    except ValueError as err:
        raise in_group_terms(err, "topology", name, options, _parameters(SCHEDULES[name])) from None
    if name != "stagewise":
        return schedule, None
    from agents.slrla import check_stages

    stages = check_stages(options["stages"])
    total = sum(stage.steps for stage in stages)
    if steps > total:
        raise ValueError(f"launch.steps must be at most the stages' total number of steps ({total}) "
                         f"with topology=stagewise; got {steps}")
    return schedule, stages


def build_agents(node, schedule: Schedule, stages) -> tuple[object, Callable, dict | None]:
    """The ``agents`` group: the state policy, the inner-optimizer factory, the slow rule's
    validated options (or None)."""
    options = _options(node, "agents")
    extra = set(options) - {"optimizer", "state_policy", "outer"}
    if extra:
        raise ValueError(f"agents has unknown key(s) {sorted(extra)}; allowed: optimizer, state_policy, outer")
    state_policy = _state_policy(options.get("state_policy", "maintain"), schedule)
    optimizer = _optimizer_factory(dict(options.get("optimizer") or {}))
    outer = _outer_options(options.get("outer"))
    if outer is not None and stages is not None:
        raise ValueError("agents.outer must be null with topology=stagewise (SLRLA's slow update is plain Lookahead)")
    if outer is not None and len(schedule.passive) != 1:
        raise ValueError(f"agents.outer needs a topology with exactly one slow (passive) agent (lookahead, "
                         f"with_slow_agent); this topology has {len(schedule.passive)}")
    return state_policy, optimizer, outer


def build_problem(node, launch: LaunchOptions, schedule: Schedule):
    """The ``problem`` group: the problem, its name, and whether it was built for the run's device.

    The run's ``seed``, ``dtype`` and ``device`` are passed to the factory for those of these
    parameters it accepts and the problem's options do not set; so is ``num_workers``, the
    schedule's number of workers, for the problems that split their data among workers
    (``problem.partition``: iid, dirichlet, shards).  A data split names the workers 0 .. W - 1, so
    a non-iid ``partition`` needs a schedule whose workers are agents 0 .. W - 1."""
    table = problems()
    options = _options(node, "problem")
    name = options.pop("name", None)
    if name not in table:
        raise ValueError(f"problem.name must be one of {', '.join(sorted(table))}; got {name!r}")
    factory = table[name]
    _check_options(factory, options, f"problem {name!r}", "problem")
    given = dict(options)
    accepted = _parameters(factory)
    workers = schedule.workers
    if "num_workers" in options and options["num_workers"] != len(workers):
        raise ValueError(f"problem.num_workers={options['num_workers']!r} does not match the topology's {len(workers)} "
                         f"workers: the data is split into one shard per worker, and a shard no worker reads "
                         f"would silently drop out of training; leave problem.num_workers unset (the topology's "
                         f"number is used) or set it to {len(workers)}")
    run_values = {"seed": launch.seed, "dtype": launch.dtype, "device": launch.device, "num_workers": len(workers)}
    for key, value in run_values.items():
        if accepted is not None and key in accepted and key not in options:
            options[key] = value
    if options.get("partition", "iid") != "iid" and workers != tuple(range(len(workers))):
        raise ValueError(f"problem.partition={options['partition']} splits the data among workers 0 .. W - 1; "
                         f"this topology's workers are agents {list(workers)}")
    torch.manual_seed(launch.seed)
    try:
        return factory(**options), name, "device" in options
    except ValueError as err:
        raise in_group_terms(err, "problem", name, given, accepted) from None
    except (OSError, EOFError) as err:  # missing or unreadable data files
        where = f"problem.root={given['root']}" if "root" in given else f"problem={name}"
        raise ValueError(f"{where}: {' '.join(str(err).split())}") from None


def _outer_options(outer) -> dict | None:
    """``agents.outer`` validated: None, or a mapping with a ``name`` of :data:`OUTER_RULES` and
    its options (defaults filled in)."""
    if outer is None:
        return None
    if not isinstance(outer, dict):
        raise ValueError(f"agents.outer must be null or a mapping with a name ({' | '.join(OUTER_RULES)}); got {outer!r}")
    outer = dict(outer)
    name = outer.get("name")
    if name not in OUTER_RULES:
        raise ValueError(f"agents.outer.name must be one of {', '.join(OUTER_RULES)}; got {name!r}")
    entry = OUTER_RULES[name]
    unknown = sorted(set(outer) - entry.keys - {"name"})
    if unknown:
        raise ValueError(f"agents.outer has key(s) {unknown} that outer {name} does not take; "
                         f"allowed: {sorted(entry.keys)}")
    return entry.validate(outer)


def _state_policy(policy, schedule: Schedule):
    """``agents.state_policy`` validated for ``schedule`` (per level only for a multilayer one)
    by :func:`agents.level_policy.resolve_policy`; mapping keys given as strings ("1") become
    levels (ints)."""
    if isinstance(policy, dict):
        try:
            policy = {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in policy.items()}
        except ValueError:
            pass
    depth = schedule.depth if isinstance(schedule, MultilayerSchedule) else None
    resolve_policy(policy, depth, name="agents.state_policy")
    return policy


# -- helpers -----------------------------------------------------------------------------------


def _device(device: str, mode: str) -> str:
    """``launch.device`` resolved: ``auto`` is CUDA when available; under torchrun a bare ``cuda``
    is this process's GPU, ``cuda:LOCAL_RANK`` (NCCL needs one GPU per rank)."""
    if device != "auto" and not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise ValueError(f"launch.device must be cpu, cuda, cuda:N or auto; got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and mode != "mpi" else "cpu"
    if mode == "mpi" and device != "cpu":
        raise ValueError(f"launch.device must be cpu with launch=mpi (the MPI communicator moves CPU tensors); got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"launch.device={device!r} asks for CUDA, but no CUDA device is available; use cpu")
    if device == "cuda" and mode == "torch":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def _check_agent_count(options: dict) -> None:
    """At most :data:`MAX_AGENTS` agents, checked on the options that count them before the
    factory builds m x m matrices (``topology.n=100000`` would ask for 80 GB)."""
    counts = {k: options[k] for k in AGENT_COUNTS
              if k in options and not isinstance(options[k], bool) and isinstance(options[k], int)}
    for key, value in counts.items():
        if value > MAX_AGENTS:
            raise ValueError(f"topology.{key}={value} asks for more agents than the command line runs "
                             f"(at most {MAX_AGENTS}: every P_t is a dense m x m matrix)")
    if "rows" in counts and "cols" in counts and counts["rows"] * counts["cols"] > MAX_AGENTS:
        raise ValueError(f"topology.rows x topology.cols = {counts['rows'] * counts['cols']} agents; the command "
                         f"line runs at most {MAX_AGENTS} (every P_t is a dense m x m matrix)")


def check_cluster_options(cluster, compute_s) -> tuple[str | None, float | None]:
    """``launch.cluster`` (None or a preset name) and ``launch.compute_s`` (None or seconds >= 0),
    validated; ``compute_s`` without ``cluster`` is refused (it would be silently unused)."""
    if cluster is not None:
        cluster = check_choice(cluster, tuple(PRESETS), "launch.cluster")
    if compute_s is not None:
        if cluster is None:
            raise ValueError("launch.compute_s needs launch.cluster (a preset of the simulated network: "
                             f"{', '.join(PRESETS)})")
        compute_s = check_real(compute_s, "launch.compute_s", minimum=0.0, maximum=MAX_COMPUTE_S,
                               unit="seconds per inner step")
    return cluster, compute_s


def _options(node, key: str) -> dict:
    if isinstance(node, DictConfig):
        missing = sorted(k for k in node if OmegaConf.is_missing(node, k))
        if missing:
            raise ValueError(f"{key}.{missing[0]} must be set (it has no default): add {key}.{missing[0]}=... to the command")
    options = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    if not isinstance(options, dict):
        raise ValueError(f"{key} must be a mapping of options; got {options!r}")
    return dict(options)


def _parameters(fn) -> set[str] | None:
    """The keyword parameters ``fn`` accepts; None if it takes ``**kwargs``."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


#: Parameters of a factory that are not options (a method's ``self``, an optimizer's ``params``).
NOT_OPTIONS = frozenset({"self", "params"})


def _check_options(fn, options: dict, what: str, key: str) -> None:
    accepted = _parameters(fn)
    if accepted is None:
        return
    accepted = accepted - NOT_OPTIONS
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"{key} has option(s) {unknown} that {what} does not take; allowed: {sorted(accepted)}")


def _optimizer_factory(options: dict) -> Callable[[list], torch.optim.Optimizer]:
    """``agents.optimizer`` validated: ``name`` (a ``torch.optim`` optimizer) and its keyword
    options; the factory ``params -> optimizer``.  An option whose default is a number (and
    ``lr``) must be a finite number, one whose default is a bool a bool, one whose default is a
    tuple of numbers (``betas``) a list of as many finite numbers; then the optimizer is built
    on a throwaway parameter, so that what torch refuses (lr < 0...) fails here too."""
    known = optimizers()
    name = str(options.pop("name", "")).lower()
    if name not in known:
        raise ValueError(f"agents.optimizer.name must be a torch.optim optimizer ({', '.join(sorted(known))}); got {name!r}")
    cls = known[name]
    _check_options(cls.__init__, options, f"torch.optim.{cls.__name__}", "agents.optimizer")
    defaults = {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()}
    for key, value in options.items():
        options[key] = _optimizer_option(f"agents.optimizer.{key}", value, defaults.get(key), key == "lr")
    try:
        cls([nn.Parameter(torch.zeros(1))], **options)
    except (ValueError, TypeError, RuntimeError) as err:
        raise ValueError(f"agents.optimizer: torch.optim.{cls.__name__} refuses {options}: {err}") from None
    return lambda params: cls(params, **options)


def _optimizer_option(key: str, value, default, numeric: bool):
    """One optimizer option checked against the type of its default (see :func:`_optimizer_factory`)."""
    if isinstance(default, bool):
        return check_bool(value, key)
    if numeric or (isinstance(default, numbers.Real) and not isinstance(default, bool)):
        check_number(value, key)
        return value
    if isinstance(default, tuple) and default and all(is_finite_real(v) for v in default):
        if (not isinstance(value, (list, tuple)) or len(value) != len(default)
                or not all(is_finite_real(v) for v in value)):
            raise ValueError(f"{key} must be a list of {len(default)} finite numbers, like "
                             f"[{','.join(map(str, default))}]; got {value!r}")
        return tuple(value)
    return value
