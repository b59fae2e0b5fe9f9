"""From a configuration (``launch/conf``) to the objects of a run.

:func:`build_job` reads the four groups and returns a :class:`Job`:

- ``problem``: ``name`` and the keyword options of ``experiments.problems.PROBLEMS[name]``.  The
  run's ``seed``, ``dtype`` and ``device`` are passed to the factory too, for those of these
  parameters it accepts and the problem's options do not set;
- ``topology``: ``name`` and the options of ``topology.registry.SCHEDULES[name]``;
- ``agents``: ``optimizer`` (``name``, any ``torch.optim`` optimizer by its lower-case class name,
  and its keyword hyperparameters), ``state_policy`` (``maintain`` | ``reset`` | ``pullback``, or
  for a multilayer / nested schedule a per-level form of :mod:`agents.level_policy`: a name such
  as ``pullback_inner``, a list level 1 first, or a mapping ``{level: policy}``) and ``outer``
  (null; ``{name: sgd, lr, momentum, nesterov}``: outer SGD / SlowMo / DiLoCo,
  :class:`agents.outer.OuterOptimizer`; ``{name: adaptive, alpha_low}``: Zhang et al.'s adaptive
  alpha, :class:`agents.adaptive.AdaptiveAlpha`);
- ``launch``: ``name`` (serial | colocated | torch | mpi), ``device``, ``dtype``, ``seed``,
  ``steps``, ``log_every``.

Everything is validated here, locally and identically on every rank, before any communicator
exists: a wrong value is a ``ValueError`` naming the configuration key, what is wrong and what is
allowed.
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
from launch.communicator import LAUNCHES
from topology.registry import SCHEDULES, make_schedule
from topology.schedule import MultilayerSchedule, Schedule

#: Where a run can take place: the serial reference, or the simulator's communicators.
MODES = ("serial",) + LAUNCHES

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def optimizers() -> dict[str, type]:
    """Every ``torch.optim`` optimizer, keyed by its lower-case class name (``sgd``, ``adam``...)."""
    return {
        name.lower(): cls for name, cls in vars(torch.optim).items()
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer
    }


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
    log_every: int
    evaluate_on_device: bool                # the problem was built for ``device``
    outer: dict | None = None               # agents.outer, validated (see :func:`make_outer`)
    stages: tuple | None = None             # SLRLA's agents.slrla.Stage list (topology=stagewise)
    overlap: bool = False                   # launch.overlap: Simulation(overlap=...) (launch.overlap)

    def make_outer(self):
        """A fresh outer rule for the simulator (``Simulation(outer=...)``), or None."""
        return make_outer(self.outer)

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


def build_job(cfg: DictConfig) -> Job:
    """Validate ``cfg`` and build the problem, schedule and inner optimizer of the run."""
    launch = cfg.launch
    mode = _choice(launch.name, MODES, "launch.name")
    dtype = DTYPES[_choice(launch.dtype, tuple(DTYPES), "launch.dtype")]
    device = _device(str(launch.device), mode)
    seed = _integer(launch.seed, "launch.seed", minimum=0)
    steps = _integer(launch.steps, "launch.steps", minimum=1)
    log_every = _integer(launch.log_every, "launch.log_every", minimum=1)
    overlap = launch.get("overlap", False)
    if not isinstance(overlap, bool):
        raise ValueError(f"launch.overlap must be true or false; got {overlap!r}")

    topology_options = _options(cfg.topology, "topology")
    name = topology_options.pop("name", None)
    if name not in SCHEDULES:
        raise ValueError(f"topology.name must be one of {', '.join(sorted(SCHEDULES))}; got {name!r}")
    _check_options(SCHEDULES[name], topology_options, f"topology {name!r}", "topology")
    schedule = make_schedule(name, **topology_options)

    stages = None
    if name == "stagewise":
        from agents.slrla import check_stages

        stages = check_stages(topology_options["stages"])
        total = sum(stage.steps for stage in stages)
        if steps > total:
            raise ValueError(f"launch.steps must be at most the stages' total number of steps ({total}) "
                             f"with topology=stagewise; got {steps}")

    agent_options = _options(cfg.agents, "agents")
    extra = set(agent_options) - {"optimizer", "state_policy", "outer"}
    if extra:
        raise ValueError(f"agents has unknown key(s) {sorted(extra)}; allowed: optimizer, state_policy, outer")
    state_policy = _state_policy(agent_options.get("state_policy", "maintain"), schedule)
    optimizer = _optimizer_factory(dict(agent_options.get("optimizer") or {}))
    outer = _outer_options(agent_options.get("outer"))
    if outer is not None and stages is not None:
        raise ValueError("agents.outer must be null with topology=stagewise (SLRLA's slow update is plain Lookahead)")
    if outer is not None and overlap:
        raise ValueError("launch.overlap=true applies to plain mixing syncs; it cannot be combined with agents.outer")
    if outer is not None and len(schedule.passive) != 1:
        raise ValueError(f"agents.outer needs a topology with exactly one slow (passive) agent (lookahead, "
                         f"with_slow_agent); topology {name!r} has {len(schedule.passive)}")

    from experiments.problems import PROBLEMS  # the problems pull in their own dependencies

    problem_options = _options(cfg.problem, "problem")
    problem_name = problem_options.pop("name", None)
    if problem_name not in PROBLEMS:
        raise ValueError(f"problem.name must be one of {', '.join(sorted(PROBLEMS))}; got {problem_name!r}")
    factory = PROBLEMS[problem_name]
    _check_options(factory, problem_options, f"problem {problem_name!r}", "problem")
    accepted = _parameters(factory)
    run_options = {"seed": seed, "dtype": dtype, "device": device}
    for key, value in run_options.items():
        if accepted is not None and key in accepted and key not in problem_options:
            problem_options[key] = value
    torch.manual_seed(seed)
    problem = factory(**problem_options)
    if outer is not None and outer["name"] == "adaptive":
        try:  # the inner optimizer must keep Adam's second moment (one throwaway step on a copy)
            make_outer(outer).check(problem.model().to(dtype=dtype), optimizer)
        except ValueError as err:
            raise ValueError(f"agents.outer={{name: adaptive}}: {err}") from None
    return Job(problem, problem_name, schedule, optimizer, state_policy, mode, device, dtype, seed, steps,
               log_every, evaluate_on_device="device" in problem_options, outer=outer, stages=stages,
               overlap=overlap)


OUTER_KEYS = {"sgd": {"lr", "momentum", "nesterov"}, "adaptive": {"alpha_low"}}


def make_outer(options: dict | None):
    """The simulator's outer rule of validated ``agents.outer`` options: None, an
    :class:`agents.outer.OuterOptimizer` over ``torch.optim.SGD(lr, momentum, nesterov)`` (outer
    SGD with lr alpha and no momentum is Lookahead; with momentum SlowMo; with nesterov DiLoCo),
    or an :class:`agents.adaptive.AdaptiveAlpha`."""
    if options is None:
        return None
    if options["name"] == "adaptive":
        from agents.adaptive import AdaptiveAlpha

        return AdaptiveAlpha(options["alpha_low"])
    from agents.outer import OuterOptimizer

    return OuterOptimizer(outer_factory(options))


def outer_factory(options: dict) -> Callable[[list], torch.optim.Optimizer]:
    """``params -> torch.optim.SGD(params, lr, momentum, nesterov)`` of ``agents.outer`` (sgd)."""
    kwargs = {k: v for k, v in options.items() if k != "name"}
    return lambda params: torch.optim.SGD(params, **kwargs)


def _outer_options(outer) -> dict | None:
    """``agents.outer`` validated: None, ``{name: sgd, lr, momentum=0, nesterov=false}`` or
    ``{name: adaptive, alpha_low=0.1}``."""
    if outer is None:
        return None
    if not isinstance(outer, dict):
        raise ValueError(f"agents.outer must be null or a mapping with a name (sgd | adaptive); got {outer!r}")
    outer = dict(outer)
    name = outer.get("name")
    if name not in OUTER_KEYS:
        raise ValueError(f"agents.outer.name must be one of sgd, adaptive; got {name!r}")
    unknown = sorted(set(outer) - OUTER_KEYS[name] - {"name"})
    if unknown:
        raise ValueError(f"agents.outer has key(s) {unknown} that outer {name} does not take; "
                         f"allowed: {sorted(OUTER_KEYS[name])}")
    if name == "adaptive":
        from agents.adaptive import AdaptiveAlpha

        outer.setdefault("alpha_low", 0.1)
        try:
            AdaptiveAlpha(outer["alpha_low"])
        except ValueError as err:
            raise ValueError(f"agents.outer.{err}") from None
        return outer
    if "lr" not in outer:
        raise ValueError("agents.outer.lr must be set for outer sgd (the outer learning rate; lr=alpha, "
                         "no momentum, is Lookahead)")
    outer.setdefault("momentum", 0.0)
    outer.setdefault("nesterov", False)
    try:
        outer_factory(outer)([nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        raise ValueError(f"agents.outer: torch.optim.SGD refuses {outer}: {err}") from None
    return outer


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
