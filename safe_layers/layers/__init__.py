"""Caffe Python layers: thin adapters from blobs to the kernels."""
