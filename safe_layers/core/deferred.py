"""Deferred checks: the fault flags of a net's layers stay on the device and are read on the
host once per pass, not once per layer.

On a GPU every host read of a device value drains the stream. A check answered at once
(``safe_layers.kernels.finite.all_finite``) costs one such read per guarded blob: over 450
per iteration with a guard after every layer of ResNet-50. Deferred, a layer's check
writes everything its report needs (counts, first faulty element, finite statistics) into
a row of its net's :class:`Board` on the device (``finite.fault_stats``), repairs on the
device where the row says so (``finite.clamp_flagged_`` / ``zero_flagged_``), and goes on;
the board reads all its rows in one host read at the end of the pass and hands each row,
in the order the checks ran, to the entry that made it (a report, a repair counted, an
abort raised with the first fault's full report).

When the board is read (the "end of the pass"):

* with a watch on a solver (``safe_layers.watch``): the watch reads its training net's
  board in ``on_gradients_ready``, once per iteration (all ``iter_size`` passes), before
  Caffe's update; and in ``on_start`` (anything left from a ``net.forward()`` of the
  user's between steps);
* otherwise (the ``caffe`` binary, plain pycaffe): the board learns which of its layers
  runs last in a forward pass and in a backward pass (two passes in a row that end at
  the same layer; until then, every check is read at the end of its layer's call, as at
  once), then reads at the end of that layer's forward and of that layer's backward: two
  reads per iteration from the third, both before the solver's update. A pass that ends
  elsewhere (``net.forward(start=, end=)``; two nets built back to back, which share a
  board) is read at the next change between forward and backward, or when a layer with
  an unread row of the same pass kind runs again, and the board learns again.

A board holding ``MAX_PENDING`` unread rows is read at once. Nothing in this module
imports Caffe; the entries (``reporting.PendingFault`` and the layers' own) know what a
row means.
"""

import weakref

import numpy

from safe_layers.kernels import finite
from safe_layers.kernels import xp as _xp
from safe_layers.kernels.xp import array_module

PASSES = ("forward", "backward")
#: Unread rows after which a board is read whatever the pass.
MAX_PENDING = 4096
#: Rows per buffer: a board holds as many buffers as its busiest pass needs, and a row,
#: once handed out, never moves (its layer may still be writing it).
CHUNK = 256


class Board:
    """The pending checks of one net's layers, read in one host read (see the module
    docstring). ``reads`` counts the reads; ``reader``: the watch that reads this board
    itself (then the board never reads at a pass end of its own)."""

    def __init__(self):
        self.active = False          # a deferred check was made here: follow the passes
        self.chunks = []             # row buffers of CHUNK rows, on the arrays' device
        self.pending = []            # entries, in the order the checks ran (row k: entry k)
        self._pending_calls = set()  # (owner id, pass kind) with an unread row
        self.reader = None
        self.reads = 0
        self._kind = None            # the pass kind in progress
        self._seen = {kind: [] for kind in PASSES}
        self._seen_ids = {kind: set() for kind in PASSES}
        self._last = dict.fromkeys(PASSES)       # id of the layer that ends each pass: learned
        self._candidate = dict.fromkeys(PASSES)  # the layer the last complete pass ended at

    # -- the calls of the layers ------------------------------------------------------
    def call(self, owner, kind):
        """Around one forward or backward of ``owner`` (a layer): the board follows the
        passes, and reads its rows where a pass ends. Not read when the body raised.
        A board without deferred checks (the CPU default) does nothing here."""
        return _Call(self, owner, kind)

    def begin(self, owner, kind):
        if not self.active:
            return
        key = id(owner)
        if kind != self._kind:
            if self._kind is not None:
                self._close(self._kind)
            self._kind = kind
            if self.reader is None and self.pending:
                self.read()  # a pass whose end was not seen (a partial pass, a shared board)
        elif key in self._seen_ids[kind]:
            self._close(kind)  # this layer runs again: a new pass of the same kind
        if (key, kind) in self._pending_calls and self.reader is None:
            self.read()
        self._seen[kind].append(key)
        self._seen_ids[kind].add(key)

    def end(self, owner, kind):
        if not self.pending:  # also: not active
            return
        if len(self.pending) >= MAX_PENDING:
            self.read()
            return
        if self.reader is not None:
            return
        last = self._last[kind]
        if last is None or last == id(owner):
            self.read()

    def _close(self, kind):
        """A pass of ``kind`` is complete: learn where passes end. Two passes in a row that
        end at the same layer teach it; a pass that ends elsewhere unlearns it (a board
        shared by two nets run in turn, a partial pass), and learning starts over."""
        seen = self._seen[kind]
        if seen:
            ended = seen[-1]
            if self._last[kind] is not None and ended != self._last[kind]:
                self._last[kind] = None
            elif self._last[kind] is None and ended == self._candidate[kind]:
                self._last[kind] = ended
            self._candidate[kind] = ended
        self._seen[kind] = []
        self._seen_ids[kind] = set()

    @property
    def learned(self):
        """{pass kind: whether the layer that ends it is known}."""
        return {kind: self._last[kind] is not None for kind in PASSES}

    # -- rows -----------------------------------------------------------------------
    def add(self, entry, owner, kind, like):
        """Queue ``entry`` (an object with ``resolve(host_row)``) and return its row: a
        float64 row of ``finite.ROW`` columns in the array module of ``like``, for the
        caller to fill on the device."""
        if not self.active:
            # Passes are followed from here on (the current call counts as begun).
            self.active = True
            self.begin(owner, kind)
        xp = array_module(like)
        if self.chunks and array_module(self.chunks[0]) is not xp:
            self.read()
            self.chunks = []
        chunk, index = divmod(len(self.pending), CHUNK)
        if chunk == len(self.chunks):
            self.chunks.append(finite.empty_rows(xp, CHUNK))
        self.pending.append(entry)
        self._pending_calls.add((id(owner), kind))
        return self.chunks[chunk][index]

    def read(self):
        """Read every pending row in one host read and resolve the entries in the order
        their checks ran. Returns what they resolved to (e.g. FaultReports; None for a
        clean row left out). An entry that raises (an abort) ends the read: the entries
        after it, which ran on data the abort would have stopped, are dropped."""
        if not self.pending:
            return []
        pending, count = self.pending, len(self.pending)
        self.pending = []
        self._pending_calls = set()
        used = -(-count // CHUNK)
        rows = self.chunks[0] if used == 1 else \
            array_module(self.chunks[0]).concatenate(self.chunks[:used])  # on the device
        host = numpy.array(_xp.to_numpy(rows[:count]), copy=True)
        self.reads += 1
        results = []
        for entry, row in zip(pending, host):
            result = entry.resolve(row)
            if result is not None:
                results.append(result)
        return results


class _Call:
    """The context of one layer call (a class, not a generator: it runs twice per layer
    and pass, on every net)."""

    __slots__ = ("board", "owner", "kind")

    def __init__(self, board, owner, kind):
        self.board, self.owner, self.kind = board, owner, kind

    def __enter__(self):
        self.board.begin(self.owner, self.kind)

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is None:
            self.board.end(self.owner, self.kind)
        return False


class Boards:
    """The board of each net (by the number ``reporting.LIVE`` gives the net a layer is
    built in), held weakly: a board lives as long as one of its layers' logs."""

    def __init__(self):
        self._boards = weakref.WeakValueDictionary()

    def for_net(self, net):
        board = self._boards.get(net)
        if board is None:
            board = Board()
            self._boards[net] = board
        return board

    def read_all(self):
        """Read every board with unread rows (at exit: nothing may go unreported). A row
        that aborts has printed its report; the exception is not raised here."""
        for board in list(self._boards.values()):
            try:
                board.read()
            except Exception:  # noqa: BLE001 - printed already; the process is ending
                pass


BOARDS = Boards()
