"""The schema bundled for scan and diagnose without pycaffe is Caffe's own."""

from google.protobuf import descriptor_pb2, text_format

from safe_layers.readers import prototxt


def test_the_bundled_schema_is_the_installed_caffes(caffe):
    from caffe.proto import caffe_pb2
    bundled = descriptor_pb2.FileDescriptorSet()
    with open(prototxt.BUNDLED_SCHEMA, "rb") as f:
        bundled.ParseFromString(f.read())
    installed = descriptor_pb2.FileDescriptorProto()
    installed.ParseFromString(caffe_pb2.DESCRIPTOR.serialized_pb)
    assert list(bundled.file) == [installed]


def test_the_bundled_schema_reads_what_caffe_pb2_reads(caffe):
    from caffe.proto import caffe_pb2
    schema = prototxt.bundled_schema()
    text = ('name: "n" layer { name: "d" type: "Data" top: "x" '
            'data_param { source: "db" backend: LMDB batch_size: 4 } }')
    ours = text_format.Parse(text, schema.NetParameter())
    theirs = text_format.Parse(text, caffe_pb2.NetParameter())
    assert ours.SerializeToString() == theirs.SerializeToString()
    assert schema.DataParameter.LMDB == caffe_pb2.DataParameter.LMDB
    assert not schema.from_caller  # Caffe's own schema: the installed Caffe can build the nets
