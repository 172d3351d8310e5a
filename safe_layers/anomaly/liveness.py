"""Whether a watched net still learns: the checks that catch a net that died without a
NaN (``on_dead``), from what the watch reads each iteration anyway.

* a dead layer: a trained layer's top all zeros over the batch, while one of its bottoms
  was not, ``dead_after`` iterations in a row (ReLUs killed by a too-high rate); the
  probe notes it from its finite check's own reduction (:func:`.probe.blob_check`: on a
  GPU max |x|, read with the finite verdict, so no host read is added per layer);
* vanished gradients: every param diff zero, or the update (lr x the diffs' norm)
  below ``dead_update_ratio`` times the weights' norm, ``dead_after`` iterations in a
  row while the loss is above half its reference (the chance level, else the first loss);
* the loss at chance: the mean training loss of the last ``growth_window`` iterations
  within ``chance_band`` of the chance level of the net's softmax losses (the sum of
  loss weight x ln C, C from the net), ``chance_after`` iterations in a row after having
  been below it, or five times as many when it never left it.

A dead state names the iteration since which the net has been dead (:attr:`DeadState.since`;
for a net whose loss was never below chance since training (re)started, the iteration
after that start), so that a rollback returns to a checkpoint from before it (else from
before the evidence itself); while any evidence is building up the net is
:meth:`Liveness.suspect` and no checkpoint is taken.
"""

import collections
import math

from safe_layers.reporting import watch_lines

# The loss types whose chance level is known: ln C for C classes (softmax_loss_layer.cpp:
# the mean of -log p over the samples; a uniform prediction gives ln C).
SOFTMAX_LOSSES = ("SoftmaxWithLoss",)
NEVER_LEFT_FACTOR = 5


def chance_terms(probe):
    """[(loss weight, C)] of the net's softmax losses, or None when a loss of the net is
    of another type (the chance level of the total is then unknown)."""
    terms = []
    for i, tops in enumerate(probe.loss_tops):
        if not tops:
            continue
        if probe.types[i] not in SOFTMAX_LOSSES:
            return None
        shape = probe.data(probe.blobs[probe.bottoms[i][0]]).shape
        if len(shape) < 2 or shape[1] < 2:
            return None
        terms.extend((float(weight), int(shape[1])) for _, weight in tops)
    return terms or None


class DeadState:
    """A net found dead: ``iteration`` (when), ``since`` (the first iteration of the
    evidence), the evidence (``layers``, ``vanished``, ``chance``: see
    :func:`~safe_layers.reporting.watch_lines.dead_message`)."""

    def __init__(self, iteration, since, layers, vanished, chance, evidence_since=None):
        self.iteration, self.since = iteration, since
        self.layers, self.vanished, self.chance = layers, vanished, chance
        # The first iteration of the evidence itself (``since`` reaches back further for
        # a net that learned nothing since training restarted): a rollback's second choice.
        self.evidence_since = since if evidence_since is None else evidence_since

    def message(self):
        return watch_lines.dead_message(self.since, self.layers, self.vanished, self.chance)

    def details(self):
        return {"since": self.since, "evidence_since": self.evidence_since,
                "layers": self.layers, "vanished": self.vanished, "chance": self.chance}


class Liveness:
    """The liveness checks of one watched training net (see the module docstring).
    ``state``: the DeadState of the current dead episode, or None."""

    def __init__(self, probe, options):
        self.probe = probe
        self.options = options
        self.terms = None            # [(loss weight, C)], read at the first iteration
        self.level = None            # the chance level of the total loss, or None
        self.losses = collections.deque(maxlen=options.growth_window)
        self.first_loss = None
        self.state = None
        self.last_ratio = None       # the last update/weights ratio measured (bench/)
        self.restart(0)

    def restart(self, iteration):
        """From ``iteration`` on (the run's start, or the checkpoint a rollback restored),
        everything is measured anew."""
        self.start = iteration
        self.zero_since = {}         # (layer, top k) -> first iteration of its zero streak
        self.vanish_since = None
        self.chance_since = None     # first iteration of the streak at chance
        self.learned = False         # the loss was below chance since the start
        self.losses.clear()
        self.state = None

    def suspect(self):
        """Whether evidence of a dead net is building up (or it is dead): no state to keep."""
        return (self.state is not None or bool(self.zero_since) or self.vanish_since is not None
                or (self.learned and self.chance_since is not None))

    def observe(self, iteration, loss, lr, labels, diff_squares, weight_size):
        """One good iteration: its loss, rate, the param diffs' sums of squares
        (``diff_squares``, in the order of ``labels``; None: not read) and the weights'
        magnitude before its update (None: not known yet). Returns a new DeadState when
        the net is found dead now, else None."""
        if self.terms is None:
            self.terms = chance_terms(self.probe) or []
            self.level = sum(w * math.log(c) for w, c in self.terms) if self.terms else None
        if self.first_loss is None:
            self.first_loss = loss
        layers = self._layers(iteration)
        vanished = self._vanished(iteration, loss, lr, labels, diff_squares, weight_size)
        chance = self._chance(iteration, loss)
        if not (layers or vanished or chance):
            if self.state is not None and not self._still_dead():
                self.state = None  # it learns again: a new episode would be reported anew
            return None
        if self.state is not None:
            return None  # this episode is reported already
        since = min([l["since"] for l in layers] + ([vanished["since"]] if vanished else [])
                    + ([chance["since"]] if chance else []))
        plateau = self._plateau_start()
        if plateau is not None:
            since = min(since, plateau)  # back at chance since then: dead from there on
        evidence = since
        if self.level is not None and not self.learned:
            # Never below chance since training (re)started: nothing learned since the
            # state it started from, which is not to blame (its rate may be).
            since = min(since, self.start + 1)
        self.state = DeadState(iteration, since, layers, vanished, chance, evidence)
        return self.state

    def _still_dead(self):
        return bool(self.zero_since) or self.vanish_since is not None or (
            self.chance_since is not None)

    def _layers(self, iteration):
        probe = self.probe
        if not probe.zero_producers and not self.zero_since:
            return []
        zero = set(probe.zero_producers or ())
        for key in list(self.zero_since):
            if key not in zero:
                del self.zero_since[key]
        for key in zero:
            self.zero_since.setdefault(key, iteration)
        out = []
        for (i, k), since in sorted(self.zero_since.items(), key=lambda kv: (kv[1], kv[0])):
            count = iteration - since + 1
            if count >= self.options.dead_after:
                out.append({"layer": probe.names[i], "type": probe.types[i],
                            "blob": probe.blob_names[probe.tops[i][k]], "iterations": count,
                            "since": since})
        return out

    def _vanished(self, iteration, loss, lr, labels, diff_squares, weight_size):
        if not diff_squares:
            self.vanish_since = None
            return None
        total = math.sqrt(sum(diff_squares))
        ratio = None
        if total > 0 and lr and lr > 0 and weight_size:
            ratio = self.last_ratio = lr * total / weight_size
        negligible = total == 0 or (ratio is not None and ratio < self.options.dead_update_ratio)
        reference = self.level if self.level is not None else self.first_loss
        if not negligible or reference is None or not loss >= 0.5 * reference:
            self.vanish_since = None
            return None
        if self.vanish_since is None:
            self.vanish_since = iteration
        count = iteration - self.vanish_since + 1
        if count < self.options.dead_after:
            return None
        zero_layers = []
        for label, square in zip(labels, diff_squares):
            layer = label.rsplit("[", 1)[0]
            if square == 0 and layer not in zero_layers:
                zero_layers.append(layer)
        return {"ratio": ratio, "threshold": self.options.dead_update_ratio, "iterations": count,
                "loss": loss, "zero_layers": zero_layers, "since": self.vanish_since}

    def _chance(self, iteration, loss):
        if self.level is None or self.level <= 0:
            return None
        self.losses.append(loss)
        if len(self.losses) < min(5, self.losses.maxlen):
            return None
        mean = sum(self.losses) / len(self.losses)
        band = self.options.chance_band
        if mean < self.level * (1 - band):
            self.learned = True
        if abs(mean - self.level) > band * self.level:
            self.chance_since = None
            return None
        if self.chance_since is None:
            self.chance_since = iteration
            self.chance_first = iteration - len(self.losses) + 1  # the window's first loss
        count = iteration - self.chance_since + 1
        needed = self.options.chance_after * (1 if self.learned else NEVER_LEFT_FACTOR)
        if count < needed:
            return None
        return {"mean": mean, "level": self.level, "terms": self.terms,
                "window": len(self.losses), "band": band, "iterations": count,
                "never_left": not self.learned, "since": self._plateau_start()}

    def _plateau_start(self):
        """The first iteration of the loss's stretch at chance, or None when it is not at
        chance; a stretch that began where training (re)started begins with the state
        restored there, which is not to blame: the next one is."""
        if self.chance_since is None:
            return None
        first = max(self.chance_first, self.start)
        return first + 1 if first == self.start else first
