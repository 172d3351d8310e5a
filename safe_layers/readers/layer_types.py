"""Caffe layer types by what they do, for every reader and tool that asks.

One list each, so that lint, harden, train and diagnose agree on what a data layer is.
"""

# Bottomless layers whose tops are read from a dataset source (Caffe's data_layer.cpp,
# image_data_layer.cpp, hdf5_data_layer.cpp, window_data_layer.cpp, memory_data_layer.cpp;
# AnnotatedData from SSD's fork, VideoData from C3D's, DenseImageData from SegNet's).
SOURCE_DATA = ("Data", "ImageData", "HDF5Data", "WindowData", "MemoryData", "AnnotatedData",
               "VideoData", "DenseImageData")

# Bottomless layers that make their tops without a source (dummy_data_layer.cpp).
GENERATED_DATA = ("DummyData",)

# The layer Caffe builds for given inputs (input_layer.cpp; net-level ``input:`` fields
# are upgraded to one).
INPUT = ("Input",)

# Every layer that puts data into a net.
ALL_DATA = SOURCE_DATA + GENERATED_DATA + INPUT


# Fields and layer types of the Caffe forks production nets are written for, which BVLC
# Caffe's schema and layer registry lack. A file holding them is read (the fields kept as
# written, left out of the parsed message), and what could not be known is named; a name
# outside these lists is a mistake Caffe itself would refuse (ReadProtoFromTextFile,
# io.cpp:38; "Unknown layer type", layer_factory.hpp:81).
FORK_FIELDS = frozenset((
    # py-faster-rcnn
    "roi_pooling_param", "smooth_l1_loss_param",
    # SSD (weiliu89/caffe) and MobileNet-SSD
    "annotated_data_param", "resize_param", "distort_param", "expand_param", "emit_constraint",
    "noise_param", "save_output_param", "permute_param", "prior_box_param", "multibox_loss_param",
    "detection_output_param", "detection_evaluate_param", "normalize_param", "video_data_param",
    "eval_type", "ap_version", "show_per_class_ap", "label_map_file", "batch_sampler",
    "force_color", "force_gray",
    # SegNet / ENet
    "dense_image_data_param", "bn_param", "upsample_param", "weight_by_label_freqs",
    "class_weighting", "scale_train", "sample_weights_test",
    # DenseNet's and other forks' pooling, OpenPose
    "ceil_mode", "cpm_transform_param", "interp_param",
))
FORK_TYPES = frozenset((
    "ROIPooling", "SmoothL1Loss", "Permute", "PriorBox", "MultiBoxLoss", "DetectionOutput",
    "DetectionEvaluate", "Normalize", "AnnotatedData", "VideoData", "DenseImageData", "BN",
    "Upsample", "Interp", "CPMData", "DepthwiseConvolution", "ConvolutionDepthwise", "ShuffleChannel",
    "Axpy", "ReLU6", "Proposal",
))

# Normalization layers that divide by a batch statistic: BatchNorm (batch_norm_layer.cpp:
# x / sqrt(var + eps)) and SegNet's and ENet's BN, the same computation under its own name.
NORMALIZATION = ("BatchNorm", "BN")
