"""Array math: pure functions over NumPy or CuPy arrays, no Caffe import."""
