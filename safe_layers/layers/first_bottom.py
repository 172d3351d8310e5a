"""What two of the layers share: a gradient for the first bottom only."""

import caffe


class FirstBottomLayer(caffe.Layer):
    """A Caffe Python layer whose backward writes only ``bottom[0]``'s diff (labels, an
    infogain matrix, a scale get none) and runs inside the layer's fault log, so that a
    fault it reports names the backward pass. Subclasses define ``_backward(top, bottom)``
    and set ``self.fault_log`` in ``setup``."""

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        with self.fault_log.running("backward"):
            self._backward(top, bottom)
