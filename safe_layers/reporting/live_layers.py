"""The layers of this process that report (LIVE), their FaultLogs, and their final summaries.

:func:`fault_logs` / :func:`clear_fault_logs` find (or clear) the logs of live layers by
layer name, phase and net; a layer's final summary is printed when its net is released
(:meth:`LiveLayers.sweep`) or the process exits.
"""

import atexit
import sys
import threading
import weakref

from safe_layers.core import caffe_process, deferred


class _Probe:
    pass


def _references(ref):
    obj = ref()
    return 0 if obj is None else sys.getrefcount(obj)


class LiveLayers:
    """The layers of this process that report, held weakly, with their FaultLogs.

    Caffe never frees a Python layer: its C++ PythonLayer keeps a reference to the Python
    object, which holds the C++ layer (a cycle Python's collector cannot see). When a net
    is released, that reference is the only one left; :meth:`sweep` notices this, prints
    the layer's final summary, lets the layer drop its buffers (``release_buffers()``) and
    forgets it, so building and dropping many nets leaves nothing growing behind.
    """

    def __init__(self):
        self._entries = []  # (weakref to owner, FaultLog), oldest first
        self._lock = threading.Lock()
        self._running = False
        self._epoch_phase = None
        self._epoch = 0
        self._unnamed = {}
        # An object held by exactly one outside reference, like a released Caffe layer:
        # counted through the same function, it calibrates what "released" reads as.
        self._probe_holder = [_Probe()]
        self._released_references = _references(weakref.ref(self._probe_holder[0]))

    def mark_running(self):
        """A layer ran: the next layer set up belongs to another net."""
        self._running = True

    def name_for(self, layer_type, name, phase):
        """``name``, or for an unnamed layer '#k': its number among the unnamed layers of its
        type in the net being built. A net's layers are set up one after another before any
        of them runs, so a new phase or a layer having run starts the next net (nets built
        back to back with nothing run in between count as one here)."""
        with self._lock:
            if self._running or phase != self._epoch_phase:
                self._unnamed = {}
                self._running = False
                self._epoch_phase = phase
                self._epoch += 1
            if name is not None:
                return name
            number = self._unnamed.get(layer_type, 0) + 1
            self._unnamed[layer_type] = number
        return "#%d" % number

    def register(self, owner, log):
        """Keep ``log`` of ``owner`` (weakly); ``log.net`` numbers the net being built."""
        self.sweep()
        with self._lock:
            log.net = self._epoch
            self._entries.append((weakref.ref(owner), log))

    def released(self, ref):
        return _references(ref) <= self._released_references

    def sweep(self):
        """Forget the layers whose nets are gone, printing their final summaries."""
        with self._lock:
            gone = [(ref, log) for ref, log in self._entries if self.released(ref)]
            if gone:
                dead = {id(log) for _, log in gone}
                self._entries = [(r, l) for r, l in self._entries if id(l) not in dead]
        for ref, log in gone:
            _final_summary_quietly(log)
            owner = ref()
            release = getattr(owner, "release_buffers", None)
            if release is not None:
                release()

    def entries(self):
        self.sweep()
        with self._lock:
            return [(ref(), log) for ref, log in self._entries if ref() is not None]

    def owners(self, layer_type=None, phase=None, net=None):
        """The live layers (objects) of ``layer_type`` in ``phase`` and built as part of net
        number ``net`` (a FaultLog's ``net``), oldest first."""
        return [owner for owner, log in self.entries()
                if (layer_type is None or log.layer_type == layer_type)
                and (phase is None or log.phase == phase) and (net is None or log.net == net)]

    def forget_all(self):
        with self._lock:
            self._entries = []
            self._unnamed = {}
            self._epoch_phase = None


LIVE = LiveLayers()


def layers_of(net):
    """The Python layer objects of a caffe.Net, or of every net of a caffe.Solver."""
    nets = [net]
    if hasattr(net, "test_nets") and hasattr(net, "net"):
        nets = [net.net] + list(net.test_nets)
    found = []
    for each in nets:
        found.extend(layer for layer in each.layers if hasattr(layer, "fault_log"))
    return found


def fault_logs(layer=None, phase=None, net=None):
    """The FaultLogs of the live layers of this process (oldest first), optionally only
    those of the layer named ``layer`` (its ``name``, or ``#k`` for the k-th unnamed one),
    in ``phase`` ('TRAIN'/'TEST'), and of ``net`` (a caffe.Net, or a caffe.Solver for all
    its nets): with several nets in one process, ``net=`` tells their layers apart.
    """
    logs = [log for _, log in LIVE.entries()]
    if net is not None:
        mine = {id(l.fault_log) for l in layers_of(net)}
        logs = [log for log in logs if id(log) in mine]
    return [log for log in logs
            if (layer is None or log.layer == layer) and (phase is None or log.phase == phase)]


def clear_fault_logs(net=None):
    """Without ``net``: forget every FaultLog so far (no final summaries for them; for
    tests and long pycaffe sessions). With ``net`` (a caffe.Net or caffe.Solver): clear
    only the logs of that net's layers, which keep reporting afresh."""
    if net is None:
        LIVE.forget_all()
        return
    for log in fault_logs(net=net):
        log.clear()


def _final_summary_quietly(log):
    try:
        log.final_summary()
    except Exception:  # noqa: BLE001 - a summary must never mask the real exit status
        pass


def _final_summaries():
    deferred.BOARDS.read_all()  # deferred checks not read yet (a pass cut short at exit)
    for _, log in LIVE.entries():
        _final_summary_quietly(log)


def _register_final_summaries():
    if caffe_process.caffe_cli_argv() is None:
        atexit.register(_final_summaries)
        return
    # The caffe binary never finalizes its embedded interpreter, so Python's atexit
    # hooks do not run there; a C-level exit hook does, while the interpreter is alive.
    import ctypes
    global _c_exit_hook
    _c_exit_hook = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p)(
        lambda status, arg: _final_summaries())
    ctypes.CDLL("libc.so.6").on_exit(_c_exit_hook, None)


_c_exit_hook = None
_register_final_summaries()
