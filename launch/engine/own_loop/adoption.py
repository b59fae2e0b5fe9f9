"""What :class:`launch.AgentOptimizer` checks and builds before it adopts the user's model.

**Refusals** (:func:`adoption_problem`): each names what would be silently wrong otherwise.

- a model wrapped in (or containing) ``DistributedDataParallel``: every backward would all-reduce
  the gradients over the ranks, so local SGD silently becomes synchronous SGD and Lookahead's
  slow ranks would be waited for at every step; its comm hooks (PostLocalSGD, ...) would run on
  top of the agents' syncs;
- a ``ZeroRedundancyOptimizer``: after each step every rank broadcasts its shard of the
  parameters, overwriting the other agents' values;
- parameters of mixed dtypes or devices (the agents live in one flat buffer);
- an optimizer holding a tensor that is not a parameter of the model (it could not be named,
  saved or evaluated with the model).

Each rank checks its own model and optimizer (no communication); the engine's start-up agreement
(:func:`launch.engine.core.agree`) exchanges the verdicts so that every rank raises the same
``ValueError``.

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

import torch
from torch import nn


def _is_ddp(module: nn.Module) -> bool:
    return isinstance(module, nn.parallel.DistributedDataParallel)


def _is_zero(optimizer) -> bool:
    # By name along the MRO: importing torch.distributed.optim is not needed to recognise it.
    return any(cls.__name__ == "ZeroRedundancyOptimizer" for cls in type(optimizer).__mro__)


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors of every parameter group, in order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def ddp_problem(model: nn.Module) -> str | None:
    """Why ``model`` (wrapped in, or containing, DistributedDataParallel) cannot be an agent's."""
    wrapped = [(name, m) for name, m in model.named_modules() if _is_ddp(m)]
    if wrapped:
        name, ddp = wrapped[0]
        hooks = bool(getattr(ddp, "_comm_hooks", None))
        where = "model is" if not name else f"its submodule {name!r} is"
        return (
            f"model must not be wrapped in DistributedDataParallel ({where} a DistributedDataParallel"
            f"{', with DDP comm hooks' if hooks else ''}): each backward would all-reduce the "
            f"gradients over the ranks, so the agents would silently train as synchronous SGD"
            f"{' and the comm hooks would run on top of the syncs' if hooks else ''}; pass the plain "
            f"module (model.module) and let the schedule do the communication")
    return None


def adoption_problem(model, optimizer) -> str | None:
    """Why this rank's ``model`` and ``optimizer`` cannot be adopted (a message), or None."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        return (f"optimizer must be a torch.optim.Optimizer built on the model's parameters; "
                f"got {type(optimizer).__name__}")
    if not isinstance(model, nn.Module):
        return f"model must be the torch.nn.Module that optimizer trains; got {type(model).__name__}"
    ddp = ddp_problem(model)
    if ddp is not None:
        return ddp
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
