"""Optuna samplers that Ray Tune can pickle.

Tune pickles its searcher twice: when `Tuner` ships the run to its controller, and whenever it
checkpoints the experiment (`OptunaSearch.save` pickles the searcher's `__dict__`, the Optuna
study and its sampler included). Optuna 5.1's genetic samplers (`BaseGASampler`: NSGA-II, NSGA-III)
hold a `threading.Lock`, which pickle refuses (`TypeError: cannot pickle '_thread.lock' object`);
Ray Tune 2.60's `OptunaSearch` takes any `BaseSampler` instance, so the sampler passed is one
that leaves its lock out of its pickled state and makes a new one when unpickled. Everything else
(seed, RNG state, population settings) round-trips unchanged. Optuna 4.x samplers have no lock:
the same class works there.
"""
from __future__ import annotations

import threading

import optuna


class NSGAIISampler(optuna.samplers.NSGAIISampler):
    """optuna.samplers.NSGAIISampler whose pickled state leaves its thread lock out."""

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_thread_lock"] = "_thread_lock" in state  # only whether there was one
        return state

    def __setstate__(self, state: dict) -> None:
        had_lock = state.pop("_thread_lock")
        self.__dict__.update(state)
        if had_lock:
            self._thread_lock = threading.Lock()
