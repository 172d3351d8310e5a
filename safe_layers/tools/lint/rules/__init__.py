"""The rules of ``safe-layers lint``: stable ids, one module per family.

    SL0xx  the net as Caffe sees it (refused, shapes unknown, files)
    SL1xx  solver: learning-rate schedule and update settings      (rules/solver.py)
    SL2xx  pooling geometry                                          (rules/pooling.py)
    SL3xx  losses                                                    (rules/loss.py)
    SL4xx  BatchNorm                                                 (rules/batch_norm.py)
    SL5xx  Caffe parameter blocks on Python layers                   (rules/python_layers.py)
    SL6xx  safe_layers' own layers: their param_str                  (rules/python_layers.py)
    SL7xx  domain traps: Log, Power, Exp                             (rules/domain.py)

A rule id never changes meaning; a retired id is never reused. ``safe-layers lint
--list-rules`` prints this table from :data:`RULES`; each rule's ``doc`` (``safe-layers rule
SL201``) says why it matters and cites what Caffe does as file:line of BVLC Caffe 1.0 at
git 99bd997 (the source the Caffe of caffe_build/ is built from).
"""

from safe_layers.readers.net_state import is_loss
from safe_layers.tools import rule_table
from safe_layers.tools.findings import Finding
from safe_layers.tools.rule_table import RULES


def rule(rule_id, severity, summary, doc=""):
    """Register a lint rule in the one rule table (:mod:`safe_layers.tools.rule_table`)."""
    return rule_table.rule("lint", rule_id, severity, summary, doc)


CAFFE_REFUSES = rule(
    "SL001", "error", "Caffe refuses to build the net (its own message, naming the layer)",
    doc="""
    lint builds each net with real Caffe, once per phase, in a child process: Net::Init
    filters the layers by phase, creates each one and calls its SetUp (net.cpp:46-58, 84,
    123), and a layer that refuses its parameters or its bottoms fails a CHECK there, which
    aborts the whole process. `caffe train` would die the same way, at startup or at the
    first test net. The finding carries Caffe's own message, placed on the layer it names.
    """)
FORK_SCHEMA = rule(
    "SL006", "info", "fields or layer types this Caffe does not know (a fork's): named once per file, "
    "their rules and Caffe-built shapes skipped",
    doc="""
    Production nets are often written for a fork of Caffe (py-faster-rcnn's ROIPooling and
    smooth_l1_loss_param, SSD's MultiBoxLoss and permute_param, SegNet's BN): the installed
    Caffe's schema has no such fields, so its ReadProtoFromTextFile refuses the file
    (io.cpp:38), and its layer registry no such types ("Unknown layer type",
    layer_factory.hpp:81), so it cannot build the net. lint still reads the
    file (the fields kept as written), runs every rule that needs neither, and names once
    what it could not know and what that cost: the shape rules, which need Caffe to build
    the net. harden works on such files all the same, editing only around its own blocks.
    """)
SHAPES_UNKNOWN = rule(
    "SL002", "info", "blob shapes could not be known: shape-free rules only",
    doc="""
    The pooling and loss rules need blob shapes, which lint takes from Caffe's own
    Reshape of every layer as Net::Init sets the net up (net.cpp:123). Where that cannot
    happen (Caffe refused the net, a Python layer's module does not import, a data
    layer's source gives no shape and --input-shape names none, or --no-shapes), only the
    rules that need no shape run; this note says why, so a clean result is not mistaken
    for a checked one.
    """)
MODULE_MISSING = rule(
    "SL003", "warning", "a Python layer's module does not import here: shapes unknown",
    doc="""
    Caffe creates a Python layer by importing python_param.module with Boost.Python
    (layer_factory.cpp:295-296); when that fails here, lint cannot build the net to learn
    its shapes, and `caffe train` run from this environment would abort the same way. The
    module must be importable from the PYTHONPATH of the process that runs Caffe.
    """)
NET_PATH = rule(
    "SL004", "warning", "a net named by the solver is not where Caffe looks for it",
    doc="""
    The solver's net, train_net and test_net paths are opened as given, relative to the
    working directory of the `caffe` process, not to the solver file
    (solver.cpp:91-104 with ReadNetParamsFromTextFileOrDie; io.cpp:36 fails with `File
    not found`). A path that only exists relative to the solver works from one folder and
    aborts from another; run Caffe from the folder the paths are written for.
    """)
V1_LAYERS = rule(
    "SL005", "info", "V1 'layers' entries: checked only by Caffe's build, not by the rules",
    doc="""
    Caffe upgrades the deprecated V1 `layers { type: ENUM }` entries to `layer` when it
    reads the file (upgrade_proto.cpp:54-66, UpgradeV1Net), so its build checks them; the
    lint rules read only the current `layer` fields and skip V1 entries. Upgrade the file
    with Caffe's upgrade_net_proto_text to have every rule check it.
    """)


class Report:
    """Collects findings for one file (or one net inside a solver)."""

    def __init__(self):
        self.findings = []

    def add(self, path, node, rule_id, message, fix="", layer=None, severity=None, data=None):
        line, col = (node.line, node.col) if node is not None else (1, 1)
        self.findings.append(Finding(path, line, col, rule_id, severity or RULES[rule_id].severity,
                                     message, fix=fix, layer=layer, data=data))


# Layer types whose output is never negative / lies in a bounded range (for the domain rules).
NON_NEGATIVE = {"Sigmoid", "Softmax", "Exp", "AbsVal", "BNLL", "Threshold"}
BOUNDED = {"Sigmoid", "TanH", "Softmax", "Threshold", "Clip"}


class NetCheck:
    """One net in one phase, as the net rules see it.

    Attributes:
        net: the Prototxt (``net.path`` for findings).
        phase (str): 'TRAIN' or 'TEST'.
        layers (list): [(LayerParameter, Node)] that Caffe keeps in this phase, file order.
        shapes: netshapes.Shapes, or None when shapes are unknown.
        solver: the solver Prototxt that names this net, or None.
        report: the Report the findings go to.
    """

    def __init__(self, net, phase, layers, shapes, solver, report):
        self.net, self.phase, self.layers, self.shapes = net, phase, layers, shapes
        self.solver, self.report = solver, report

    @property
    def path(self):
        return self.net.path

    @property
    def trains(self):
        """Whether this is a net one trains: TRAIN phase with a loss (a deploy net checked
        in TRAIN is not)."""
        return self.phase == "TRAIN" and any(is_loss(layer) for layer, _ in self.layers)

    def add(self, node, rule_id, message, fix="", layer=None, severity=None, data=None):
        data = dict(data or {})
        data.setdefault("phase", self.phase)
        self.report.add(self.path, node, rule_id, message, fix, layer, severity, data)

    def producer(self, index, blob):
        """(LayerParameter, Node) of the last layer before position ``index`` whose tops
        include ``blob`` (in-place layers count), or (None, None)."""
        for layer, node in reversed(self.layers[:index]):
            if blob in layer.top:
                return layer, node
        return None, None

    def consumers(self, index, blob):
        """The layers after position ``index`` that read ``blob`` before it is rewritten by
        a layer that is not in place."""
        found = []
        for layer, node in self.layers[index + 1:]:
            if blob in layer.bottom:
                found.append((layer, node))
            if blob in layer.top and blob not in layer.bottom:
                break
        return found

    def bottom_shape(self, layer, index=0):
        if self.shapes is None:
            return None
        return self.shapes.bottom_shape(layer.name, index)

    def non_negative(self, index, blob):
        """Whether ``blob`` as read by the layer at ``index`` can never be negative."""
        layer, _ = self.producer(index, blob)
        if layer is None:
            return False
        if layer.type == "ReLU":
            return layer.relu_param.negative_slope == 0
        if layer.type == "Clip":
            return layer.clip_param.min >= 0
        return layer.type in NON_NEGATIVE

    def bounded(self, index, blob):
        layer, _ = self.producer(index, blob)
        return layer is not None and layer.type in BOUNDED
