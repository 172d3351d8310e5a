"""The fix for a faulty input: the data sources to scan and the records a bad iteration read."""


def sources(layers):
    """The data source of each data layer that names one: [(layer, source)]."""
    found = []
    for layer in layers:
        source = layer.params.get("data_param.source") or layer.params.get("hdf5_data_param.source") \
            or layer.params.get("image_data_param.source")
        if source:
            found.append((layer, source))
    return found


def input_advice(model, iteration, since=None):
    """The fix for a faulty input: the sources to scan, and the records read by
    ``iteration`` (with ``since``, the last finite loss logged before it, by every
    iteration after that one: with display > 1 the first bad one is not logged).
    Returns (fix, data)."""
    data_layers = model.data_layers()
    found = sources(data_layers)
    parts = []
    data = {}
    if found:
        parts.append("scan the training data: %s" % "; ".join(
            "`safe-layers scan %s` (layer '%s')" % (source, layer.name) for layer, source in found))
        data["sources"] = [source for _, source in found]
        records = _records(model, found[0][0], iteration, since)
        if records is not None:
            parts.append(records[0])
            if records[1] is not None:
                data["record_positions"] = records[1]
    else:
        parts.append("scan the training data (`safe-layers scan SOURCE`)")
    guard_after = "data layer '%s'" % data_layers[0].name if data_layers else "the data layer"
    parts.append("put a NaNGuard (action: abort) on the tops of %s to stop at the bad batch; "
                 "check the loss layer (a loss normalised by label counts, InfogainLoss's H)"
                 % guard_after)
    return "; ".join(parts), data


def _records(model, layer, iteration, since):
    """(words, [first, last] or None): the records of ``layer`` (a Data layer: an LMDB or
    LevelDB read in key order) the iterations up to ``iteration`` read; None when the
    log does not tell them."""
    batch = layer.params.get("data_param.batch_size") or layer.params.get("hdf5_data_param.batch_size")
    iter_size = int(model.solver_field("iter_size") or 1)
    if not (batch and iteration is not None and layer.type == "Data"):
        return None
    # A resumed run's data layer starts again at record 0 (Caffe saves no cursor).
    origin = 0 if model.resumed is None else model.resumed.iteration
    if origin is None:
        return ("the run resumed from %s, whose iteration the log does not say: "
                "Caffe's data layer starts again at record 0 there, so count the "
                "records from the resumed iteration" % model.resumed.path, None)
    batch, per = int(batch), iter_size * int(batch)
    first = since + 1 if since is not None and iteration - since > 1 else iteration
    start, end = (first - origin) * per, (iteration - origin + 1) * per - 1
    which = ("iteration %d" % iteration if first == iteration
             else "iterations %d-%d" % (first, iteration))
    resumed = (" (counted from iteration %d, where the run resumed: Caffe's data layer "
               "starts again at record 0)" % origin if origin else "")
    return ("%s read records %d-%d of '%s' in key order (modulo its size)%s"
            % (which, start, end, layer.name, resumed), [start, end])
