"""Which layers Caffe keeps in a net state, and what each top weighs in the loss
(``net.cpp``: ``Net::FilterNet``, ``Net::StateMeetsRule``; ``layer.hpp``: ``SetLossWeights``)."""


def state_meets_rule(rule_message, phase, level=0, stages=()):
    """Caffe's Net::StateMeetsRule (net.cpp) for a NetStateRule."""
    if rule_message.HasField("phase") and rule_message.phase != phase:
        return False
    if rule_message.HasField("min_level") and level < rule_message.min_level:
        return False
    if rule_message.HasField("max_level") and level > rule_message.max_level:
        return False
    if any(stage not in stages for stage in rule_message.stage):
        return False
    if any(stage in stages for stage in rule_message.not_stage):
        return False
    return True


def layers_in_state(pairs, phase, level=0, stages=()):
    """Caffe's Net::FilterNet: the (layer, node) pairs kept for this state. ``phase`` is
    the caffe_pb2 Phase value."""
    kept = []
    for layer, node in pairs:
        included = len(layer.include) == 0
        for rule_message in layer.exclude:
            if state_meets_rule(rule_message, phase, level, stages):
                included = False
        for rule_message in layer.include:
            if state_meets_rule(rule_message, phase, level, stages):
                included = True
        if included:
            kept.append((layer, node))
    return kept


def loss_weights(layer):
    """The loss weight of each top, as Caffe assigns them: explicit ``loss_weight``s, else
    1 for the first top of a built-in loss layer (type ending in 'Loss'), else 0."""
    if len(layer.loss_weight):
        return list(layer.loss_weight)
    if layer.type.endswith("Loss") and len(layer.top):
        return [1.0] + [0.0] * (len(layer.top) - 1)
    return [0.0] * len(layer.top)
