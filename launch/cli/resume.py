"""Checkpoints on the command line, and the proof that a resume continues the same run.

``launch.checkpoint_every``, ``launch.checkpoint_dir``, ``launch.resume``, ``launch.resume_allow``
(see :mod:`launch.engine.store.checkpoint` for what a checkpoint holds), validated when the job is
built (:func:`build_checkpoints`):

- ``checkpoint_every: N`` writes a checkpoint every N iterations and at the end, under
  ``checkpoint_dir`` (relative paths are taken from the run directory; give an absolute path, or
  the same ``hydra.run.dir``, to resume a run in a new process);
- ``resume: true`` starts from the latest complete checkpoint in ``checkpoint_dir`` (a clear error
  when there is none) and runs on until t reaches ``launch.steps``, a total: a checkpoint past it
  is an error naming both (:func:`launch.engine.store.checkpoint.check_resume_step`, in the app).  The
  trajectory is the uninterrupted run's, bit for bit (same layout) or within 1e-12 (another
  layout).  The resume first proves it continues the same run: the checkpoint's resolved
  configuration (:func:`config_record`) must equal the new command's, except the keys listed in
  ``resume_allow`` (below), whose new values then apply;
- every checkpoint's files are checksummed (:mod:`launch.engine.store.manifest`): a corrupted, swapped
  or edited checkpoint is refused, naming the file.

Only simulator runs (colocated, torch, mpi) checkpoint; the co-located reference check is skipped
on resume (the serial reference cannot resume), and SLRLA's stage controller is not checkpointed,
so ``topology=stagewise`` refuses ``resume``.

**The same run.**  Every checkpoint of a command-line run holds :func:`config_record`, the
resolved configuration that defines the trajectory, beside the engine's own record
(:mod:`launch.engine.store.run_record`); ``launch.resume=true`` compares both with the new
command's (:meth:`Checkpointer.load <launch.engine.store.checkpoint.Checkpointer.load>`) and
stops, on every rank with exit status 2, at the first difference, naming each differing key with
both values.

Recorded (defaults filled in, so that ``agents=sgd`` and ``agents.optimizer.momentum=0`` compare
equal when they build the same optimizer):

- ``problem.*``: the problem's name and every option of its factory (those not given: the
  factory's defaults);
- ``topology.*``: the schedule's name and every option of its factory;
- ``agents.optimizer.*``: the inner optimizer's name and every hyperparameter it was built with
  (``torch.optim.<Name>(...).defaults``); ``agents.state_policy``: the policy of each level;
  ``agents.outer``: the slow rule's options (null without one);
- ``launch.seed``, ``launch.dtype``.

Not recorded, free to change on resume: ``launch.steps`` (the total to run to), the layout
(``launch.name``, the number of processes, ``launch.device``, ``launch.overlap``,
``launch.exact``, ``launch.num_threads``), and ``log_every``, ``check_reference``, ``checkpoint_every``,
``checkpoint_dir``, ``timeout_s``, ``tolerance``, ``eval_every``, ``tensorboard``, ``cluster``,
``compute_s``.

``launch.resume_allow`` (a list of keys, default empty) lets recorded keys change: a key allows
the keys under it (``agents.optimizer`` allows every hyperparameter), and the new values apply
from the checkpoint's t on (the engine sets the new hyperparameters back after loading the
optimizers' state, which would restore the saved ones).  Listing a free key (``launch.steps``) is
accepted and changes nothing.  What the saved state could not fit never changes (the optimizer's
class, the number of agents, the parameters' count and dtype): an error says so.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from agents.level_policy import resolve_policy
from agents.settings import normalize
from launch.cli.registry import SCHEDULES, optimizers, problems
from launch.engine.store.checkpoint import Checkpointer
from launch.engine.store.run_record import allowed, flatten
from topology.checks import check_bool, check_integer
from topology.schedule import MultilayerSchedule

#: Keys a resume may always change (not recorded); listing them in launch.resume_allow is a no-op.
FREE = ("launch.steps", "launch.name", "launch.device", "launch.overlap", "launch.exact", "launch.num_threads",
        "launch.log_every",
        "launch.check_reference", "launch.checkpoint_every", "launch.checkpoint_dir", "launch.timeout_s", "tolerance",
        "launch.eval_every", "launch.tensorboard", "launch.cluster", "launch.compute_s")

#: The configuration's recorded keys -> the engine record's keys they determine.
ENGINE_KEYS = {"topology": ("schedule",), "agents.state_policy": ("state_policy",), "launch.dtype": ("dtype",)}


@dataclass(frozen=True)
class CheckpointOptions:
    """The checkpoint keys of the ``launch`` group, validated, and the run's configuration record
    (what a resume compares)."""

    every: int | None           # launch.checkpoint_every
    directory: str              # launch.checkpoint_dir (relative: from the run directory)
    resume: bool                # launch.resume
    allow: tuple[str, ...]      # launch.resume_allow, the recorded keys (free keys dropped)
    record: dict                # :func:`launch.cli.resume.config_record`


def build_checkpoints(cfg: DictConfig, job) -> CheckpointOptions | None:
    """The run's checkpoint options (None when neither ``checkpoint_every`` nor ``resume`` is
    set); validated locally and identically on every rank: a bad value is a ``ValueError``
    naming the key."""
    every = check_integer(cfg.launch.get("checkpoint_every"), "launch.checkpoint_every", minimum=1,
                          optional="")
    resume = check_bool(cfg.launch.get("resume", False), "launch.resume")
    if every is None and not resume:
        if cfg.launch.get("resume_allow"):   # checked all the same: a typo must not wait for the resume
            resume_allow(cfg, config_record(cfg, job))
        return None
    if job.launch.mode == "serial":
        raise ValueError("launch.checkpoint_every / launch.resume need a simulator run (launch=colocated, torch or mpi); "
                         "launch=serial does not checkpoint")
    if resume and job.stages is not None:
        raise ValueError("launch.resume is not supported with topology=stagewise (SLRLA's stage controller "
                         "is not checkpointed)")
    record = config_record(cfg, job)
    return CheckpointOptions(every, str(cfg.launch.get("checkpoint_dir") or "checkpoints"), resume,
                             resume_allow(cfg, record), record)


def checkpointer_for(options: CheckpointOptions | None, out_dir: Path) -> Checkpointer | None:
    """The run's :class:`Checkpointer` (None without checkpoint options), its folder taken from
    the run directory ``out_dir`` when relative."""
    if options is None:
        return None
    directory = Path(options.directory)
    if not directory.is_absolute():
        directory = out_dir / directory
    return Checkpointer(directory, every=options.every, config=options.record,
                        allow=options.allow + engine_keys(options.allow), allow_option="launch.resume_allow",
                        key_name=config_key)


def config_record(cfg: DictConfig, job) -> dict:
    """The resolved configuration of the run that defines its trajectory (module docstring), a
    normalized flat mapping of dotted keys."""
    problem = _container(cfg.problem)
    topology = _container(cfg.topology)
    optimizer = dict(_container(cfg.agents).get("optimizer") or {})
    name = str(optimizer.pop("name", "")).lower()
    built = optimizers()[name]([nn.Parameter(torch.zeros(1))], **optimizer)
    depth = job.schedule.depth if isinstance(job.schedule, MultilayerSchedule) else None
    record = {
        "problem": _with_defaults(problems()[problem["name"]], problem, skip=("seed", "dtype", "device")),
        "topology": _with_defaults(SCHEDULES[topology["name"]], topology),
        "agents": {"optimizer": {"name": name, **built.defaults},
                   "state_policy": list(resolve_policy(job.state_policy, depth, name="agents.state_policy")),
                   "outer": job.outer},
        "launch": {"seed": job.launch.seed, "dtype": str(cfg.launch.dtype)},
    }
    return normalize(flatten(record))


def resume_allow(cfg: DictConfig, record: dict) -> tuple[str, ...]:
    """``launch.resume_allow`` validated against ``record``: a list of recorded keys (or keys
    above some; :data:`FREE` keys are accepted).  ``ValueError`` naming the key otherwise."""
    value = cfg.launch.get("resume_allow") or []
    value = OmegaConf.to_container(value) if not isinstance(value, (list, str)) else value
    if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"launch.resume_allow must be a list of configuration keys, e.g. "
                         f"[agents.optimizer.lr,launch.steps]; got {value!r}")
    for key in value:
        if key not in FREE and not any(allowed(k, [key]) for k in record):
            groups = sorted({k.split(".")[0] for k in record})
            raise ValueError(f"launch.resume_allow names {key!r}, which is not a recorded key of the run; "
                             f"allowed: keys under {', '.join(groups)} (e.g. agents.optimizer.lr, topology.k), "
                             f"launch.seed, launch.dtype, or a free key ({', '.join(FREE)})")
    return tuple(k for k in value if k not in FREE)


def engine_keys(allow) -> tuple[str, ...]:
    """The engine record's keys that the configuration keys ``allow`` determine (so that the
    engine's own comparison allows them too): ``agents.optimizer.lr`` -> ``optimizer.lr``,
    ``agents.outer.lr`` -> ``outer.lr`` and ``outer.optimizer.lr``, ``topology.*`` ->
    ``schedule``, ...

    Example:
        >>> engine_keys(["agents.optimizer.lr", "topology.k"])
        ('optimizer.lr', 'schedule')
    """
    keys: list[str] = []
    for key in allow:
        for config, engine in ENGINE_KEYS.items():
            if allowed(key, [config]) or allowed(config, [key]):
                keys += engine
        if allowed(key, ["agents.optimizer"]) or allowed("agents.optimizer", [key]):
            rest = key[len("agents.optimizer."):] if key.startswith("agents.optimizer.") else ""
            keys.append("optimizer" if rest in ("", "name") else f"optimizer.{rest}")
        if allowed(key, ["agents.outer"]) or allowed("agents.outer", [key]):
            rest = key[len("agents.outer."):] if key.startswith("agents.outer.") else ""
            keys += ["outer"] if rest in ("", "name") else [f"outer.{rest}", f"outer.optimizer.{rest}"]
    return tuple(dict.fromkeys(keys))


def config_key(key: str) -> str:
    """The configuration key of an engine record's ``key`` (the inverse of :func:`engine_keys`,
    for a checkpoint written through the Python API, which holds no configuration record).

    Example:
        >>> config_key("optimizer.lr"), config_key("outer.optimizer.momentum"), config_key("schedule")
        ('agents.optimizer.lr', 'agents.outer.momentum', 'topology')
    """
    for config, engine in ENGINE_KEYS.items():
        if key in engine:
            return config
    if key.startswith("outer.optimizer."):
        return "agents.outer." + key[len("outer.optimizer."):]
    if key == "optimizer" or key.startswith("optimizer.") or key == "outer" or key.startswith("outer."):
        return "agents." + key
    return key


def _container(node) -> dict:
    return dict(OmegaConf.to_container(node, resolve=True)) if isinstance(node, DictConfig) else dict(node)


def _with_defaults(factory, options: dict, skip: tuple = ()) -> dict:
    """``options`` with every keyword parameter of ``factory`` they leave out at its default
    (``skip``: parameters the run passes from elsewhere, unless ``options`` sets them)."""
    full = {}
    for p in inspect.signature(factory).parameters.values():
        if p.default is not inspect.Parameter.empty and p.name not in skip:
            full[p.name] = p.default
    full.update(options)
    return full
