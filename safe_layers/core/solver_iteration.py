"""The true solver iteration, for every report made while a net runs.

A Python layer sees only its own call count: after a resume, with ``iter_size`` or
after an extra ``net.forward()`` in a user's loop, that count is not the solver's
iteration. Whoever knows better says so here:

* a watch (:mod:`safe_layers.anomaly`) holds the solver, and marks its nets active
  while they run (their layer hooks call :func:`activate`), so a layer reporting from
  inside them gets ``solver.iter``;
* under `caffe train -snapshot X.solverstate`, the iteration saved in X is where the
  count starts (:func:`safe_layers.core.caffe_process.resumed_iteration`).

A layer has no handle on its net, so "which net is running" can only be a
per-thread fact: Caffe runs a net's layers on the thread that called it.
"""

import threading

from safe_layers.core import caffe_process


class _Running(threading.local):
    source = None  # the watch of the net now running on this thread, or None


_running = _Running()


def activate(source):
    """Mark ``source`` (an object with ``iteration()`` -> int or None) as the one whose
    net is running on this thread."""
    _running.source = source


def deactivate(source):
    """Undo :func:`activate` for ``source`` (a no-op when another source is active)."""
    if _running.source is source:
        _running.source = None


def active():
    """The active source on this thread, or None."""
    return _running.source


def train_iteration(call, iter_size=1):
    """The solver iteration of a TRAIN layer's ``call``-th pass (counting from 1).

    The watched solver's ``iter`` when a watch is running this net; otherwise the
    resume iteration of the caffe binary (0 elsewhere) plus ``(call - 1) // iter_size``.
    """
    source = _running.source
    if source is not None:
        known = source.iteration()
        if known is not None:
            return known
    return caffe_process.resumed_iteration() + (call - 1) // iter_size
