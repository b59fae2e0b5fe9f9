"""What :class:`launch.AgentOptimizer` checks and builds before it adopts the user's model.

**Refusals** (:func:`adoption_problem`): each names what would be silently wrong otherwise.

- a model wrapped in (or containing) ``DistributedDataParallel``: every backward would all-reduce
  the gradients over the ranks, so local SGD silently becomes synchronous SGD and Lookahead's
  slow ranks would be waited for at every step; its comm hooks (PostLocalSGD, ...) would run on
  top of the agents' syncs;
- a model sharded by FSDP: ``FullyShardedDataParallel`` (FSDP1, its flat parameters) or
  ``fully_shard`` (FSDP2, an ``FSDPModule`` whose parameters are DTensors), and any DTensor
  parameter (tensor parallelism): each rank would hold a shard of one model that every forward
  gathers and every backward reduce-scatters over the ranks -- one synchronous model, not agents
  (FSDP1's construction even copies rank 0's values over the other ranks' shards);
- a ``ZeroRedundancyOptimizer``: after each step every rank broadcasts its shard of the
  parameters, overwriting the other agents' values;
- parameters of mixed dtypes or devices (the agents live in one flat buffer);
- an optimizer holding a tensor that is not a parameter of the model (it could not be named,
  saved or evaluated with the model).

Each rank checks its own model and optimizer (no communication); the engine's start-up agreement
(:func:`launch.engine.core.agree`) exchanges the verdicts so that every rank raises the same
``ValueError``.

**A DistributedDataParallel wrapper used behind the optimizer's back** (:class:`DDPForwardWatch`):
``model=ddp.module`` passes the checks above, but a loop that calls ``ddp(x)`` all-reduces every
gradient.  DDP runs its module's forward inside ``DistributedDataParallel._inside_ddp_forward``,
which sets the class attribute ``_active_ddp_module`` to the wrapper for the duration; a forward
pre-hook on the adopted model reads it, so the watch knows, at the first ``step()``, every wrapper
whose forward ran the model, and the ranks of its process group.  (Two DDP paths do not go
through that context, and are not seen: the compiled-autograd "python reducer" and a model whose
every parameter is excluded from DDP's all-reduce -- the second all-reduces nothing.)

**The adopted parameters** (:func:`adopted_parameters`): the model's parameters that the inner
optimizer holds, in the model's order, registered (the same objects, not copies) in a container
module that the engine flattens in place.  Parameters the optimizer does not hold (frozen layers
left out of it) are not the agents': they keep each rank's own values, as with the serial
reference (its slow weights are the optimizer's parameters).

**A copy of the inner optimizer** (:func:`optimizer_factory`): the engine probes the inner
optimizer's mixable state (``state_policy="pullback"``) and slow rules check it, by stepping a
throwaway copy; the copy is the user's optimizer deep-copied with its parameters mapped to the
probe's, so any optimizer class works, whatever its constructor's arguments.
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn


def _is_ddp(module: nn.Module) -> bool:
    return isinstance(module, nn.parallel.DistributedDataParallel)


def _class_names(obj) -> set[str]:
    # By name along the MRO: importing torch.distributed.optim / .fsdp / .tensor is not needed to
    # recognise their classes.
    return {cls.__name__ for cls in type(obj).__mro__}


def _is_zero(optimizer) -> bool:
    return "ZeroRedundancyOptimizer" in _class_names(optimizer)


def _where(name: str) -> str:
    return "model is" if not name else f"its submodule {name!r} is"


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors of every parameter group, in order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def ddp_problem(model: nn.Module) -> str | None:
    """Why ``model`` (wrapped in, or containing, DistributedDataParallel) cannot be an agent's."""
    wrapped = [(name, m) for name, m in model.named_modules() if _is_ddp(m)]
    if wrapped:
        name, ddp = wrapped[0]
        hooks = bool(getattr(ddp, "_comm_hooks", None))
        return (
            f"model must not be wrapped in DistributedDataParallel ({_where(name)} a DistributedDataParallel"
            f"{', with DDP comm hooks' if hooks else ''}): each backward would all-reduce the "
            f"gradients over the ranks, so the agents would silently train as synchronous SGD"
            f"{' and the comm hooks would run on top of the syncs' if hooks else ''}; pass the plain "
            f"module (model.module) and let the schedule do the communication")
    return None


def ddp_ranks(ddp: nn.Module) -> tuple[int, ...]:
    """The global ranks of a DistributedDataParallel wrapper's process group, in increasing order."""
    import torch.distributed as dist

    return tuple(sorted(dist.get_process_group_ranks(ddp.process_group)))


class DDPForwardWatch:
    """The DistributedDataParallel wrappers whose forward ran ``model`` (module docstring).

    Built on the adopted model when the optimizer adopts it: a forward pre-hook that reads
    ``DistributedDataParallel._active_ddp_module`` (a class attribute lookup per forward) and
    records every wrapper it finds, with the ranks of its process group (:attr:`seen`).  Read it
    with :meth:`problem` at the first ``step()`` (the first forward has run by then), exchange the
    verdicts so that every rank raises the same error, then :meth:`remove` it.
    """

    def __init__(self, model: nn.Module):
        #: (weak reference to the wrapper, the global ranks of its process group), in order seen.
        self.seen: list[tuple[weakref.ref, tuple[int, ...]]] = []
        self._handle = model.register_forward_pre_hook(self._on_forward)

    def _on_forward(self, module: nn.Module, args) -> None:
        ddp = getattr(nn.parallel.DistributedDataParallel, "_active_ddp_module", None)
        if ddp is not None and not any(ref() is ddp for ref, _ in self.seen):
            self.seen.append((weakref.ref(ddp), ddp_ranks(ddp)))

    def problem(self, agent_ranks: tuple[int, ...] | None = None) -> str | None:
        """Why the run cannot go on (a message), or None: no wrapper ran the model, or every one
        spans exactly ``agent_ranks`` (the global ranks of this rank's agent, in increasing order:
        DDP then all-reduces each agent's gradients inside the agent, which is data parallelism
        inside an agent; None: one agent per rank, no wrapper allowed)."""
        foreign = [ranks for _, ranks in self.seen if ranks != agent_ranks]
        if not foreign:
            return None
        span = ("this rank's agent is this rank alone" if agent_ranks is None
                else f"this rank's agent spans ranks {list(agent_ranks)}")
        return (f"the model was run through a DistributedDataParallel wrapper over ranks {list(foreign[0])} "
                f"before the first step(), but {span}: its backward all-reduced the gradients over those "
                f"ranks, so the agents would silently train as synchronous SGD; call the module passed as "
                f"model (ddp.module) in the training loop, not the wrapper")

    def remove(self) -> None:
        """Stop watching (remove the forward pre-hook)."""
        self._handle.remove()


#: What to do instead of sharding, in every sharding refusal.
_UNSHARDED = ("pass the plain, unsharded module (every agent holds whole parameters in one flat buffer) and "
              "let the schedule do the communication; FSDP inside an agent is not supported yet")


def sharding_problem(model: nn.Module, optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``model`` (sharded by FSDP1 or FSDP2, or with DTensor parameters) cannot be an agent's."""
    for name, module in model.named_modules():
        names = _class_names(module)
        if "FullyShardedDataParallel" in names:
            return (f"model must not be wrapped in FullyShardedDataParallel ({_where(name)} a FullyShardedDataParallel, "
                    f"whose flat parameters hold this rank's shard): every forward gathers the parameters and "
                    f"every backward reduce-scatters the gradients over the ranks, so the agents would silently "
                    f"train one synchronous model; {_UNSHARDED}")
        if "FSDPModule" in names:
            return (f"model must not be sharded with fully_shard (FSDP2; {_where(name)} an FSDPModule, its "
                    f"parameters DTensors sharded over the ranks): every forward gathers the parameters and every "
                    f"backward reduce-scatters the gradients, so the agents would silently train one synchronous "
                    f"model; {_UNSHARDED}")
    named = list(model.named_parameters()) + [(f"optimizer parameter {i}", p)
                                                for i, p in enumerate(optimizer_parameters(optimizer))]
    for name, p in named:
        if getattr(p, "_is_flat_param", False):
            return (f"the parameters must not be FSDP flat parameters ({name} is a FlatParameter of "
                    f"FullyShardedDataParallel, this rank's shard of the model); {_UNSHARDED}")
        if "DTensor" in _class_names(p):
            return (f"the parameters must be plain tensors, not DTensors ({name} is a DTensor, sharded or "
                    f"replicated over a device mesh, as fully_shard or tensor parallelism make them); {_UNSHARDED}")
    return None


#: The inner optimizers an open AgentOptimizer holds (released by its close()): one optimizer's
#: parameters can be views into one agent's buffer only.
ADOPTED: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()


def adoption_problem(model, optimizer) -> str | None:
    """Why this rank's ``model`` and ``optimizer`` cannot be adopted (a message), or None."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        return (f"optimizer must be a torch.optim.Optimizer built on the model's parameters; "
                f"got {type(optimizer).__name__}")
    if optimizer in ADOPTED:
        return ("optimizer is already wrapped by another AgentOptimizer that is not closed (its parameters are "
                "views into that one's agent): close() it first, or build a new inner optimizer for this one")
    if not isinstance(model, nn.Module):
        return f"model must be the torch.nn.Module that optimizer trains; got {type(model).__name__}"
    wrapped = ddp_problem(model) or sharding_problem(model, optimizer)
    if wrapped is not None:
        return wrapped
    if _is_zero(optimizer):
        return ("optimizer must not be a ZeroRedundancyOptimizer: after each step it broadcasts every "
                "rank's shard of the parameters, overwriting the other agents' values; pass the plain "
                "inner optimizer (each agent keeps its whole state)")
    params = optimizer_parameters(optimizer)
    if not params:
        return "optimizer holds no parameters"
    owned = {id(p) for p in model.parameters()}
    stray = [i for i, p in enumerate(params) if id(p) not in owned]
    if stray:
        return (f"optimizer holds tensor(s) that are not parameters of model (positions {stray[:5]} in "
                f"its parameter groups): register them in the module")
    dtypes = sorted({str(p.dtype) for p in params})
    devices = sorted({str(p.device) for p in params})
    if len(dtypes) > 1 or len(devices) > 1:
        return (f"the parameters must share one dtype and one device (every agent lives in one flat "
                f"buffer); got dtypes {dtypes} and devices {devices}: convert the model first, e.g. "
                f"model.to(torch.float32)")
    if not params[0].is_floating_point():
        return f"the parameters must be floating point; got {params[0].dtype}"
    return None


class _Adopted(nn.Module):
    """A container of the adopted parameters (the user's objects, registered, not copied)."""


def adopted_parameters(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, list[str]]:
    """The container module of the adopted parameters and their names in ``model``."""
    held = {id(p) for p in optimizer_parameters(optimizer)}
    container, names = _Adopted(), []
    for name, p in model.named_parameters():
        if id(p) in held:
            container.register_parameter(f"p{len(names)}", p)
            names.append(name)
    return container, names


def optimizer_factory(optimizer: torch.optim.Optimizer, container: nn.Module):
    """``params -> a copy of optimizer`` on ``params`` (given in ``container``'s order).

    Every attribute is deep-copied with the container's parameters mapped to ``params``
    (parameter groups, state keyed by parameter, cached parameter lists as LBFGS keeps): the copy
    steps like the original and shares nothing with it."""
    originals = list(container.parameters())

    def build(params: list) -> torch.optim.Optimizer:
        memo = {id(p): q for p, q in zip(originals, params)}
        clone = type(optimizer).__new__(type(optimizer))
        try:
            # Not an LR scheduler's patched ``step`` (it would step the original).
            attributes = {k: v for k, v in optimizer.__dict__.items() if k not in ("step", "_opt_called")}
            clone.__dict__.update(copy.deepcopy(attributes, memo))
        except Exception as err:  # noqa: BLE001 - any failure: the copy is impossible
            raise ValueError(
                f"the inner optimizer ({type(optimizer).__name__}) cannot be copied to probe its state "
                f"(state_policy='pullback' and slow rules need it): {err}") from err
        return clone

    return build
