"""Write ResNet-50 as Caffe prototxts: the deploy net and a train_val net.

The architecture is ResNet-50 of He, Zhang, Ren and Sun, "Deep Residual Learning for Image
Recognition" (CVPR 2016, Table 1), in the layout the authors published for Caffe
(github.com/KaimingHe/deep-residual-networks, ResNet-50-deploy.prototxt): layer names
conv1 / bn_conv1 / scale_conv1, res2a_branch1, res2a_branch2a..c, bn*/scale* after every
convolution, BatchNorm in place with ``use_global_stats: true`` followed by
``Scale { bias_term: true }``, the stride in the first 1x1 convolution of stages 3-5,
convolutions without bias. 53 BatchNorm layers in all. This script writes that layout
itself; it is not a copy of the published file.

    python tests/data/make_resnet50.py      # rewrites resnet50_deploy.prototxt and
                                             # resnet50_train_val.prototxt beside it

The train_val variant is how such nets are trained from scratch in Caffe: ImageNet LMDB
Data layers (paths as in Caffe's examples/imagenet), BatchNorm with Caffe's phase default
(batch statistics in TRAIN, stored ones in TEST) and the customary three
``param { lr_mult: 0 }``, SoftmaxWithLoss, top-1/top-5 Accuracy in TEST.
"""

import sys
from pathlib import Path

STAGES = [("2", 3, 64, 256), ("3", 4, 128, 512), ("4", 6, 256, 1024), ("5", 3, 512, 2048)]


def conv(name, bottom, num_output, kernel, stride=1, pad=0, bias=False):
    bias_text = "" if bias else "\n\t\tbias_term: false"
    return ('layer {\n\tbottom: "%s"\n\ttop: "%s"\n\tname: "%s"\n\ttype: "Convolution"\n'
            '\tconvolution_param {\n\t\tnum_output: %d\n\t\tkernel_size: %d\n\t\tpad: %d\n'
            '\t\tstride: %d%s\n\t}\n}\n\n' % (bottom, name, name, num_output, kernel, pad, stride, bias_text))


def batch_norm(suffix, blob, variant):
    if variant == "deploy":
        bn = ('layer {\n\tbottom: "%s"\n\ttop: "%s"\n\tname: "bn%s"\n\ttype: "BatchNorm"\n'
              '\tbatch_norm_param {\n\t\tuse_global_stats: true\n\t}\n}\n\n' % (blob, blob, suffix))
    else:
        bn = ('layer {\n\tbottom: "%s"\n\ttop: "%s"\n\tname: "bn%s"\n\ttype: "BatchNorm"\n'
              '\tparam { lr_mult: 0 }\n\tparam { lr_mult: 0 }\n\tparam { lr_mult: 0 }\n}\n\n'
              % (blob, blob, suffix))
    scale = ('layer {\n\tbottom: "%s"\n\ttop: "%s"\n\tname: "scale%s"\n\ttype: "Scale"\n'
             '\tscale_param {\n\t\tbias_term: true\n\t}\n}\n\n' % (blob, blob, suffix))
    return bn + scale


def relu(name, blob):
    return 'layer {\n\tbottom: "%s"\n\ttop: "%s"\n\tname: "%s"\n\ttype: "ReLU"\n}\n\n' % (blob, blob, name)


def block(stage, letter, bottom, width, out, first, variant):
    name = "res%s%s" % (stage, letter)
    stride = 2 if (first and stage != "2") else 1
    text = ""
    if first:
        text += conv(name + "_branch1", bottom, out, 1, stride)
        text += batch_norm(stage + letter + "_branch1", name + "_branch1", variant)
        shortcut = name + "_branch1"
    else:
        shortcut = bottom
    previous = bottom
    for part, (num, kernel, part_stride, pad) in zip("abc", [(width, 1, stride, 0), (width, 3, 1, 1),
                                                               (out, 1, 1, 0)]):
        branch = "%s_branch2%s" % (name, part)
        text += conv(branch, previous, num, kernel, part_stride, pad)
        text += batch_norm("%s%s_branch2%s" % (stage, letter, part), branch, variant)
        if part != "c":
            text += relu(branch + "_relu", branch)
        previous = branch
    text += ('layer {\n\tbottom: "%s"\n\tbottom: "%s"\n\ttop: "%s"\n\tname: "%s"\n\ttype: "Eltwise"\n}\n\n'
             % (shortcut, previous, name, name))
    text += relu(name + "_relu", name)
    return text, name


def data_layers(variant):
    if variant == "deploy":
        return 'name: "ResNet-50"\ninput: "data"\ninput_dim: 1\ninput_dim: 3\ninput_dim: 224\ninput_dim: 224\n\n'
    text = 'name: "ResNet-50"\n'
    for phase, source, mirror, batch in (("TRAIN", "ilsvrc12_train_lmdb", "true", 32),
                                         ("TEST", "ilsvrc12_val_lmdb", "false", 10)):
        text += ('layer {\n\tname: "data"\n\ttype: "Data"\n\ttop: "data"\n\ttop: "label"\n'
                 '\tinclude {\n\t\tphase: %s\n\t}\n\ttransform_param {\n\t\tmirror: %s\n'
                 '\t\tcrop_size: 224\n\t\tmean_value: 104\n\t\tmean_value: 117\n\t\tmean_value: 123\n\t}\n'
                 '\tdata_param {\n\t\tsource: "examples/imagenet/%s"\n\t\tbatch_size: %d\n'
                 '\t\tbackend: LMDB\n\t}\n}\n\n' % (phase, mirror, source, batch))
    return text


def head(variant):
    text = ('layer {\n\tbottom: "pool5"\n\ttop: "fc1000"\n\tname: "fc1000"\n\ttype: "InnerProduct"\n'
            '\tinner_product_param {\n\t\tnum_output: 1000\n\t}\n}\n\n')
    if variant == "deploy":
        return text + 'layer {\n\tbottom: "fc1000"\n\ttop: "prob"\n\tname: "prob"\n\ttype: "Softmax"\n}\n\n'
    text += ('layer {\n\tbottom: "fc1000"\n\tbottom: "label"\n\ttop: "loss"\n\tname: "loss"\n'
             '\ttype: "SoftmaxWithLoss"\n}\n\n')
    for name, k in (("accuracy_top1", 1), ("accuracy_top5", 5)):
        text += ('layer {\n\tbottom: "fc1000"\n\tbottom: "label"\n\ttop: "%s"\n\tname: "%s"\n'
                 '\ttype: "Accuracy"\n\tinclude {\n\t\tphase: TEST\n\t}\n'
                 '\taccuracy_param {\n\t\ttop_k: %d\n\t}\n}\n\n' % (name, name, k))
    return text


def resnet50(variant):
    text = ("# ResNet-50 (%s), written by tests/data/make_resnet50.py: the architecture of He et al.\n"
            "# 2016 in the layout of KaimingHe/deep-residual-networks' published Caffe prototxts.\n"
            % variant)
    text += data_layers(variant)
    text += conv("conv1", "data", 64, 7, 2, 3, bias=True)
    text += batch_norm("_conv1", "conv1", variant)
    text += relu("conv1_relu", "conv1")
    text += ('layer {\n\tbottom: "conv1"\n\ttop: "pool1"\n\tname: "pool1"\n\ttype: "Pooling"\n'
             '\tpooling_param {\n\t\tkernel_size: 3\n\t\tstride: 2\n\t\tpool: MAX\n\t}\n}\n\n')
    bottom = "pool1"
    for stage, blocks, width, out in STAGES:
        for i in range(blocks):
            part, bottom = block(stage, "abcdef"[i], bottom, width, out, i == 0, variant)
            text += part
    text += ('layer {\n\tbottom: "%s"\n\ttop: "pool5"\n\tname: "pool5"\n\ttype: "Pooling"\n'
             '\tpooling_param {\n\t\tkernel_size: 7\n\t\tstride: 1\n\t\tpool: AVE\n\t}\n}\n\n' % bottom)
    return text + head(variant)


if __name__ == "__main__":
    here = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    for variant in ("deploy", "train_val"):
        (here / ("resnet50_%s.prototxt" % variant)).write_text(resnet50(variant))
