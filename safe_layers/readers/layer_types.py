"""Caffe layer types by what they do, for every reader and tool that asks.

One list each, so that lint, harden, train and diagnose agree on what a data layer is.
"""

# Bottomless layers whose tops are read from a dataset source (Caffe's data_layer.cpp,
# image_data_layer.cpp, hdf5_data_layer.cpp, window_data_layer.cpp, memory_data_layer.cpp;
# AnnotatedData from SSD's fork, VideoData from C3D's).
SOURCE_DATA = ("Data", "ImageData", "HDF5Data", "WindowData", "MemoryData", "AnnotatedData",
               "VideoData")

# Bottomless layers that make their tops without a source (dummy_data_layer.cpp).
GENERATED_DATA = ("DummyData",)

# The layer Caffe builds for given inputs (input_layer.cpp; net-level ``input:`` fields
# are upgraded to one).
INPUT = ("Input",)

# Every layer that puts data into a net.
ALL_DATA = SOURCE_DATA + GENERATED_DATA + INPUT
