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
  ``overlap`` (true | false | auto).  The yaml files hold the defaults of each launch:
  ``launch=torch`` is set up for training (``device=auto``: one GPU per local rank when CUDA is
  there, else CPU; float32; torch's own threads), ``launch=colocated`` for equivalence checks
  (CPU, float64, the serial reference compared at every step).

One builder per group (:func:`build_launch`, :func:`build_topology`, :func:`build_agents`,
:func:`build_problem`); the names they accept are those of :mod:`launch.cli.registry`.  Everything
is validated here, locally and identically on every rank, before any communicator exists: a wrong
value is a ``ValueError`` naming the configuration key, what is wrong and what is allowed.
"""

from __future__ import annotations

import copy
import inspect
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from agents.level_policy import resolve_policy
from launch.cli.registry import OUTER_RULES, SCHEDULES, make_schedule, optimizers, problems
from launch.comm import LAUNCHES
from topology.schedule import MultilayerSchedule, Schedule

#: Where a run can take place: the serial reference, or the simulator's communicators.
MODES = ("serial",) + LAUNCHES

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


@dataclass
class Job:
    """A run, fully built: what to simulate, where, and for how long."""

    problem: object                         # experiments.problems.Problem
    problem_name: str
    schedule: Schedule
    optimizer: Callable[[list], torch.optim.Optimizer]
    state_policy: object                    # a str, or per-level (list / {level: policy})
    mode: str
    device: str
    dtype: torch.dtype
    seed: int
    steps: int
    log_every: int                          # launch.log_every, resolved (null: the schedule's period)
    evaluate_on_device: bool                # the problem was built for ``device``
    outer: dict | None = None               # agents.outer, validated (see OUTER_RULES)
    stages: tuple | None = None             # SLRLA's agents.slrla.Stage list (topology=stagewise)
    overlap: bool | str = "auto"            # launch.overlap: Simulation(overlap=...)

    def make_outer(self):
        """A fresh slow rule for the simulator (``Simulation(outer=...)``), or None."""
        return None if self.outer is None else OUTER_RULES[self.outer["name"]].make(self.outer)

    def model(self) -> nn.Module:
        """A fresh model in the run's dtype (global RNG seeded with ``seed`` first)."""
        torch.manual_seed(self.seed)
        return self.problem.model().to(dtype=self.dtype)

    def batches(self, agent: int) -> Iterator:
        """Worker ``agent``'s stream, its floating tensors in the run's dtype, on the run's device."""
        for batch in self.problem.batches(agent):
            yield _convert(batch, self.dtype, self.device)

    def evaluate(self, module: nn.Module) -> dict:
        """The problem's held-out metrics of ``module`` (a CPU copy unless the problem was built
        for the run's device)."""
        if not self.evaluate_on_device:
            module = copy.deepcopy(module).to("cpu")
        return {key: float(value) for key, value in self.problem.evaluate(module).items()}


@dataclass(frozen=True)
class LaunchOptions:
    """The ``launch`` group, validated."""

    mode: str
    dtype: torch.dtype
    device: str
    seed: int
    steps: int
    log_every: int | None                   # None: the schedule's period
    overlap: bool | str


def build_job(cfg: DictConfig) -> Job:
    """Validate ``cfg`` and build the problem, schedule and inner optimizer of the run."""
    launch = build_launch(cfg.launch)
    schedule, stages = build_topology(cfg.topology, launch.steps)
    state_policy, optimizer, outer = build_agents(cfg.agents, schedule, stages)
    problem, problem_name, on_device = build_problem(cfg.problem, launch)
    if outer is not None:
        try:  # the rule's own checks (adaptive: Adam's second moment), also for launch=serial
            OUTER_RULES[outer["name"]].make(outer).check(problem.model().to(dtype=launch.dtype), optimizer)
        except ValueError as err:
            raise ValueError(f"agents.outer={{name: {outer['name']}}}: {err}") from None
    log_every = launch.log_every if launch.log_every is not None else schedule.period
    return Job(problem, problem_name, schedule, optimizer, state_policy, launch.mode, launch.device, launch.dtype,
               launch.seed, launch.steps, log_every, evaluate_on_device=on_device, outer=outer,
               stages=stages, overlap=launch.overlap)


def build_launch(node) -> LaunchOptions:
    """The ``launch`` group: ``name``, ``dtype``, ``device``, ``seed``, ``steps``, ``log_every``
    (None: the schedule's period, resolved by :func:`build_job`), ``overlap``."""
    mode = _choice(node.name, MODES, "launch.name")
    overlap = node.get("overlap", "auto")
    if not isinstance(overlap, bool) and overlap != "auto":
        raise ValueError(f"launch.overlap must be true or false; got {overlap!r} (or auto, the default: "
                         f"overlapped wherever it applies)")
    log_every = node.get("log_every")
    return LaunchOptions(
        mode=mode, dtype=DTYPES[_choice(node.dtype, tuple(DTYPES), "launch.dtype")],
        device=_device(str(node.device), mode), seed=_integer(node.seed, "launch.seed", minimum=0),
        steps=_integer(node.steps, "launch.steps", minimum=1),
        log_every=None if log_every is None else _integer(log_every, "launch.log_every", minimum=1),
        overlap=overlap)


def build_topology(node, steps: int) -> tuple[Schedule, tuple | None]:
    """The ``topology`` group: the schedule, and SLRLA's stages (``topology=stagewise``) or None."""
    options = _options(node, "topology")
    name = options.pop("name", None)
    if name not in SCHEDULES:
        raise ValueError(f"topology.name must be one of {', '.join(sorted(SCHEDULES))}; got {name!r}")
    _check_options(SCHEDULES[name], options, f"topology {name!r}", "topology")
    schedule = make_schedule(name, **options)
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


def build_problem(node, launch: LaunchOptions):
    """The ``problem`` group: the problem, its name, and whether it was built for the run's device.

    The run's ``seed``, ``dtype`` and ``device`` are passed to the factory for those of these
    parameters it accepts and the problem's options do not set."""
    table = problems()
    options = _options(node, "problem")
    name = options.pop("name", None)
    if name not in table:
        raise ValueError(f"problem.name must be one of {', '.join(sorted(table))}; got {name!r}")
    factory = table[name]
    _check_options(factory, options, f"problem {name!r}", "problem")
    accepted = _parameters(factory)
    for key, value in {"seed": launch.seed, "dtype": launch.dtype, "device": launch.device}.items():
        if accepted is not None and key in accepted and key not in options:
            options[key] = value
    torch.manual_seed(launch.seed)
    return factory(**options), name, "device" in options


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


def _choice(value, allowed, key: str):
    if value not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")
    return value


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


def _integer(value, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}; got {value!r}")
    return value


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


def _check_options(fn, options: dict, what: str, key: str) -> None:
    accepted = _parameters(fn)
    if accepted is None:
        return
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"{key} has option(s) {unknown} that {what} does not take; allowed: {sorted(accepted)}")


def _optimizer_factory(options: dict) -> Callable[[list], torch.optim.Optimizer]:
    """``agents.optimizer`` validated: ``name`` (a ``torch.optim`` optimizer) and its keyword
    options; the factory ``params -> optimizer``."""
    known = optimizers()
    name = str(options.pop("name", "")).lower()
    if name not in known:
        raise ValueError(f"agents.optimizer.name must be a torch.optim optimizer ({', '.join(sorted(known))}); got {name!r}")
    cls = known[name]
    _check_options(cls.__init__, options, f"torch.optim.{cls.__name__}", "agents.optimizer")
    # Build one on a throwaway parameter now, so that a bad value (lr < 0...) fails here.
    try:
        cls([nn.Parameter(torch.zeros(1))], **options)
    except ValueError as err:
        raise ValueError(f"agents.optimizer: torch.optim.{cls.__name__} refuses {options}: {err}") from None
    return lambda params: cls(params, **options)


def _convert(batch, dtype: torch.dtype, device):
    """``batch`` with floating tensors in ``dtype`` and every tensor on ``device`` (recursively)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device=device, dtype=dtype if batch.is_floating_point() else None)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_convert(b, dtype, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _convert(v, dtype, device) for k, v in batch.items()}
    return batch
