"""``safe_layers.backend``, as earlier releases and users' scripts import it: the same
module object as :mod:`safe_layers.core.backend` (one set of switches, not a copy)."""

import sys

from safe_layers.core import backend

sys.modules[__name__] = backend
