"""Which layers Caffe keeps in a net state, what each top weighs in the loss and which
bottoms a loss sends its gradient to (``net.cpp``: ``Net::FilterNet``,
``Net::StateMeetsRule``, ``AppendBottom``; ``layer.hpp``: ``SetLossWeights``)."""


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


def is_loss(layer):
    """Whether the layer adds to the net's loss: a top of nonzero weight, or a loss layer
    (type ending in 'Loss') written with no top, which Caffe gives one automatic top of
    weight 1 (net.cpp:112, AutoTopBlobs; AppendTop's "(automatic)"; loss_layer.cpp:11)."""
    if any(loss_weights(layer)):
        return True
    return not len(layer.top) and not len(layer.loss_weight) and layer.type.endswith("Loss")


# The bottoms each loss type sends a gradient to; its Backward refuses the others
# ("cannot backpropagate to label inputs") or leaves them alone.
LOSS_GRADIENT_BOTTOMS = {
    "SoftmaxWithLoss": (0,),          # softmax_loss_layer.cpp:120
    "SigmoidCrossEntropyLoss": (0,),  # sigmoid_cross_entropy_loss_layer.cpp:107
    "InfogainLoss": (0,),             # infogain_loss_layer.cpp:171 and 175 (labels, H)
    "MultinomialLogisticLoss": (0,),  # multinomial_logistic_loss_layer.cpp:40
    "HingeLoss": (0,),                # hinge_loss_layer.cpp:45
    "EuclideanLoss": (0, 1),          # euclidean_loss_layer.cpp:34: both, opposite signs
    "ContrastiveLoss": (0, 1),        # contrastive_loss_layer.cpp:70: the two features, not the similarity
    # py-faster-rcnn: its Backward would write bottom 1 too, but bottom 1 holds the regression
    # targets (a data or target layer's top, which learns nothing).
    "SmoothL1Loss": (0,),
    "MultiBoxLoss": (0, 1),           # SSD: locations and confidences (priors and labels refuse)
}


def gradient_bottoms(layer):
    """The indices of the bottoms a loss layer sends a gradient to: those its
    ``propagate_down`` fields name, when given (net.cpp AppendBottom: they decide alone),
    else those of its type (:data:`LOSS_GRADIENT_BOTTOMS`; a type not there: bottom 0)."""
    if len(layer.propagate_down):
        chosen = [i for i, down in enumerate(layer.propagate_down) if down]
    else:
        chosen = LOSS_GRADIENT_BOTTOMS.get(layer.type, (0,))
    return [i for i in chosen if i < len(layer.bottom)]
