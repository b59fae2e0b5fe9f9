"""Checkpoints of a whole simulation: every agent, the counter t, RNG states, data positions.

Layout on disk (one folder per checkpoint, shards keyed by agent index, a manifest that commits)::

    directory/
        latest.json                 the manifest: which checkpoint is complete (written last)
        step-00000120/
            agent-0.pt ... agent-{m-1}.pt   Agent.state_dict(): the whole flat buffer (parameters
                                            and pullback state slots), the inner optimizer's
                                            state_dict, the batches consumed, the stream's
                                            state_dict when it has one
            rank-0.pt ... rank-{W-1}.pt     {"t", "agents", "rng"}: the RNG states of that rank's
                                            process (torch CPU, CUDA if initialised, numpy, random)
            outer.pt                        with a slow rule (``Simulation(outer=...)``):
                                            ``Simulation.replicated_state()``, the slow agent's
                                            anchor and the rule's own state (the outer
                                            optimizer's state_dict, the alpha* history);
                                            replicated bitwise on every rank, written by rank 0

Saving (:meth:`Checkpointer.save`, collective, every rank at the same t):

1. the finiteness check (``sim.finiteness.check``, :mod:`launch.engine.finiteness`): a non-finite
   agent raises :class:`NonFiniteError` on every rank *before* anything is written, so a bad
   step never replaces the last good checkpoint;
2. every rank writes its agents' shards and its rank file, each atomically (a temporary file in
   the same folder, flush, fsync, ``os.replace``, fsync of the folder);
3. one ``all_gather_object`` of (files written | error): if any rank failed to write, every rank
   raises the same ``RuntimeError`` and the manifest is left alone;
4. rank 0 writes ``latest.json`` atomically, then deletes the checkpoint folders beyond ``keep``.

A crash at any point leaves ``latest.json`` naming a complete checkpoint (the new one or the
previous one).  Every rank writes its own shards, so the directory must be on a filesystem that
every rank sees (one machine, or a shared filesystem).

Loading (:meth:`Checkpointer.load`, into a *fresh* :class:`Simulation` built with the same model
architecture, dtype, schedule, inner optimizer and state policy, on any placement): each rank
reads the manifest, the shards of its own agents and one rank file; one all-gather of the outcomes
makes a failure the same ``ValueError`` on every rank.  Because
shards are keyed by agent index, a checkpoint written on 3 ranks resumes co-located and the other
way round.  Order of restoration on each rank:

1. each agent's flat buffer, optimizer state and counter t;
2. the data position: when the stream (the object ``iter(data)`` returned) has
   ``state_dict()``/``load_state_dict()``, its saved state is loaded; otherwise the stream, which
   the fresh Simulation has just created from ``data``, is advanced by the number of batches the
   agent had consumed (``next`` called that many times, results discarded).  Streams must
   therefore be deterministic functions of their construction (a seeded generator), or
   stateful objects;
3. the RNG states, last (so that batches drawn while skipping do not leave their mark): with the
   same world size and placement, rank r restores rank r's states; otherwise each rank restores
   the states of the rank that held its lowest agent.  RNG states are per process, not per agent:
   a run whose loss or data uses the global RNGs resumes bit for bit only on the same layout.

Resuming on the same layout reproduces the uninterrupted trajectory bit for bit (float32 and
float64), also in the middle of a round; on another layout it is the other layout's trajectory,
equal to the uninterrupted one within the equivalence tolerance (sums in another order).

Example (co-located; the same code runs under torchrun / mpiexec)::

    ckpt = Checkpointer("runs/la2", every=100)
    sim = Simulation(model, loss_fn, data, schedule, optimizer)
    ckpt.load(sim)                     # no-op when the folder holds no checkpoint yet
    run_with_checkpoints(sim, steps=1000, checkpointer=ckpt)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from launch.engine.health import collective
from topology.validation import check_period

MANIFEST = "latest.json"
FORMAT = 1


# -- atomic files ---------------------------------------------------------------------------------
def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory descriptors
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable) -> None:
    """Write ``path`` atomically: ``write(file)`` into a temporary file in the same folder, flush,
    fsync, ``os.replace`` onto ``path``, fsync the folder.  Readers see the old file or the new."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)


def atomic_save(obj, path) -> None:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


# -- RNG states -------------------------------------------------------------------------------------
def rng_state() -> dict:
    """This process's RNG states: torch CPU, CUDA (every device, when CUDA is initialised),
    numpy's global RandomState (when numpy is installed) and Python's ``random``."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy
    except ImportError:  # pragma: no cover
        pass
    else:
        state["numpy"] = numpy.random.get_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state` (CUDA: as many devices as both sides have)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        for device, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, device)
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])


# -- the checkpointer ------------------------------------------------------------------------------
class Checkpointer:
    """Saves a :class:`launch.Simulation` into ``directory`` every ``every`` iterations.

    Args:
        directory: the checkpoint folder (created if missing; seen by every rank).
        every: save when the number of iterations done, t, is a multiple of ``every``
            (:meth:`maybe_save`); ``None``: only when asked (:meth:`save`).
        keep: how many complete checkpoints to keep (the oldest are deleted after a new one is
            committed); ``None`` keeps all.
    """

    def __init__(self, directory, every: int | None = None, keep: int | None = 2):
        if not isinstance(directory, (str, os.PathLike)):
            raise ValueError(f"directory must be a path; got {directory!r}")
        self.directory = Path(directory)
        self.every = None if every is None else check_period(every, name="every")
        self.keep = None if keep is None else check_period(keep, name="keep")

    # -- reading the folder ---------------------------------------------------------------------
    def manifest(self) -> dict | None:
        """The manifest of the latest complete checkpoint, or None if there is none."""
        path = self.directory / MANIFEST
        if not path.exists():
            return None
        return json.loads(path.read_text())

    def latest_step(self) -> int | None:
        """t of the latest complete checkpoint, or None."""
        manifest = self.manifest()
        return None if manifest is None else manifest["t"]

    # -- saving -------------------------------------------------------------------------------------
    def maybe_save(self, sim) -> bool:
        """Save when ``every`` divides t (and t > 0); returns whether it saved."""
        if self.every is not None and sim.t > 0 and sim.t % self.every == 0:
            self.save(sim)
            return True
        return False

    def save(self, sim) -> Path:
        """Write a checkpoint of ``sim`` at its current t (collective; see the module docstring)."""
        t = sim.t
        sim.finiteness.check(t, "checkpoint")
        replicated = sim.replicated_state()
        folder = self.directory / f"step-{t:08d}"
        error, files = None, []
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for i, entry in sim.state_dict()["agents"].items():
                atomic_save(entry, folder / f"agent-{i}.pt")
                files.append(f"agent-{i}.pt")
            atomic_save({"t": t, "agents": sorted(sim.agents), "rng": rng_state()},
                        folder / f"rank-{sim.rank}.pt")
            files.append(f"rank-{sim.rank}.pt")
            if replicated is not None and sim.rank == 0:
                atomic_save(replicated, folder / "outer.pt")
                files.append("outer.pt")
        except OSError as err:
            error = f"rank {sim.rank}: {err}"
        with collective(sim.comm, t, "checkpoint", tuple(range(sim.comm.world_size))):
            reports = sim.comm.all_gather_object((error, files))
        errors = [e for e, _ in reports if e is not None]
        if errors:
            raise RuntimeError(f"checkpoint of iteration t={t} not written (the last one is kept): {errors}")
        if sim.rank == 0:
            manifest = {
                "format": FORMAT, "t": t, "folder": folder.name,
                "num_agents": sim.schedule.num_agents, "world_size": sim.comm.world_size,
                "agents_per_rank": sim.placement.agents_per_rank, "schedule": repr(sim.schedule),
                "state_policy": _policy(sim), "outer": _rule_name(sim), "files": sorted(f for _, fs in reports for f in fs),
            }
            atomic_write(self.directory / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
            self._prune(keep_folder=folder.name)
        return folder

    def _prune(self, keep_folder: str) -> None:
        if self.keep is None:
            return
        folders = sorted(p for p in self.directory.glob("step-*") if p.is_dir())
        committed = [p for p in folders if p.name <= keep_folder]
        for old in committed[: max(0, len(committed) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)

    # -- loading ------------------------------------------------------------------------------------
    def load(self, sim, *, required: bool = False) -> int | None:
        """Restore the latest checkpoint into the fresh ``sim``; returns its t, or None when the
        folder holds none (``required=True``: ``ValueError`` instead).

        Each rank reads its own files; one small all-gather of the outcomes then makes every rank
        raise the same ``ValueError`` (or none), so a file that one rank cannot read does not
        leave the others waiting in their next collective.
        """
        error, t = None, None
        try:
            t = self._load_local(sim, required)
        except ValueError as err:
            error = f"rank {sim.rank}: {err}"
        with collective(sim.comm, sim.t, "checkpoint load", tuple(range(sim.comm.world_size))):
            outcomes = sim.comm.all_gather_object((error, t))
        errors = [e for e, _ in outcomes if e is not None]
        if errors:
            raise ValueError(f"cannot resume from {self.directory}: " + "; ".join(errors))
        if len({step for _, step in outcomes}) != 1:
            raise ValueError(f"the ranks found different checkpoints in {self.directory}: {[s for _, s in outcomes]}")
        return t

    def _load_local(self, sim, required: bool) -> int | None:
        manifest = self.manifest()
        if manifest is None:
            if required:
                raise ValueError(f"no checkpoint in {self.directory} (no {MANIFEST})")
            return None
        if (manifest["num_agents"], manifest["state_policy"], manifest.get("outer")) != (
                sim.schedule.num_agents, _policy(sim), _rule_name(sim)):
            raise ValueError(
                f"checkpoint in {self.directory} is of {manifest['schedule']} with state_policy "
                f"{manifest['state_policy']!r} and outer {manifest.get('outer')!r}; this simulation "
                f"runs {sim.schedule!r} with {_policy(sim)!r} and {_rule_name(sim)!r}"
            )
        folder = self.directory / manifest["folder"]
        agents = {i: self._read(folder / f"agent-{i}.pt") for i in sorted(sim.agents)}
        same_layout = (manifest["world_size"], manifest["agents_per_rank"]) == (
            sim.comm.world_size, sim.placement.agents_per_rank)
        source = sim.rank if same_layout else min(sim.agents) // manifest["agents_per_rank"]
        rng = self._read(folder / f"rank-{source}.pt")["rng"]
        replicated = self._read(folder / "outer.pt") if sim.slow_sync is not None else None
        sim.load_state_dict({"t": manifest["t"], "agents": agents})
        if replicated is not None:
            sim.load_replicated_state(replicated)
        set_rng_state(rng)
        return manifest["t"]

    @staticmethod
    def _read(path: Path):
        # Our own files; weights_only=False because RNG and data-stream states are not tensors.
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - a corrupt file fails in many ways (pickle, zip, EOF)
            raise ValueError(f"checkpoint file {path} cannot be read: {err}") from err


# -- what the manifest records of the simulation --------------------------------------------------
def _rule_name(sim) -> str | None:
    """The slow rule's class name (``OuterOptimizer``, ``AdaptiveAlpha``), or None."""
    return None if sim.slow_sync is None else type(sim.slow_sync.rule).__name__


def _policy(sim):
    """The state policy per level (a list), as the simulation resolved it."""
    return list(sim.sync_policy.levels)


def run_with_checkpoints(sim, steps: int, checkpointer: Checkpointer,
                         callback: Callable | None = None) -> None:
    """Step ``sim`` until t == ``steps`` (a total, so a resumed run does the rest), saving with
    ``checkpointer.maybe_save`` after each iteration and once more at the end (unless just saved)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer; got {steps!r}")
    saved = False
    while sim.t < steps:
        losses = sim.step()
        if callback is not None:
            callback(sim, losses)
        saved = checkpointer.maybe_save(sim)
    if not saved:  # decided from t and every alone: the same on every rank (save is collective)
        checkpointer.save(sim)
