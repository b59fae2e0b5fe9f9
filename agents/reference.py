"""Serial reference optimizers: Lookahead and Multilayer Lookahead, straight from the papers.

These are ordinary :class:`torch.optim.Optimizer` wrappers, written for clarity, not speed.  They
are the oracle that the multi-agent simulator is compared with (README, "Design"), so every step
is stated exactly here and implemented in exactly that form.

References:
    - M. R. Zhang, J. Lucas, G. Hinton, J. Ba. *Lookahead Optimizer: k steps forward, 1 step
      back.* NeurIPS 2019, arXiv:1907.08610 (Algorithm 1; App. D.1 for the state policies).
    - D. Pushkin, L. Barba. *Multilayer Lookahead: a Nested Version of Lookahead.*
      arXiv:2110.14254 (Algorithm 2, generalized here from two levels to n).
    - J. Wang, V. Tantia, N. Ballas, M. Rabbat. *Lookahead converges to stationary points of
      smooth non-convex functions.* ICASSP 2020 (the multi-agent view, the virtual iterate).

Conventions (where the public implementations disagree, this is what we do and why): slow weights
start at theta_0, *copied* at construction (one public version starts them at 0); the first sync
comes after exactly k inner steps (others use k + 1 or 2k); slow weights and the step counter are
saved in ``state_dict``, keyed by parameter index (not ``id()``, which changes across processes);
``param_groups`` is the inner optimizer's own list, also after ``load_state_dict``, so LR
schedulers keep working; ``defaults`` and the optimizer hook dicts are set.

Indexing: level 1 is the *innermost* slow weights, synchronized every ``ks[0]`` inner steps, as
``alpha_1, k_1`` in Pushkin & Barba's Algorithm 2 (their prose calls level 1 the "outer"
weights; we follow the algorithm, where level 1 is the one synced most often).

The whole update, for levels ``l = 1..n`` with slow weights ``slow_l`` and fast (live) weights
``slow_0 = x``::

    x <- A(x)                                   # one inner step; the counter t += 1
    L = max{l : t % (k_1 * ... * k_l) == 0}     # 0 if none
    for l = 1..L:                               # only when L > 0
        slow_l <- slow_l + alpha_l * (slow_{l-1} - slow_l)
    slow_{L-1}, ..., slow_1, x <- slow_L        # copies

(With one level this is Zhang et al.'s ``phi <- phi + alpha * (theta - phi); theta <- phi``.)

Example (one level, a constant gradient of 1, lr 0.5, so each inner step subtracts 0.5)::

    >>> import torch
    >>> from agents.reference import Lookahead
    >>> w = torch.nn.Parameter(torch.zeros(1))
    >>> la = Lookahead(torch.optim.SGD([w], lr=0.5), k=2, alpha=0.5)
    >>> for _ in range(2):
    ...     la.zero_grad()
    ...     w.sum().backward()
    ...     _ = la.step()
    >>> w.item(), la.slow_params(1)[0].item()   # fast reached -1.0, then both moved to -0.5
    (-0.5, -0.5)
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections import OrderedDict
from typing import Any, Callable, Iterator, Sequence

import torch

from agents.level_policy import any_pullback, resolve_policy, run_state_chain_, state_weights
from agents.state_policy import mixable_state_keys, reset_state_
from topology.checks import check_integer
from topology.validation import check_alpha, check_levels, check_period

__all__ = ["MultilayerLookahead", "Lookahead"]


# --------------------------------------------------------------------------- validation


# Validation is topology.validation's (one definition of what a period and a step size are).


# --------------------------------------------------------------------------- arithmetic


@torch.no_grad()
def mix_chain_(chain: list[list[torch.Tensor]], alphas: Sequence[float]) -> None:
    """The synchronization of levels ``1..L``, in place, for ``L = len(chain) - 1``.

    ``chain[0]`` are the live tensors (fast weights, or live optimizer state), ``chain[l]`` the
    copies held by level ``l``; ``alphas[l - 1]`` is ``alpha_l``.  Computes::

        for l = 1..L:  chain[l] <- chain[l] + alpha_l * (chain[l-1] - chain[l])
        chain[L-1], ..., chain[0] <- copies of chain[L]

    as three separately rounded elementwise ops per level, ``d = chain[l-1] - chain[l]``,
    ``d = alpha_l * d``, ``chain[l] = chain[l] + d`` (no fused multiply-add, which
    ``add_(.., alpha=)`` may use on some kernels), so any implementation that writes the same
    three ops reproduces these values bit for bit.
    """
    if not chain[0]:
        return
    for level in range(1, len(chain)):
        if level == 1:
            # chain[0] is overwritten by the copies below and read by no other level, so level
            # 1's difference is formed in its storage (the same op, x - y: no allocation).
            torch._foreach_sub_(chain[0], chain[1])
            delta = chain[0]
        else:
            delta = torch._foreach_sub(chain[level - 1], chain[level])
        torch._foreach_mul_(delta, alphas[level - 1])
        torch._foreach_add_(chain[level], delta)
    for level in range(len(chain) - 1):
        torch._foreach_copy_(chain[level], chain[-1])


def init_optimizer_hooks(wrapper: torch.optim.Optimizer) -> None:
    """The hook dicts that ``torch.optim.Optimizer.__init__`` sets, for wrappers that do not call
    it (it would build new ``param_groups``)."""
    for name in ("step_pre", "step_post", "state_dict_pre", "state_dict_post", "load_state_dict_pre",
                 "load_state_dict_post"):
        setattr(wrapper, f"_optimizer_{name}_hooks", OrderedDict())


def _policy_value(policy, depth: int):
    """``policy`` validated for ``depth`` levels, in a form that state_dict can save (a str,
    or a list of per-level policies)."""
    levels = resolve_policy(policy, depth)
    return policy if isinstance(policy, str) else list(levels)


def _copy_of(src: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A new tensor (never a view of ``src``) with ``src``'s values and ``like``'s dtype/device."""
    if src.shape != like.shape:
        raise ValueError(f"shape mismatch: saved {tuple(src.shape)}, parameter {tuple(like.shape)}")
    return src.detach().to(device=like.device, dtype=like.dtype, copy=True)


# --------------------------------------------------------------------------- optimizers


class MultilayerLookahead(torch.optim.Optimizer):
    r"""Multilayer Lookahead (LA-n): n nested levels of slow weights around an inner optimizer.

    Pushkin & Barba's Algorithm 2, generalized to ``n = len(ks)`` levels; level 1 is the
    innermost.  ``Lookahead`` is the case ``n = 1`` (Zhang et al. 2019, arXiv:1907.08610).

    Semantics (the conventions of the module docstring):

    * At construction every level's slow weights are *copies* of the parameters (theta_0) and
      the step counter is 0.
    * Every call of :meth:`step` counts: it runs ``loss = optimizer.step(closure)`` and
      increments the counter ``t``.  Let ``L`` be the largest ``l`` with
      ``t % (ks[0] * ... * ks[l-1]) == 0`` (0 if none).  If ``L > 0``, for ``l = 1..L`` in
      order::

          slow_l <- slow_l + alpha_l * (slow_{l-1} - slow_l)     # slow_0 = the parameters

      computed as ``d = slow_{l-1} - slow_l; d = alpha_l * d; slow_l = slow_l + d`` (each op
      separately rounded), then ``slow_{L-1}, ..., slow_1`` and the parameters are set to
      copies of ``slow_L``.  The first sync is after exactly ``ks[0]`` inner steps; level ``l``
      syncs every ``ks[0] * ... * ks[l-1]`` steps.  ``step`` returns ``loss``.
    * ``state_policy`` (see :mod:`agents.state_policy`), applied at every sync (``L > 0``),
      after the parameter update:

      - ``"maintain"``: the inner optimizer's state is left alone;
      - ``"reset"``: every tensor of every per-parameter state dict is zeroed in place
        (for Adam that is a fresh state, ``step = 0``);
      - ``"pullback"``: every level holds a copy of each parameter's mixable state tensors
        (:func:`~agents.state_policy.mixable_state_keys`), zero at the start (allocated at the
        first sync that sees the key), and they are mixed exactly like the parameters, with the
        live state as level 0: ``cache_l <- cache_l + alpha_l * (cache_{l-1} - cache_l)`` for
        ``l = 1..L``, then the live state and ``cache_{L-1} .. cache_1`` are set to copies of
        ``cache_L``.  Non-mixable state (Adam's ``step``) is kept.

    ``param_groups`` *is* the inner optimizer's list (always, also after
    :meth:`load_state_dict`), so LR schedulers built on this object drive the inner optimizer,
    and ``state`` is the inner optimizer's per-parameter state.

    Args:
        optimizer: the inner optimizer A (any :class:`torch.optim.Optimizer`).
        ks: ``(k_1, ..., k_n)``, ints >= 1; level ``l`` syncs every ``k_1 * ... * k_l`` steps.
        alphas: ``(alpha_1, ..., alpha_n)``, finite reals in (0, 1].
        state_policy: ``"maintain"`` (default), ``"reset"`` or ``"pullback"`` at every level, or
            one policy per level (nested Lookahead's ``"reset_inner"``, ``"pullback_outer"``, ...,
            a sequence level 1 first, or a mapping ``{level: policy}``): see
            :mod:`agents.level_policy` for the per-level semantics, which reduce to the above
            when every level has the same policy.

    Raises:
        TypeError: ``optimizer`` is not a :class:`torch.optim.Optimizer`.
        ValueError: a bad ``ks``, ``alphas`` (including different lengths) or ``state_policy``;
            the message names the argument.

    Example (two levels: a level-1 sync after steps 2, 6, ..., both levels after 4, 8, ...)::

        >>> import torch
        >>> from agents.reference import MultilayerLookahead
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = MultilayerLookahead(torch.optim.SGD(model.parameters(), lr=0.1),
        ...                           ks=(2, 2), alphas=(0.5, 0.5))
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> for _ in range(4):
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     _ = opt.step()
        >>> opt.step_count
        4
        >>> all(torch.equal(p, s) for p, s in zip(model.parameters(), opt.slow_params(2)))
        True
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        ks: Sequence[int],
        alphas: Sequence[float],
        state_policy: str = "maintain",
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}"
            )
        ks_, alphas_ = check_levels(ks, alphas)
        policy = _policy_value(state_policy, len(ks_))
        self.optimizer = optimizer
        self._set_hyperparameters(ks_, alphas_, policy)
        # What torch.optim.Optimizer.__init__ sets, except param_groups/state (properties that
        # delegate to the inner optimizer).  We do not call it: it would build new groups.
        init_optimizer_hooks(self)
        self._patch_step_function()  # profiling + step hooks; sets _zero_grad_profile_name
        self._warned_capturable_if_run_uncaptured = True

        self._step_count = 0
        params = self._params()
        with torch.no_grad():
            # _slow[l - 1][i]: level l's copy of parameter i (theta_0 at construction).
            self._slow: list[list[torch.Tensor]] = [
                [p.detach().clone() for p in params] for _ in ks_
            ]
        # _cache[l - 1][i]: level l's pullback copy of parameter i's mixable state, by key.
        self._cache: list[list[dict[str, torch.Tensor]]] = [[{} for _ in params] for _ in ks_]

    # ----------------------------------------------------------------- torch.optim plumbing

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The inner optimizer's own ``param_groups`` list (the same object)."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The inner optimizer's per-parameter state (the same object)."""
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    def __getstate__(self) -> dict[str, Any]:
        # Everything but the hooks (torch.optim.Optimizer drops them too; __setstate__ re-adds).
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_")}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(ks={self._ks}, alphas={self._alphas}, "
            f"state_policy={self._policy!r},\n  optimizer={self.optimizer!r})"
        )

    def _set_hyperparameters(
        self, ks: tuple[int, ...], alphas: tuple[float, ...], policy: str
    ) -> None:
        self._ks, self._alphas, self._policy = ks, alphas, policy
        # Per-level policies (agents.level_policy); a single policy applies to every level.
        self._level_policies = resolve_policy(policy, len(ks))
        # Level l (1-based) syncs when the counter is a multiple of _periods[l - 1].
        self._periods = tuple(math.prod(ks[: l + 1]) for l in range(len(ks)))
        self.defaults = {
            **self.optimizer.defaults,
            "ks": ks,
            "alphas": alphas,
            "state_policy": policy,
        }

    def _params(self) -> list[torch.Tensor]:
        """All parameters in the flattened ``param_groups`` order; index i is parameter i."""
        return [p for group in self.param_groups for p in group["params"]]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer; every level's slow weights start at the new
        parameters' current values (their theta_0), pullback caches at zero."""
        n_before = len(self._params())
        self.optimizer.add_param_group(param_group)
        new = self._params()[n_before:]
        with torch.no_grad():
            for slow, cache in zip(self._slow, self._cache):
                slow.extend(p.detach().clone() for p in new)
                cache.extend({} for _ in new)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Delegates to the inner optimizer's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # ----------------------------------------------------------------- read-only views

    @property
    def ks(self) -> tuple[int, ...]:
        return self._ks

    @property
    def alphas(self) -> tuple[float, ...]:
        return self._alphas

    @property
    def state_policy(self) -> str:
        return self._policy

    @property
    def num_levels(self) -> int:
        return len(self._ks)

    @property
    def step_count(self) -> int:
        """The number of :meth:`step` calls so far (restored by :meth:`load_state_dict`)."""
        return self._step_count

    def _check_level(self, level: Any) -> int:
        return check_integer(level, "level", minimum=1, maximum=self.num_levels)

    def slow_params(self, level: int) -> list[torch.Tensor]:
        """Level ``level``'s slow weights (1 = innermost), the live tensors, in parameter order.

        Treat them as read-only.  :meth:`load_state_dict` replaces them by new tensors.
        """
        return list(self._slow[self._check_level(level) - 1])

    def pullback_state(self, level: int) -> list[dict[str, torch.Tensor]]:
        """Level ``level``'s cached inner-optimizer state (``"pullback"`` only), the live dicts,
        one per parameter in parameter order; a dict is empty until a sync first sees that
        parameter's state.  Treat them as read-only."""
        return list(self._cache[self._check_level(level) - 1])

    # ----------------------------------------------------------------- the algorithm

    def _sync_level(self) -> int:
        """``L``: the largest level whose period divides the counter (0 if none).

        The periods are nested (each divides the next), so L counts the leading ones.
        """
        level = 0
        for period in self._periods:
            if self._step_count % period != 0:
                break
            level += 1
        return level

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One inner step, then the synchronization of levels ``1..L`` if ``L > 0`` (see the
        class docstring).  Every call counts; returns the inner optimizer's return value."""
        loss = self.optimizer.step(closure)
        self._step_count += 1
        level = self._sync_level()
        if level > 0:
            self._sync(level)
        return loss

    @torch.no_grad()
    def _sync(self, level: int) -> None:
        params = self._params()
        mix_chain_([params] + self._slow[:level], self._alphas)
        self._sync_state(level, params, self._alphas)

    def _sync_state(self, level: int, params: list[torch.Tensor], alphas: Sequence[float]) -> None:
        """The state policies of a level-``level`` sync (:mod:`agents.level_policy`)."""
        inner_state = self.optimizer.state
        policies = self._level_policies[:level]
        if any_pullback(policies):
            if self._pull_back(level, params, policies, alphas):
                reset_state_(inner_state[p] for p in params if p in inner_state)
        elif not any(state_weights(policies, alphas, level)):
            reset_state_(inner_state[p] for p in params if p in inner_state)

    def _pull_back(self, level: int, params: list[torch.Tensor], policies, alphas) -> bool:
        # One chain of tensor lists, (param, key) pairs in a fixed order: [live, cache_1, ...].
        chain: list[list[torch.Tensor]] = [[] for _ in range(level + 1)]
        inner_state = self.optimizer.state
        for i, p in enumerate(params):
            if p not in inner_state:
                continue
            live = inner_state[p]
            for key in mixable_state_keys(live, p):
                for cache in self._cache:  # every level, so higher levels also start at zero
                    if key not in cache[i]:
                        cache[i][key] = torch.zeros_like(live[key])
                chain[0].append(live[key])
                for l in range(1, level + 1):
                    chain[l].append(self._cache[l - 1][i][key])
        return run_state_chain_(chain[0], chain[1:], policies, alphas, level)

    @contextlib.contextmanager
    def swapped_slow_weights(self, level: int | None = None) -> Iterator[MultilayerLookahead]:
        """Copy level ``level``'s slow weights (default: the outermost, ``n``) into the
        parameters for the body of the ``with``; the fast weights are restored on exit, also on
        an exception.  Do not call :meth:`step` inside.

        Example::

            >>> import torch
            >>> from agents.reference import Lookahead
            >>> w = torch.nn.Parameter(torch.ones(2))
            >>> la = Lookahead(torch.optim.SGD([w], lr=1.0), k=5)
            >>> w.sum().backward(); _ = la.step()
            >>> with la.swapped_slow_weights():
            ...     print(w.tolist())      # evaluate with the slow weights
            [1.0, 1.0]
            >>> w.tolist()                 # the fast weights are back
            [0.0, 0.0]
        """
        level = self.num_levels if level is None else self._check_level(level)
        params = self._params()
        with torch.no_grad():
            fast = [p.detach().clone() for p in params]
            torch._foreach_copy_(params, self._slow[level - 1])
        try:
            yield self
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, fast)

    # ----------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """A snapshot (every tensor a copy) of everything :meth:`load_state_dict` restores::

            {"state": ..., "param_groups": ...,      # the inner optimizer's state_dict
             "lookahead": {"ks": [...], "alphas": [...], "state_policy": str,
                           "step_count": int,
                           "slow_weights": {i: [level_1, ..., level_n]},
                           "pullback_state": {i: [{key: tensor}, ...one dict per level]}}}

        ``i`` is the parameter's index in the flattened ``param_groups`` order (as in torch's
        own optimizer state_dicts), never its ``id()``.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        inner = copy.deepcopy(self.optimizer.state_dict())
        n_params = len(self._params())
        state_dict: dict[str, Any] = {
            **inner,
            "lookahead": {
                "ks": list(self._ks),
                "alphas": list(self._alphas),
                "state_policy": self._policy,
                "step_count": self._step_count,
                "slow_weights": {
                    i: [slow[i].clone() for slow in self._slow] for i in range(n_params)
                },
                "pullback_state": {
                    i: [{k: t.clone() for k, t in cache[i].items()} for cache in self._cache]
                    for i in range(n_params)
                },
            },
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore a :meth:`state_dict`: the inner optimizer, the counter, every level's slow
        weights and pullback caches, and ``ks``/``alphas``/``state_policy`` (the saved values
        are adopted, as torch optimizers adopt the saved hyperparameters).

        Tensors are copied (to each parameter's device and dtype); nothing aliases
        ``state_dict``.  Everything is validated before anything is changed.
        """
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        if "lookahead" not in state_dict:
            raise ValueError("state_dict has no 'lookahead' entry: not a Lookahead state_dict")
        saved = state_dict["lookahead"]
        ks, alphas = check_levels(saved["ks"], saved["alphas"])
        policy = _policy_value(saved["state_policy"], len(ks))
        step_count = check_integer(saved["step_count"], "step_count", minimum=0)

        params = self._params()
        slow_saved = saved["slow_weights"]
        cache_saved = saved.get("pullback_state", {})
        if set(slow_saved) != set(range(len(params))):
            raise ValueError(
                f"slow_weights must be keyed by the parameter indices 0..{len(params) - 1}; "
                f"got keys {sorted(slow_saved)}"
            )
        slow: list[list[torch.Tensor]] = [[] for _ in ks]
        cache: list[list[dict[str, torch.Tensor]]] = [[] for _ in ks]
        for i, p in enumerate(params):
            per_level = slow_saved[i]
            caches = cache_saved.get(i, [{} for _ in ks])
            if len(per_level) != len(ks) or len(caches) != len(ks):
                raise ValueError(f"parameter {i}: expected {len(ks)} levels of saved state")
            for l in range(len(ks)):
                slow[l].append(_copy_of(per_level[l], p))
                cache[l].append({k: _copy_of(t, p) for k, t in caches[l].items()})

        inner = copy.deepcopy({k: v for k, v in state_dict.items() if k != "lookahead"})
        self.optimizer.load_state_dict(inner)  # may raise; nothing of ours changed yet
        self._set_hyperparameters(ks, alphas, policy)
        self._step_count = int(step_count)
        self._slow, self._cache = slow, cache
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


class Lookahead(MultilayerLookahead):
    r"""Lookahead (Zhang et al. 2019, arXiv:1907.08610): ``MultilayerLookahead`` with one level.

    ``Lookahead(optimizer, k, alpha, state_policy)`` is exactly
    ``MultilayerLookahead(optimizer, (k,), (alpha,), state_policy)``: slow weights ``phi`` start
    as a copy of the parameters ``theta_0`` at construction; after every ``k``-th call of
    :meth:`step` (the first after exactly ``k`` inner steps)
    ``phi <- phi + alpha * (theta - phi)`` (computed as ``d = theta - phi; d = alpha * d;
    phi = phi + d``) and ``theta <- phi``.

    Args:
        optimizer: the inner optimizer (any :class:`torch.optim.Optimizer`).
        k: sync period, an int >= 1 (default 5).
        alpha: slow step size, a finite real in (0, 1] (default 0.5).
        state_policy: ``"maintain"`` (default), ``"reset"`` or ``"pullback"``.

    Example::

        >>> import torch
        >>> from agents.reference import Lookahead
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = Lookahead(torch.optim.Adam(model.parameters(), lr=1e-3), k=5, alpha=0.5)
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.1)
        >>> opt.param_groups is opt.optimizer.param_groups
        True
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        k: int = 5,
        alpha: float = 0.5,
        state_policy: str = "maintain",
    ) -> None:
        # Validate under this class's argument names before delegating.
        check_period(k, name="k")
        check_alpha(alpha, name="alpha")
        super().__init__(optimizer, (k,), (alpha,), state_policy)

    @property
    def k(self) -> int:
        return self._ks[0]

    @property
    def alpha(self) -> float:
        return self._alphas[0]
