"""The rules of ``safe-layers diagnose``: functions over the run's model
(:class:`~safe_layers.tools.diagnose.diagnosis.Diagnosis`), one module per family.

    SL801 SL811        the learning rate                      (rules/lr.py)
    SL802 SL803 SL807  what the losses did: the cause         (rules/loss.py,
    SL815              or that the log cannot tell it           loss_outputs.py)
    SL804 SL805        debug_info's per-layer lines           (rules/debug_info.py)
    SL806 SL814        our layers' reports, what a watch did  (rules/reports.py)
    SL808              the run aborted                        (rules/aborts.py)
    SL809 SL813        the test net                           (rules/testnet.py)
    SL810              gradient clipping                      (rules/clipping.py)
    SL812              no training iteration                  (rules/no_training.py)
    SL820              the net died without a NaN             (rules/dead.py)

Each family registers its rules, with why each exists, in the one rule table
(:mod:`safe_layers.tools.rule_table`); ``safe-layers diagnose --list-rules`` prints them.
"""

from safe_layers.tools.diagnose.rules import (aborts, clipping, debug_info, loss, lr, no_training,
                                              reports, testnet)
from safe_layers.tools.diagnose.rules import dead


def findings(model):
    """Every finding of the run, in the order they print: a bad learning rate or else the
    cause the losses show, what debug_info and the reports add, how the run ended, then
    the test net, clipping, the rate's end and the run's length."""
    bad_rate = lr.bad_policy(model)
    cause = None
    if bad_rate is None:
        cause = loss.cause(model) if model.first_bad is not None else loss.rising(model)
        cause = cause or dead.died(model)
    found = [bad_rate, cause,
             debug_info.first_layer(model), debug_info.fastest_gradient(model, cause),
             debug_info.first_gradient(model),
             reports.caught(model),
             aborts.fatal(model), aborts.python_error(model), aborts.crash(model),
             reports.watched(model),
             testnet.nonfinite_output(model),
             clipping.clipping(model),
             lr.rate_zero(model),
             no_training.no_training(model),
             testnet.false_accuracy(model)]
    return [f for f in found if f is not None]
