"""SL5xx / SL6xx: Python layers.

pycaffe gives a Python layer its ``param_str`` and nothing else of its LayerParameter, so
a Caffe ``*_param`` block left on a ``type: "Python"`` layer (``batch_norm_param {
use_global_stats: true }`` after BatchNorm became StableBatchNorm, say) is silently
ignored. safe_layers' own layers are validated with their own schemas: the message is the
one the layer would raise at net setup.
"""

from safe_layers.core.params import ParamError
from safe_layers.core.schemas import SCHEMAS
from safe_layers.tools.lint.rules import rule

IGNORED_BLOCK = rule(
    "SL501", "error", "a Caffe *_param block on a Python layer: pycaffe never shows it to the layer (names the keys to move into param_str)",
    doc="""
    Caffe hands a Python layer its param_str and phase and nothing else of its
    LayerParameter (python_layer.hpp:27-30; pycaffe's Layer exposes no layer_param,
    _caffe.cpp:481-487). A Caffe *_param block left on a `type: "Python"` layer, such as
    batch_norm_param after BatchNorm became StableBatchNorm, is parsed and silently
    ignored: use_global_stats: true there freezes nothing. Its keys belong in param_str.
    """)
PARAM_STR = rule(
    "SL601", "error", "a safe_layers layer's param_str its schema rejects (the layer's own error text)",
    doc="""
    A Python layer's setup() runs while Caffe builds the net, with python_param.param_str
    (python_layer.hpp:27-30): a param_str that the safe_layers layer's schema rejects (an
    unknown key, a value of the wrong type or range) raises there, and Caffe aborts the
    net build. lint runs the same schema and reports the layer's own message.
    """)
UNKNOWN_CLASS = rule(
    "SL602", "error", "python_param names a safe_layers layer that does not exist",
    doc="""
    Caffe creates a Python layer as module.<layer>(param) (layer_factory.cpp:295-296): a
    python_param.layer that the safe_layers module does not define raises AttributeError
    there, and Caffe aborts the net build. The finding lists the layer classes safe_layers
    has.
    """)


def _yaml_value(value):
    """A proto scalar as param_str YAML: booleans lower case, float32 fields shortest."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "%.7g" % value
    return value


def check(ctx):
    for layer, node in ctx.layers:
        if layer.type != "Python":
            continue
        pp = layer.python_param
        ours = pp.module.split(".")[0] == "safe_layers"
        schema = SCHEMAS.get(pp.layer) if ours else None
        for field, value in layer.ListFields():
            name = field.name
            if not name.endswith("_param") or name == "python_param":
                continue
            block = node.find(name) or node
            fields = [(f.name, v) for f, v in value.ListFields()]
            keys = ", ".join(f for f, _ in fields) or "(empty)"
            movable = [(f, v) for f, v in fields if schema is not None and f in schema.fields]
            if movable:
                fix = "move %s into param_str: \"{%s}\" and delete %s { ... }" % (
                    ", ".join(f for f, _ in movable),
                    ", ".join("%s: %s" % (f, _yaml_value(v)) for f, v in movable), name)
            else:
                fix = "delete %s { ... }; pass what the layer needs through python_param.param_str" % name
            ctx.add(block, IGNORED_BLOCK,
                    "Python layer '%s' (%s) has %s { %s }: pycaffe gives a Python layer only its "
                    "param_str, so this block is silently ignored%s"
                    % (layer.name, pp.layer or pp.module, name, keys,
                       " (use_global_stats: true here does not freeze the statistics: every TRAIN "
                       "forward overwrites them)" if any(f == "use_global_stats" and v for f, v in fields)
                       else ""),
                    fix, layer=layer.name, data={"block": name, "keys": [f for f, _ in fields]})
        if not ours:
            continue
        where = node.find("python_param.param_str") or node.find("python_param") or node
        if schema is None:
            ctx.add(node.find("python_param.layer") or node, UNKNOWN_CLASS,
                    "Python layer '%s': module '%s' has no layer '%s' (Caffe fails at setup)"
                    % (layer.name, pp.module, pp.layer),
                    "layer: one of %s" % ", ".join(sorted(SCHEMAS)), layer=layer.name)
            continue
        try:
            schema.parse(pp.param_str)
        except ParamError as exc:
            ctx.add(where, PARAM_STR, "Python layer '%s': %s" % (layer.name, exc),
                    "see the %s keys in README.md (or prototxt_snippets/)" % pp.layer,
                    layer=layer.name, data={"param_str": pp.param_str})
