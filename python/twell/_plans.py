"""Plan keys and the plan caches of the functional entry points (``ops.ffn``, ``train_ops.forward``, ...).

A plan is not thread-safe, and on ``path="auto"`` it picks each call's route from the statistics
of its own previous call. So a cache that handed one plan to every caller of a shape would let
unrelated callers (two layers of one shape, two threads) steer each other's AUTO choice. Caches
are therefore keyed by an explicit plan key as well as by shape, options and device: key 0 is the
one anonymous plan per (shape, options, device) that callers who pass no key share; a layer or a
thread that wants its own plans and AUTO history takes a key from ``new_plan_key()``. Layer
objects (``TwellFFN``, ``TwellTrainFFN``) hold their plans themselves and use no cache.
"""

from __future__ import annotations

import itertools
import threading

__all__ = ["new_plan_key", "PlanCache"]

_keys = itertools.count(1)
_lock = threading.Lock()


def new_plan_key() -> int:
    """A plan key no other caller has (thread-safe)."""
    with _lock:
        return next(_keys)


class PlanCache:
    """Plans made on first use and kept, by (plan key, ...). Making a plan is locked, so two
    threads never make two plans for one key; running one stays one thread at a time."""

    def __init__(self):
        self._plans: dict = {}

    def get(self, key: tuple, make):
        """The plan of ``key`` (its first element is the plan key), made by ``make()`` if new."""
        plan = self._plans.get(key)
        if plan is None:
            with _lock:
                plan = self._plans.get(key)
                if plan is None:
                    plan = self._plans[key] = make()
        return plan

    def release(self, plan_key: int) -> None:
        """Drop the plans (and their workspaces) of one plan key."""
        with _lock:
            for k in [k for k in self._plans if k[0] == plan_key]:
                del self._plans[k]
