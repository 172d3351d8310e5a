"""The ``param_str`` schemas of the four layers, importable without ``caffe``.

The layers parse their ``param_str`` with these; the tools (``safe-layers lint``,
``harden``) validate a prototxt's Python layers with the very same objects, so a tool
reports exactly the error the layer would raise at net setup, without building the net.
"""

from safe_layers.kernels.infogain import NORMALIZATIONS
from safe_layers.core.params import FLOAT32_MAX, Field, Schema, reporting_fields

# What a repair writes for +-Inf (NaNGuard's default bound, SafeInfogainLoss's clamp on its
# logits): large next to a healthy activation, small enough that the next layer's sums, squares
# and weight gradients cannot overflow, and that one repaired element does not wreck the weights
# in one update; measured by bench/measure_clamp_bound.py (README, "Choosing the clamp bound").
CLAMP_BOUND = 1e3

# A repair needed on this many consecutive calls means a dead net, not a bad batch.
ESCALATE_AFTER = 10


def escalation_field(repairs):
    return Field("escalate_after", int, ESCALATE_AFTER,
                 "a repair (%s) needed on this many consecutive calls of one pass escalates to abort, "
                 "with a report saying so: the net is dead, and repairing on would hide it (0: never)"
                 % repairs, low=0)


def _check_nan_guard(p):
    if p.action == "zero" and p.check != "backward":
        return ("key 'action' has value 'zero', which only a backward pass can do; "
                "use action: warn|clamp|abort with backward_action: zero")
    if p.backward_action is not None and p.check == "forward":
        return ("key 'backward_action' has no effect with check: forward (no backward check); "
                "drop it, or use check: both")
    if p.bound is not None and p.max_abs is not None and p.bound > p.max_abs:
        return "key 'bound' (%g) must not exceed 'max_abs' (%g)" % (p.bound, p.max_abs)
    if p.max_abs is not None and abs(p.nan_value) > p.max_abs:
        return "key 'nan_value' (%g) must lie within +-max_abs (%g)" % (p.nan_value, p.max_abs)
    return None


NAN_GUARD = Schema("NaNGuard", [
    Field("name", str, None, "the name reports use (pycaffe does not tell a Python layer its own); "
          "unnamed layers are numbered #1, #2, ... in their net"),
    Field("follows", str, None, "the layer this guard watches, named in every report"),
    Field("check", str, "both", "which pass to check: forward data, backward diff, or both",
          choices=("forward", "backward", "both")),
    Field("action", str, "warn", "what to do on a fault (forward, and backward unless backward_action is set)",
          choices=("warn", "clamp", "abort", "zero")),
    Field("backward_action", str, None, "what to do on a backward fault; default: action",
          choices=("warn", "clamp", "abort", "zero")),
    Field("nan_value", float, 0.0, "clamp: the value NaN becomes"),
    Field("bound", float, None, "clamp: the magnitude +-Inf (and values over max_abs) become; "
          "default max_abs, else %g (see README: the float32 maximum overflows the next layer)"
          % CLAMP_BOUND, low=0.0, low_open=True),
    Field("max_abs", float, None, "early warning: finite values with abs(x) above this are faults too",
          low=0.0, low_open=True),
    Field("dump_dir", str, None, "flight recorder: on the first fault write the blobs (.npz) and report (.json) here"),
    Field("dump_max_mb", float, 64.0, "flight recorder: size cap of the .npz, in MB", low=0.0, low_open=True,
          high=1e6),
    Field("log_every", int, 100, "after the first log_first faults, one summary line every this many",
          low=1),
    escalation_field("clamp, zero"),
] + reporting_fields(), check=_check_nan_guard)


def _check_gradient_clip(p):
    if p.mode == "value":
        if p.clip is None:
            return "mode 'value' needs key 'clip' (the bound on each element)"
        given = [k for k, v in (("max_norm", p.max_norm is not None), ("per_sample", p.per_sample)) if v]
        if given:
            return "key%s %s belong%s to mode 'norm', not 'value'" % (
                "s" if len(given) > 1 else "", " and ".join("'%s'" % k for k in given),
                "" if len(given) > 1 else "s")
    else:
        if p.max_norm is None:
            return "mode 'norm' needs key 'max_norm' (the bound on the L2 norm)"
        if p.clip is not None:
            return "key 'clip' belongs to mode 'value', not 'norm'"
    return None


GRADIENT_CLIP = Schema("GradientClip", [
    Field("name", str, None, "the name reports use; unnamed layers are numbered #1, #2, ... in their net"),
    Field("follows", str, None, "the layer whose output this clips, named in reports"),
    Field("mode", str, "norm", "value: clip each element; norm: rescale to an L2 norm bound",
          choices=("value", "norm")),
    Field("clip", float, None, "mode value: each gradient element is clipped to [-clip, clip]",
          low=0.0, low_open=True),
    Field("max_norm", float, None, "mode norm: the largest L2 norm let through", low=0.0, low_open=True),
    Field("per_sample", bool, False, "mode norm: bound each sample's norm (over axis 0) instead of the blob's"),
    Field("nonfinite", str, "zero", "NaN/Inf gradient elements: zero them before the norm is taken, "
          "raise (error), or keep them (left out of the norm, passed through)",
          choices=("zero", "error", "keep")),
    Field("history", int, 100, "the norm statistics cover the last this many backward calls", low=1,
          high=1000000),
    Field("log_every", int, 100, "print the clipping statistics every this many backward calls "
          "(0: only at exit)", low=0),
    escalation_field("nonfinite: zero"),
] + reporting_fields(), check=_check_gradient_clip)


SAFE_INFOGAIN_LOSS = Schema("SafeInfogainLoss", [
    Field("name", str, None, "the name reports and errors use; unnamed layers are numbered #1, #2, ... "
          "in their net"),
    Field("follows", str, None, "the layer that produces the logits, named in reports"),
    Field("axis", int, 1, "the class axis of bottom[0] (negative counts from the end)", low=-32, high=31),
    Field("ignore_label", int, None, "positions with this label add no loss and no gradient "
          "(labels are float32: integers beyond 2^24 are not exact)", low=-2 ** 24, high=2 ** 24),
    Field("normalization", str, "VALID", "divide the loss by: VALID (non-ignored count), BATCH_SIZE "
          "(outer count), FULL (outer x inner), NONE (1); never by less than 1",
          choices=NORMALIZATIONS),
    Field("source", str, None, "H from a file (.binaryproto BlobProto or .npy) instead of bottom[2]"),
    Field("input", str, "logits", "bottom[0] holds logits (Caffe since 2017), or probabilities "
          "(prototxts that put a Softmax in front)", choices=("logits", "probabilities")),
    Field("normalize_h", str, "none", "rows: divide each row of H by its sum", choices=("none", "rows")),
    Field("class_weighting", str, "none", "batch_frequency: weight each position by n_valid / "
          "(classes present x its class count), finite when a class is absent",
          choices=("none", "batch_frequency")),
    Field("action", str, "warn", "non-finite bottom[0] (or a loss float32 cannot hold): warn, clamp "
          "(logits on a copy: NaN -> 0, +-Inf -> +-%g; a loss -> +-float32 max) or abort" % CLAMP_BOUND,
          choices=("warn", "clamp", "abort")),
    escalation_field("clamp"),
] + reporting_fields())


STABLE_BATCH_NORM = Schema("StableBatchNorm", [
    Field("name", str, None, "the name reports use; unnamed layers are numbered #1, #2, ... in their net"),
    Field("follows", str, None, "the layer this normalizes, named in reports"),
    Field("use_global_stats", bool, None, "normalize with the stored running statistics; "
          "default: true in TEST, false in TRAIN (as Caffe)"),
    Field("moving_average_fraction", float, 0.999, "decay of the running statistics", low=0.0, high=1.0),
    Field("eps", float, 1e-5, "added to the variance", low=0.0, low_open=True),
    Field("on_bad_stats", str, "batch", "stored statistics unusable (scale factor 0 or non-finite, "
          "non-finite mean/variance) under use_global_stats: use the batch's own, or raise (error)",
          choices=("batch", "error")),
    Field("action", str, "warn", "non-finite input: warn (the running statistics skip that batch) "
          "or abort", choices=("warn", "abort")),
] + reporting_fields())


# Layer type (python_param.layer) -> its schema, for the tools.
SCHEMAS = {schema.layer_type: schema
           for schema in (NAN_GUARD, GRADIENT_CLIP, SAFE_INFOGAIN_LOSS, STABLE_BATCH_NORM)}
