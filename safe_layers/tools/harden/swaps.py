"""``--swap``: a BatchNorm made a StableBatchNorm, an InfogainLoss a SafeInfogainLoss, in
place (same name, so caffemodels load both ways), their Caffe settings carried into the
param_str. Each swap is the text edits that make it and the summary line that says so;
what it takes out of the layer stays in it as comments (text_edits.kept_edit,
text_edits.swap_insertion), from which ``harden --strip`` gives back the original bytes."""

from safe_layers.tools.harden.param_strings import param_str
from safe_layers.tools.harden.placement import last_writers
from safe_layers.tools.harden.text_edits import kept_edit, python_param_lines, swap_insertion, type_edit

SWAPS = ("batchnorm", "infogain")


def _producer_name(pairs, index, blob):
    writers = last_writers(pairs, index, blob)
    return pairs[writers[0]][0].name if writers else None


def batch_norm_keys(p):
    """[(key, value as written)] of the BatchNorm settings ``p`` (a BatchNormParameter)
    that go into StableBatchNorm's param_str, in the order harden writes them."""
    keys = []
    for key in ("use_global_stats", "moving_average_fraction", "eps"):
        if p.HasField(key):
            value = getattr(p, key)
            keys.append((key, str(value).lower() if isinstance(value, bool) else "%.7g" % value))
    return keys


def infogain_keys(ip, lp):
    """[(key, value)] of the InfogainLoss settings (its infogain_loss_param ``ip`` and
    loss_param ``lp``) that go into SafeInfogainLoss's param_str, in harden's order."""
    keys = []
    if ip.source:
        keys.append(("source", ip.source))
    if ip.HasField("axis"):
        keys.append(("axis", ip.axis))
    if lp.HasField("ignore_label"):
        keys.append(("ignore_label", lp.ignore_label))
    if lp.HasField("normalization"):
        enum = lp.DESCRIPTOR.fields_by_name["normalization"].enum_type
        keys.append(("normalization", enum.values_by_number[lp.normalization].name))
    elif lp.HasField("normalize"):
        keys.append(("normalization", "VALID" if lp.normalize else "BATCH_SIZE"))
    return keys


def swap_batch_norm(text, pairs, index, layer, node, ind, iter_size):
    """(edits, summary line) that make the BatchNorm ``layer`` a StableBatchNorm."""
    p = layer.batch_norm_param
    params = [("name", layer.name)]
    producer = _producer_name(pairs, index, layer.bottom[0]) if layer.bottom else None
    if producer:
        params.append(("follows", producer))
    keys = batch_norm_keys(p)
    params += keys
    moved = [key for key, _ in keys]
    dropped = [f.name for f, _ in p.ListFields() if f.name not in moved]
    edits = [type_edit(node)]
    block = node.find("batch_norm_param")
    if block is not None:
        edits.append(kept_edit(text, block))
    zero = [spec for spec in layer.param if spec.lr_mult == 0]
    lines = ["param { lr_mult: 0 }"] * max(0, 3 - len(layer.param)) if len(zero) == len(layer.param) else []
    lines += python_param_lines("StableBatchNorm", param_str(params, iter_size), ind)
    edits.append(swap_insertion(text, node, "batchnorm", lines, ind))
    note = "moved %s into param_str" % ", ".join(moved) if moved else "no batch_norm_param keys"
    if dropped:
        note += "; dropped %s (StableBatchNorm has no such key)" % ", ".join(dropped)
    log = ("  ~ %s: BatchNorm -> StableBatchNorm (same name: caffemodels load); %s%s"
           % (layer.name, note, "; added %d param { lr_mult: 0 }" % (lines.count("param { lr_mult: 0 }"))
              if "param { lr_mult: 0 }" in lines else ""))
    return edits, log


def swap_infogain(text, pairs, index, layer, node, ind, iter_size):
    """(edits, summary line) that make the InfogainLoss ``layer`` a SafeInfogainLoss."""
    params = [("name", layer.name)]
    producer = _producer_name(pairs, index, layer.bottom[0]) if layer.bottom else None
    if producer:
        params.append(("follows", producer))
    params += infogain_keys(layer.infogain_loss_param, layer.loss_param)
    softmax = None
    if layer.bottom:
        writers = last_writers(pairs, index, layer.bottom[0])
        if writers and pairs[writers[0]][0].type == "Softmax":
            softmax = pairs[writers[0]][0].name
            params.append(("input", "probabilities"))
    edits = [type_edit(node)]
    for field in ("infogain_loss_param", "loss_param"):
        block = node.find(field)
        if block is not None:
            edits.append(kept_edit(text, block))
    lines = [] if len(layer.loss_weight) else ["loss_weight: 1"]
    lines += python_param_lines("SafeInfogainLoss", param_str(params, iter_size), ind)
    edits.append(swap_insertion(text, node, "infogain", lines, ind))
    log = ("  ~ %s: InfogainLoss -> SafeInfogainLoss (%s%s)"
           % (layer.name, "loss_weight: 1 added, a Python layer has no default; "
              if not len(layer.loss_weight) else "",
              "Softmax '%s' in front kept and read with input: probabilities, the loss "
              "this prototxt was written for (today's InfogainLoss applied softmax twice "
              "here)" % softmax if softmax else "reads the logits, as InfogainLoss does"))
    return edits, log
