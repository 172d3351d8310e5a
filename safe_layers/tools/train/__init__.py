"""``safe-layers train``: :mod:`.command` checks the input and spawns :mod:`.child`, the
training process (Caffe's ``Solver::Solve`` one step at a time under a watch), so that a
Caffe ``LOG(FATAL)`` kills the child and never the tool."""
