"""Checkpoints of a whole simulation: every agent, the counter t, RNG states, data positions,
each file checksummed, and the record of what defines the run.

Layout on disk (one folder per checkpoint, shards keyed by agent index, a manifest that commits)::

    directory/
        latest.json                 the manifest (launch.engine.store.manifest): which checkpoint is
                                    complete (written last), the sha256 of each of its files, the
                                    layout that wrote it, and the records of the run (below)
        step-00000120/
            agent-0.pt ... agent-{m-1}.pt   {"t", "agent": Agent.state_dict()}: the whole flat
                                            buffer (parameters and pullback state slots), the inner
                                            optimizer's state_dict, the batches consumed, the
                                            stream's state_dict when it has one
            rank-0.pt ... rank-{W-1}.pt     {"t", "agents", "rng", "extra"}: the RNG states of that
                                            rank's process (torch CPU, CUDA if initialised, numpy,
                                            random) and the caller's own state of that rank
                                            (``save(..., extra=...)``, e.g. the own loop's)
            outer.pt                        with a slow rule (``Simulation(outer=...)``):
                                            {"t", "state": ``Simulation.replicated_state()``}, the
                                            slow agent's anchor and the rule's own state; replicated
                                            bitwise on every rank, written by rank 0

One mechanism for both doors: :meth:`Checkpointer.save` and :meth:`Checkpointer.load` take the
engine (:class:`launch.engine.core.SyncEngine`) or a door that holds it (:class:`launch.Simulation`,
:class:`launch.AgentOptimizer`).

Saving (:meth:`Checkpointer.save`, collective, every rank at the same t):

1. the finiteness check (:meth:`launch.engine.core.SyncEngine.check_finite`): a non-finite
   agent raises :class:`NonFiniteError` on every rank *before* anything is written, so a bad
   step never replaces the last good checkpoint;
2. every rank writes its agents' shards and its rank file, each atomically (a temporary file in
   the same folder, flush, fsync, ``os.replace``, fsync of the folder), and takes each file's
   sha256 from the bytes it wrote;
3. one all-gather of (error | checksums, the rank's record of the run);
4. rank 0 writes ``latest.json`` atomically, then one all-gather of that outcome, then rank 0
   deletes the checkpoint folders beyond ``keep``.

Any error in 2 or 4 on any rank (a full disk, a read-only folder, any ``OSError``) is the same
:class:`CheckpointError` on every rank ("checkpoint of iteration t=... not written (the last one is
kept: ...)"), and rank 0 removes the failed checkpoint's folder.  A crash at any point leaves
``latest.json`` naming a complete checkpoint (the new one or the previous one).  Every rank writes
its own shards, so the directory must be on a filesystem that every rank sees (one machine, or a
shared filesystem).

Loading (:meth:`Checkpointer.load`, into a *fresh* :class:`Simulation`, on any placement): each rank
reads and validates the manifest, compares the records of the run (below), reads the shards of its
own agents, one rank file and ``outer.pt``, each checked against its sha256 in the manifest and
its t against the manifest's; one all-gather of the outcomes makes any failure the same
``ValueError`` on every rank.  Because shards are keyed by agent index, a checkpoint written on 3
ranks resumes co-located and the other way round.  Order of restoration on each rank:

1. each agent's flat buffer, optimizer state and counter t;
2. the data position: when the stream (the object ``iter(data)`` returned) has
   ``state_dict()``/``load_state_dict()``, its saved state is loaded; otherwise the stream, which
   the fresh Simulation has just created from ``data``, is advanced by the number of batches the
   agent had consumed (``next`` called that many times, results discarded).  Streams must
   therefore be deterministic functions of their construction (a seeded generator), or
   stateful objects;
3. the hyperparameters the resume was allowed to change (below), set back to the new run's
   values: ``Optimizer.load_state_dict`` would otherwise restore the saved ones;
4. the RNG states, last (so that batches drawn while skipping do not leave their mark): with the
   same world size and placement, rank r restores rank r's states; otherwise each rank restores
   the states of the rank that held its lowest agent.  RNG states are per process, not per agent:
   a run whose loss or data uses the global RNGs resumes bit for bit only on the same layout.

**The same run.**  The manifest holds the engine's record of the run
(:func:`launch.engine.store.run_record.engine_record`: schedule, state policy, inner optimizer and its
hyperparameters, slow rule, dtype, sizes) and the caller's own (``Checkpointer(config=...)``; the
command line's resolved configuration).  :meth:`Checkpointer.load` compares both with the fresh
simulation's: any difference is a ``ValueError`` naming each differing key with both values
(the caller's keys first: they explain the engine's), unless the key is in ``allow``; an allowed
change applies from the checkpoint's t on.  The keys of
:data:`launch.engine.store.run_record.FIXED` (sizes, dtype, the optimizers' classes) never change.

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

import io
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from launch.engine.core import SyncEngine
from launch.engine.guard.health import gather_objects
from launch.engine.store.manifest import FORMAT, MANIFEST, read_manifest, read_verified, sha256_hex, step_folder
from launch.engine.store.run_record import (ABSENT, FIXED, allowed, differences, engine_record, flatten, normalize,
                                      reapply_hyperparameters, snapshot_hyperparameters)
from topology.validation import check_period


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
class CheckpointError(RuntimeError):
    """A checkpoint could not be written (on some rank); the last complete one is kept.  Raised
    identically on every rank."""


class Checkpointer:
    """Saves a :class:`launch.Simulation` into ``directory`` every ``every`` iterations.

    Args:
        directory: the checkpoint folder (created if missing; seen by every rank).
        every: save when the number of iterations done, t, is a multiple of ``every``
            (:meth:`maybe_save`); ``None``: only when asked (:meth:`save`).
        keep: how many complete checkpoints to keep (the oldest are deleted after a new one is
            committed); ``None`` keeps all.
        config: the caller's record of the run (a JSON-able mapping; nested mappings become dotted
            keys), saved in every checkpoint and compared by :meth:`load` (when both the
            checkpoint and this checkpointer have one).
        allow: keys (of the engine's record or of ``config``) that may differ on :meth:`load`; a
            key allows the keys under it.  The new values then apply.
        allow_option: how the error message tells the user to allow a change (default
            ``Checkpointer(allow=[...])``; the command line: ``launch.resume_allow``).
        key_name: ``engine key -> the caller's key`` (the command line: ``optimizer.lr`` ->
            ``agents.optimizer.lr``), for the messages about a checkpoint that holds no caller's
            record (one written through the Python API), whose engine keys are then compared.
    """

    def __init__(self, directory, every: int | None = None, keep: int | None = 2, *, config: dict | None = None,
                 allow=(), allow_option: str | None = None, key_name=None):
        if not isinstance(directory, (str, os.PathLike)):
            raise ValueError(f"directory must be a path; got {directory!r}")
        self.directory = Path(directory)
        self.every = None if every is None else check_period(every, name="every")
        self.keep = None if keep is None else check_period(keep, name="keep")
        if config is not None and not isinstance(config, dict):
            raise ValueError(f"config must be a mapping (the caller's record of the run) or None; got {config!r}")
        self.config = None if config is None else normalize(flatten(config))
        if isinstance(allow, str) or not all(isinstance(a, str) for a in allow):
            raise ValueError(f"allow must be a list of record keys; got {allow!r}")
        self.allow = tuple(allow)
        self.allow_option = allow_option
        self.key_name = key_name
        #: After :meth:`load`: ``(key, checkpoint's value, new value)`` of every allowed change (in
        #: the caller's keys when the checkpoint and this checkpointer both have a ``config``).
        self.changed: list[tuple[str, object, object]] = []
        #: After :meth:`load`: the ``extra`` this rank's state was saved with (:meth:`save`).
        self.extra = None

    # -- reading the folder ---------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    def manifest(self) -> dict | None:
        """The validated manifest of the latest complete checkpoint, or None if there is none
        (``ValueError`` when ``latest.json`` is malformed, :func:`launch.engine.store.manifest.read_manifest`)."""
        return read_manifest(self.manifest_path)

    def latest_step(self) -> int | None:
        """t of the latest complete checkpoint, or None."""
        manifest = self.manifest()
        return None if manifest is None else manifest["t"]

    def check_writable(self, target) -> None:
        """``ValueError`` on every rank alike (naming the folder and each rank's error) when some
        rank cannot write into :attr:`directory` -- a file in its place, no permission -- so that a
        run learns it before it computes, not at its first checkpoint.  Collective: every rank
        calls it, with the engine or door of :meth:`save`."""
        engine = engine_of(target)
        error = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.directory, prefix=".writable.")
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            error = f"rank {engine.rank}: {_describe(err)}"
        errors = [e for e in gather_objects(engine.comm, error, engine.t, "check of the checkpoint folder") if e]
        if errors:
            raise ValueError(f"the checkpoint folder {self.directory} cannot be written: {'; '.join(errors)}")

    # -- saving -------------------------------------------------------------------------------------
    def due(self, t: int) -> bool:
        """Is a checkpoint of iteration count ``t`` due: ``every`` divides t, and t > 0?"""
        return self.every is not None and t > 0 and t % self.every == 0

    def maybe_save(self, target) -> bool:
        """Save when :meth:`due` at the target's t; returns whether it saved."""
        if self.due(engine_of(target).t):
            self.save(target)
            return True
        return False

    def save(self, target, extra=None) -> Path:
        """Write a checkpoint of ``target`` (a :class:`launch.engine.core.SyncEngine`, or a door
        holding one: a Simulation, an AgentOptimizer) at its current t; ``extra``: this rank's
        own state besides the agents (any picklable object, saved in its rank file; None: none).
        Collective; see the module docstring."""
        engine = engine_of(target)
        t = engine.t
        engine.check_finite("checkpoint")
        folder = self.directory / step_folder(t)
        error, written = None, {}
        try:
            written = self._write_files(engine, folder, extra)
        except Exception as err:  # noqa: BLE001 - any local failure must reach every rank (no hang)
            error = f"rank {engine.rank}: {_describe(err)}"
        reports = gather_objects(engine.comm, (error, written, engine_record(engine)), t, "checkpoint")
        errors = [e for e, _, _ in reports if e is not None]
        if not errors and engine.rank == 0:
            errors += self._commit(engine, folder, reports)
        errors = gather_objects(engine.comm, errors, t, "checkpoint commit")[0]   # rank 0's: all of them
        if errors:
            if engine.rank == 0:
                self._remove_uncommitted(folder)
            raise CheckpointError(f"checkpoint of iteration t={t} not written (the last one is kept: "
                                  f"{self._latest_description()}): {'; '.join(errors)}")
        if engine.rank == 0:
            self._prune(keep_folder=folder.name)
        return folder

    @staticmethod
    def _write_files(engine, folder: Path, extra) -> dict[str, str]:
        """This rank's files of the checkpoint in ``folder``; ``{file name: sha256}``."""
        t, rank = engine.t, engine.rank
        folder.mkdir(parents=True, exist_ok=True)
        written = {}
        for i, entry in engine.state_dict()["agents"].items():
            written[f"agent-{i}.pt"] = _save({"t": t, "agent": entry}, folder / f"agent-{i}.pt")
        written[f"rank-{rank}.pt"] = _save({"t": t, "agents": sorted(engine.agents), "rng": rng_state(),
                                            "extra": extra}, folder / f"rank-{rank}.pt")
        replicated = engine.replicated_state()
        if replicated is not None and rank == 0:
            written["outer.pt"] = _save({"t": t, "state": replicated}, folder / "outer.pt")
        return written

    def _commit(self, engine, folder: Path, reports: list) -> list[str]:
        """Rank 0: the manifest of the checkpoint in ``folder``, written atomically (what commits
        it); the errors met (none when it is written)."""
        run: dict = {}
        for _, _, record in reports:   # ranks without a worker do not know the optimizer
            run.update(record)
        manifest = {
            "format": FORMAT, "t": engine.t, "folder": folder.name,
            "files": dict(sorted((name, digest) for _, files, _ in reports for name, digest in files.items())),
            "num_agents": engine.schedule.num_agents, "world_size": engine.comm.world_size,
            "agents_per_rank": engine.placement.agents_per_rank, "run": run, "config": self.config,
        }
        try:
            atomic_write(self.manifest_path, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        except Exception as err:  # noqa: BLE001 - as in save
            return [f"rank 0, writing {MANIFEST}: {_describe(err)}"]
        return []

    def _latest_description(self) -> str:
        try:
            t = self.latest_step()
        except ValueError:
            return f"{self.manifest_path} unreadable"
        return f"no checkpoint in {self.directory}" if t is None else f"t={t} in {self.directory}"

    def _remove_uncommitted(self, folder: Path) -> None:
        """Remove ``folder`` (a failed checkpoint's files) unless the manifest names it."""
        try:
            committed = self.manifest()
        except ValueError:
            return
        if committed is None or committed["folder"] != folder.name:
            shutil.rmtree(folder, ignore_errors=True)

    def _prune(self, keep_folder: str) -> None:
        if self.keep is None:
            return
        folders = sorted(p for p in self.directory.glob("step-*") if p.is_dir())
        committed = [p for p in folders if p.name <= keep_folder]
        for old in committed[: max(0, len(committed) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)

    # -- loading ------------------------------------------------------------------------------------
    def load(self, target, *, required: bool = False) -> int | None:
        """Restore the latest checkpoint into the fresh ``target`` (an engine or a door, as
        :meth:`save`); returns its t, or None when the folder holds none (``required=True``:
        ``ValueError`` instead).  :attr:`extra` is then the ``extra`` this rank's state was saved
        with (on another layout: that of the rank that held this rank's lowest agent).

        Each rank validates the manifest, compares the records of the run, reads and verifies its
        own files; one small all-gather of the outcomes then makes every rank raise the same
        ``ValueError`` (or none), so a file that one rank cannot read does not leave the others
        waiting in their next collective.  :attr:`changed` lists the allowed changes applied.
        """
        engine = engine_of(target)
        error, t = None, None
        try:
            t = self._load_local(engine, required)
        except ValueError as err:
            error = str(err)
        outcomes = gather_objects(engine.comm, (error, t), engine.t, "checkpoint load")
        errors = [(rank, e) for rank, (e, _) in enumerate(outcomes) if e is not None]
        if errors:
            if len({e for _, e in errors}) == 1:   # the same on every rank that failed: say it once
                ranks = "" if len(errors) in (1, len(outcomes)) else f" (ranks {[r for r, _ in errors]})"
                raise ValueError(f"cannot resume from {self.directory}{ranks}: {errors[0][1]}")
            raise ValueError(f"cannot resume from {self.directory}: " + "; ".join(f"rank {r}: {e}" for r, e in errors))
        if len({step for _, step in outcomes}) != 1:
            raise ValueError(f"the ranks found different checkpoints in {self.directory}: {[s for _, s in outcomes]}")
        return t

    def _load_local(self, engine, required: bool) -> int | None:
        manifest = self.manifest()
        if manifest is None:
            if required:
                raise ValueError(f"no checkpoint in {self.directory} (no {MANIFEST})")
            return None
        t = manifest["t"]
        changed, engine_changes = self._compare(manifest, engine)
        folder = self.directory / manifest["folder"]
        if not folder.is_dir():
            raise ValueError(f"{self.manifest_path} names the folder {folder.name}, which does not exist")
        agents = {i: self._read(folder / f"agent-{i}.pt", manifest)["agent"] for i in sorted(engine.agents)}
        same_layout = (manifest["world_size"], manifest["agents_per_rank"]) == (
            engine.comm.world_size, engine.placement.agents_per_rank)
        source = engine.rank if same_layout else min(engine.agents) // manifest["agents_per_rank"]
        rank_state = self._read(folder / f"rank-{source}.pt", manifest)
        replicated = self._read(folder / "outer.pt", manifest)["state"] if engine.slow_rule is not None else None
        fresh = snapshot_hyperparameters(engine)
        engine.load_state_dict({"t": t, "agents": agents})
        if replicated is not None:
            engine.load_replicated_state(replicated)
        reapply_hyperparameters(engine, fresh, [key for key, _, _ in engine_changes])
        set_rng_state(rank_state["rng"])
        self.changed, self.extra = changed, rank_state.get("extra")
        return t

    def _compare(self, manifest: dict, engine) -> tuple[list, list]:
        """The allowed differences between the checkpoint's records and this run's, ``(key,
        checkpoint's value, new value)``: those to report (the caller's record's when both have
        one, else the engine's) and the engine's; ``ValueError`` naming every other difference
        (module docstring)."""
        current = engine_record(engine)
        saved = manifest["run"]
        if "optimizer" not in current:   # no worker on this rank: another rank compares the optimizer
            saved = {k: v for k, v in saved.items() if not allowed(k, ["optimizer"])}
        engine = differences(saved, current)
        config = [] if self.config is None or manifest["config"] is None else differences(manifest["config"], self.config)
        refused = [d for d in config if not allowed(d[0], self.allow)]
        if not refused:
            refused = [d for d in engine if not allowed(d[0], self.allow) and d[0] not in FIXED]
        fixed = [d for d in engine if d[0] in FIXED]
        # A class that changed explains every difference of its hyperparameters, and a ``name``
        # that changed those of its siblings (another optimizer's options): not listed.
        # A key under another refused key (schedule.fingerprint under schedule) is explained by it.
        named = [d[0][: -len("name")] for d in refused if d[0].endswith(".name")]
        refused = [d for d in refused if not any(d[0].startswith(f[0] + ".") for f in fixed + refused)
                   and not any(d[0].startswith(prefix) and d[0] != prefix + "name" for prefix in named)]
        compared = self.config is not None and manifest["config"] is not None
        name = self.key_name if (self.key_name is not None and not compared) else (lambda key: key)
        if refused or fixed:
            parts = [f"{name(key)} is {_show(new)}, the checkpoint's {_show(old)}" for key, old, new in refused]
            parts += [f"{name(key)} is {_show(new)}, the checkpoint's {_show(old)} (this cannot change on resume: the "
                      f"saved state would not fit)" for key, old, new in fixed]
            message = f"this run is not the run of the checkpoint (t={manifest['t']}): " + "; ".join(parts)
            keys = [name(key) for key, _, _ in refused]
            if keys and not fixed:
                option = (f"Checkpointer(allow={keys!r})" if self.allow_option is None
                          else f"{self.allow_option}=[{','.join(keys)}]")
                message += f". To continue with the new value(s) from t={manifest['t']} on, allow the change: {option}"
            raise ValueError(message)
        return (config if compared else engine), engine

    @staticmethod
    def _read(path: Path, manifest: dict) -> dict:
        """A checkpoint file, verified against the manifest's sha256 and t."""
        data = read_verified(path, manifest, path.parent.parent / MANIFEST)
        try:
            # Our own files; weights_only=False because RNG and data-stream states are not tensors.
            content = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - a corrupt file fails in many ways (pickle, zip, EOF)
            raise ValueError(f"checkpoint file {path} cannot be read: {err}") from err
        if not isinstance(content, dict) or content.get("t") != manifest["t"]:
            held = content.get("t") if isinstance(content, dict) else None
            raise ValueError(f"checkpoint file {path} holds iteration t={held}, {MANIFEST} says t={manifest['t']}: "
                             f"refused (an edited manifest or files mixed from several checkpoints)")
        return content


def _save(obj, path: Path) -> str:
    """``torch.save(obj)`` to ``path`` atomically; returns the sha256 of the bytes written."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    atomic_write(path, lambda f: f.write(data))
    return sha256_hex(data)


def _show(value) -> str:
    return "absent" if value == ABSENT else repr(value)


def _describe(err: Exception) -> str:
    return str(err) if isinstance(err, OSError) else f"{type(err).__name__}: {err}"


def check_resume_step(t: int | None, steps, directory, steps_name: str = "steps") -> None:
    """``ValueError`` when a checkpoint at iteration ``t`` is past the run's total ``steps``: the
    run cannot go back (``steps_name``: how the caller spells the argument).

    Example:
        >>> check_resume_step(300, 200, "ckpt")
        Traceback (most recent call last):
        ...
        ValueError: steps=200 is before the checkpoint in ckpt, which is at t=300: a resumed run goes on to steps (a total, not a count of new steps); pass steps >= 300
    """
    if t is not None and not isinstance(steps, bool) and isinstance(steps, int) and t > steps:
        raise ValueError(f"{steps_name}={steps} is before the checkpoint in {directory}, which is at t={t}: a "
                         f"resumed run goes on to {steps_name} (a total, not a count of new steps); pass "
                         f"{steps_name} >= {t}")


def decline_save(target, reason: str) -> None:
    """This rank's part of a checkpoint it cannot write (no :class:`Checkpointer` to write with):
    the collectives of :meth:`Checkpointer.save`, contributing ``reason`` as this rank's error, so
    that every rank raises the same :class:`CheckpointError` instead of waiting for this one."""
    engine = engine_of(target)
    t = engine.t
    engine.check_finite("checkpoint")
    gather_objects(engine.comm, (f"rank {engine.rank}: {reason}", {}, {}), t, "checkpoint")
    errors = gather_objects(engine.comm, [], t, "checkpoint commit")[0]   # rank 0's: all of them
    raise CheckpointError(f"checkpoint of iteration t={t} not written: {'; '.join(errors)}")


def engine_of(target) -> SyncEngine:
    """The engine of ``target``: a :class:`launch.engine.core.SyncEngine`, or a door that holds
    one as ``.engine`` (:class:`launch.Simulation`, :class:`launch.AgentOptimizer`)."""
    return target if isinstance(target, SyncEngine) else target.engine
