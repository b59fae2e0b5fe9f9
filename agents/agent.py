"""One agent of the model: a column x_i of X, its role, and its inner-optimizer state.

A *worker* owns a copy of the user's module whose parameters are views into the agent's flat
buffer, an inner optimizer (any ``torch.optim.Optimizer``) and a data stream; one inner step is
``zero_grad; loss_fn(module, batch).backward(); optimizer.step()``.  An *adopted* worker
(``adopt=True``, :class:`launch.AgentOptimizer`) is the caller's own module and optimizer instead:
their parameter objects stay the caller's and become views into the agent's flat buffer in place,
and the caller's loop takes the inner steps.  A *passive* agent has f_i = 0:
it only holds a buffer (slow weights) and, under ``pullback``, a cached copy of the inner state.

The agent does not know where it runs; the launcher mixes the tensor returned by
:meth:`Agent.sync_tensor` according to the plan of P_t and then calls :meth:`Agent.after_sync`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from agents.flat import FlatBuffer, aligned_offsets, cpu_copy, flatten_module_
from agents.state_policy import mixable_state_keys, reset_state_, validate_policy

OptimizerFactory = Callable[[list], torch.optim.Optimizer]
LossFn = Callable[[nn.Module, object], torch.Tensor]


@dataclass(frozen=True)
class StateSlot:
    """Mixable state tensor ``key`` of parameter ``param_index`` lives at ``offset`` in the slots."""

    param_index: int
    key: str
    offset: int
    numel: int
    shape: torch.Size


@dataclass(frozen=True)
class StateLayout:
    """Where every mixable state tensor of the inner optimizer lives in an agent's state slots
    (each slot aligned as the parameters are: :mod:`agents.flat`); ``numel``: the slots' extent."""

    slots: tuple[StateSlot, ...]
    numel: int

    @classmethod
    def empty(cls) -> "StateLayout":
        return cls((), 0)


def probe_state_layout(module: nn.Module, optimizer: OptimizerFactory) -> StateLayout:
    """Discover the inner optimizer's mixable state by one step on a throwaway copy of ``module``.

    Every rank does this locally and deterministically (no communication), so passive agents know
    the layout of the state they cache without ever running the optimizer.
    """
    probe = copy.deepcopy(module)
    params = list(probe.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = optimizer(params)
    opt.step()
    mixable = [(index, key, p) for index, p in enumerate(params) for key in mixable_state_keys(opt.state.get(p, {}), p)]
    offsets, end = aligned_offsets([p.numel() for _, _, p in mixable], params[0].element_size())
    slots = tuple(StateSlot(index, key, offset, p.numel(), p.shape) for (index, key, p), offset in zip(mixable, offsets))
    return StateLayout(slots, end)


class Agent:
    """Agent ``index``: its flat buffer and, for a worker, its module, optimizer and data stream.

    Args:
        index: the agent's column in X.
        module: the user's module; the agent works on its own deep copy (the caller's module is
            never modified), except with ``adopt``.  Passive agents use it for shapes and initial
            values only.
        worker: whether this agent runs the inner optimizer.
        optimizer: factory ``params -> torch.optim.Optimizer`` (workers); with ``adopt``, the
            caller's optimizer itself, built on ``module``'s parameters.
        data: the worker's iterator of batches (None for an adopted worker: the caller's loop
            owns the data).
        state_policy: ``maintain``, ``reset`` or ``pullback`` (see :mod:`agents.state_policy`).
        layout: the mixable-state layout (``pullback`` only; see :func:`probe_state_layout`).
        push_sum: the agent carries a push-sum weight w (1 at the start) in one extra entry at the
            end of its flat buffer, mixed with the parameters; the buffer then holds the numerator
            x and the agent's model is z = x / w (see :mod:`topology.decentralized`).
        adopt: a worker that *is* ``module`` and ``optimizer`` (no copy): ``module``'s parameters
            are moved into the flat buffer in place (:func:`agents.flat.flatten_module_`: the
            parameter objects, and so the optimizer's references and state, are kept).
    """

    def __init__(
        self,
        index: int,
        module: nn.Module,
        *,
        worker: bool,
        optimizer: OptimizerFactory | None = None,
        data: Iterator | None = None,
        state_policy: str = "maintain",
        layout: StateLayout | None = None,
        push_sum: bool = False,
        adopt: bool = False,
    ):
        self.index = index
        self.is_worker = worker
        self.state_policy = validate_policy(state_policy)
        self.layout = layout if (layout is not None and state_policy == "pullback") else StateLayout.empty()
        self.data = data
        self.steps = 0
        extra = self.layout.numel + (1 if push_sum else 0)
        if worker:
            self.module = module if adopt else copy.deepcopy(module)
            self.flat: FlatBuffer = flatten_module_(self.module, extra)
            self.parameters = list(self.module.parameters())
            self.optimizer = optimizer if adopt else optimizer(self.parameters)
        else:
            self.module = None
            self.optimizer = None
            params = list(module.parameters())
            self.flat = FlatBuffer([p.shape for p in params], params[0].dtype, params[0].device, extra)
            self.parameters = self.flat.views()
            with torch.no_grad():
                for view, p in zip(self.parameters, params):
                    view.copy_(p)
        #: The push-sum weight w (a 1-element view of the buffer's last entry), or None.
        self.push_weight = self.flat.buffer[-1:].fill_(1.0) if push_sum else None
        self._numerator = None

    # -- the inner step ---------------------------------------------------------------------
    def inner_step(self, loss_fn: LossFn) -> torch.Tensor:
        """One step of the inner optimizer on the next batch; returns the (detached) loss.

        The loss is evaluated at the agent's current parameters x_t, before the update.  Under
        push-sum (SGP, Assran et al. 2019) the gradient and loss are evaluated at the de-biased
        z = x / w and the optimizer's update is applied to the numerator x.
        """
        if not self.is_worker:
            raise RuntimeError(f"agent {self.index} is passive and takes no inner step")
        try:
            batch = next(self.data)
        except StopIteration:
            raise RuntimeError(f"the data of agent {self.index} ran out after {self.steps} batches") from None
        self.optimizer.zero_grad(set_to_none=True)
        self.show_debiased_()                    # push-sum: the module now holds z = x / w
        loss = loss_fn(self.module, batch)
        loss.backward()                          # grad f_i(z) under push-sum
        self.restore_numerator_()
        self.optimizer.step()
        self.steps += 1
        return loss.detach()

    @torch.no_grad()
    def show_debiased_(self) -> None:
        """Push-sum only (else nothing): keep the numerator x aside and put z = x / w in the
        parameters, where the forward and backward passes read them."""
        if self.push_weight is None:
            return
        x = self.flat.params
        if self._numerator is None:
            self._numerator = torch.empty_like(x)
        self._numerator.copy_(x)
        x.div_(self.push_weight)

    @torch.no_grad()
    def restore_numerator_(self) -> None:
        """Undo :meth:`show_debiased_`: x exactly as it was (a copy, no x / w * w rounding)."""
        if self.push_weight is not None:
            self.flat.params.copy_(self._numerator)

    # -- the sync -----------------------------------------------------------------------------
    def sync_tensor(self) -> torch.Tensor:
        """The flat tensor that a sync mixes: parameters, plus the state slots under ``pullback``.

        Under ``pullback`` a worker's live optimizer state is first bound to views into the state
        slots (copying it there the first time, or after the optimizer replaced its tensors, e.g.
        in ``load_state_dict``), so that mixing the buffer mixes the live state in place.
        """
        if self.layout.numel and self.is_worker:
            self._bind_state_to_slots()
        return self.flat.buffer

    def after_sync(self, reset: bool | None = None) -> None:
        """Apply the state policy's post-sync action (``reset`` zeroes a worker's state).

        ``reset`` overrides the agent's policy for this sync (per-level policies decide it per
        sync: :class:`launch.engine.sync.state_weights.SyncPolicy`).
        """
        if (self.state_policy == "reset" if reset is None else reset) and self.is_worker:
            reset_state_(self.optimizer.state.values())

    def _bind_state_to_slots(self) -> None:
        state = self.optimizer.state
        slots = self.flat.state
        for slot in self.layout.slots:
            p = self.parameters[slot.param_index]
            live = state.get(p, {}).get(slot.key)
            view = slots[slot.offset : slot.offset + slot.numel].view(slot.shape)
            if live is None:
                # No state yet (the parameter never had a gradient): the slot holds what the
                # sync gives it, and becomes the state once the optimizer creates it.
                continue
            if live.data_ptr() != view.data_ptr():
                view.copy_(live)
                state[p][slot.key] = view

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything that determines this agent's future, as CPU copies (never live references).

        ``buffer``: the whole flat buffer (parameters and, under ``pullback``, the state slots);
        ``steps``: inner steps taken = batches consumed from the data stream; for a worker also
        ``optimizer`` (the inner optimizer's ``state_dict``) and ``data`` (the stream's
        ``state_dict()`` when it has one, else None).
        """
        entry = {"index": self.index, "worker": self.is_worker, "steps": self.steps,
                 "buffer": self.flat.buffer.detach().to("cpu", copy=True)}
        if self.is_worker:
            entry["optimizer"] = cpu_copy(self.optimizer.state_dict())
            entry["data"] = cpu_copy(self.data.state_dict()) if hasattr(self.data, "state_dict") else None
        return entry

    def load_state_dict(self, entry: dict) -> None:
        """Restore :meth:`state_dict` into this (fresh) agent.

        The data position is restored through the stream's ``load_state_dict`` when it has one
        and the checkpoint holds its state; otherwise ``entry["steps"]`` batches are drawn from
        the (freshly created) stream and discarded.
        """
        if entry["index"] != self.index or entry["worker"] != self.is_worker:
            raise ValueError(f"checkpoint entry of agent {entry['index']} does not fit agent {self.index}")
        if entry["buffer"].shape != self.flat.buffer.shape or entry["buffer"].dtype != self.flat.buffer.dtype:
            raise ValueError(
                f"checkpoint of agent {self.index} holds a flat buffer of {entry['buffer'].numel()} "
                f"{entry['buffer'].dtype} entries; this agent has {self.flat.buffer.numel()} "
                f"{self.flat.buffer.dtype} (same model, dtype and state_policy are required)"
            )
        with torch.no_grad():
            self.flat.buffer.copy_(entry["buffer"])
        if self.is_worker:
            self.optimizer.load_state_dict(entry["optimizer"])
            if self.layout.numel:  # the live state becomes views into the slots again, as before
                self._bind_state_to_slots()
            if self.data is None:
                pass                             # an adopted worker: the caller's loop owns the data
            elif entry.get("data") is not None and hasattr(self.data, "load_state_dict"):
                self.data.load_state_dict(entry["data"])
            else:
                for consumed in range(entry["steps"]):
                    try:
                        next(self.data)
                    except StopIteration:
                        raise ValueError(
                            f"the data of agent {self.index} ran out after {consumed} batches while "
                            f"skipping the {entry['steps']} batches the checkpoint had consumed"
                        ) from None
        self.steps = entry["steps"]

    # -- reading the agent ----------------------------------------------------------------------
    @property
    def params(self) -> torch.Tensor:
        """The flat parameter vector x_i in the buffer's layout (a view: it changes as the agent
        changes): each parameter aligned, zero padding between them (:mod:`agents.flat`;
        ``self.flat.pack(x)`` drops it)."""
        return self.flat.params

    def debiased(self) -> torch.Tensor:
        """The agent's model as a flat vector in the buffer's layout: x_i / w_i under push-sum (a
        new tensor; the padding stays 0), else x_i (a view)."""
        if self.push_weight is None:
            return self.flat.params
        return self.flat.params / self.push_weight
