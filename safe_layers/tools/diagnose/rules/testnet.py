"""SL809, SL813: the test net's outputs (``Test net output #i``, solver.cpp:414)."""

from safe_layers.readers import layer_types
from safe_layers.tools import rule_table
from safe_layers.tools.diagnose.rules.evidence import finding
from safe_layers.tools.diagnose.series import fmt

TEST_NONFINITE = rule_table.rule("diagnose", "SL809", "error",
                                 "a test net non-finite while training stayed finite", """
    A test pass computed a non-finite output while the training iterations around it
    stayed finite: the cause is in what only the test net has, its data or its TEST-only
    layers. BatchNorm uses its stored statistics in TEST (batch_norm_layer.cpp:14): with
    test_initialization (on by default, caffe.proto:145) the first test pass runs before
    any training, at zero statistics, and outputs x/sqrt(eps). A test output that went
    non-finite only after training did is left to the training finding.""")

FALSE_ACCURACY = rule_table.rule("diagnose", "SL813", "warning",
                                 "an accuracy beside a non-finite test loss", """
    Caffe's Accuracy layer counts a sample as correct when fewer than top_k other classes
    score >= the true class (AccuracyLayer::Forward_cpu, accuracy_layer.cpp:73-81).
    Every comparison with a NaN is false: a sample whose scores are NaN has no better
    prediction and counts as correct, so a dead net scores 1.0. An accuracy printed
    beside a non-finite test loss is therefore not an accuracy; judge the run by the
    loss.""")


def nonfinite_output(model):
    """SL809: a test output non-finite while training stayed finite."""
    if model.test_bad is None:
        return None
    if model.first_bad is not None:
        trained = model.first_bad[0]
        if trained.line < model.test_bad.line:
            return None  # training died first; the test outputs only follow it
        if trained.iteration is not None and trained.iteration <= model.test_bad.iteration:
            # The test pass of iteration N runs before training iteration N, on the same
            # weights: both went non-finite there, and the training finding says why.
            return None
    batchnorm = [l.name for l in model.nets.get("TEST").layers if l.type == "BatchNorm"] \
        if model.nets.get("TEST") is not None else []
    why = (": BatchNorm layers (%s) at untrained statistics output x/sqrt(eps) in the test pass "
           "before any training (StableBatchNorm does not)" % ", ".join(batchnorm[:5])
           if batchnorm else "")
    message = ("test net output '%s' = %s at iteration %s while training stayed finite%s"
               % (model.test_bad_name, fmt(model.test_bad.value), model.test_bad.iteration, why))
    fix = "look at the test net's data and its TEST-only layers"
    sources = [l.params.get("data_param.source") or l.params.get("hdf5_data_param.source")
               for l in (model.nets["TEST"].layers if "TEST" in model.nets else [])
               if l.type in layer_types.ALL_DATA]
    sources = [source for source in sources if source]
    if sources:
        fix = "scan the test data: %s" % "; ".join("`safe-layers scan %s`" % s for s in sources)
    return finding(model, TEST_NONFINITE, "error", model.test_bad, message, fix, [model.test_bad],
                   output=model.test_bad_name)


def false_accuracy(model):
    """SL813: test passes whose accuracy sat beside a non-finite test loss."""
    seen = model.false_accuracy
    if seen is None:
        return None
    (accuracy_name, accuracy), (loss_name, loss) = seen["first"]
    (_, last), (_, last_loss) = seen["last"]
    message = ("test output '%s' = %s at iteration %s beside the test loss '%s' = %s overstates: "
               "Caffe's Accuracy layer counts every sample whose true-class score is NaN as correct "
               "(no score compares >= a NaN), so a net whose every score is NaN scores 1.0"
               % (accuracy_name, fmt(accuracy.value), accuracy.iteration, loss_name, fmt(loss.value)))
    if seen["passes"] > 1:
        message += "; %d test passes read so, the last at iteration %s (%s = %s)" % (
            seen["passes"], last.iteration, accuracy_name, fmt(last.value))
    fix = ("judge the run by its test loss; keep NaN out of the test net's scores (a NaNGuard "
           "with action: abort before the Accuracy layer, or `safe-layers train`)")
    evidence = [accuracy, loss] + ([last, last_loss] if seen["passes"] > 1 else [])
    return finding(model, FALSE_ACCURACY, "warning", accuracy, message, fix, evidence,
                   output=accuracy_name, passes=seen["passes"])
