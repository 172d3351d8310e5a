"""The watch's fault records (anomaly/record.py): never over an existing file, never
through a planted link, a second run's record beside the first's, nothing left half
written; the weights it saves are the net's, as Caffe would load them."""

import errno
import os

import numpy as np
import pytest

from safe_layers.anomaly import record
from safe_layers.reporting.watch_lines import Event

NET = """
name: "tiny"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 1 }
    bias_filler { type: "gaussian" std: 1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


def _write(folder, net, iteration=14):
    inputs = {"data": np.arange(12, dtype=np.float32).reshape(4, 3)}
    return record.write_record(str(folder), iteration, Event("skip", iteration, "a test"), inputs,
                               net=net)


def test_planted_links_are_never_followed_and_runs_never_replace_each_other(make_net, tmp_path):
    net = make_net(NET)
    folder = tmp_path / "records"
    folder.mkdir()
    outside = {}
    for suffix in (".json", ".caffemodel", ".inputs.npz"):
        target = tmp_path / ("outside" + suffix)
        target.write_text("not yours")
        outside[suffix] = target
        (folder / ("iter14" + suffix)).symlink_to(target)
    first = _write(folder, net)
    second = _write(folder, net)
    assert first.endswith("iter14-2.json") and second.endswith("iter14-3.json")
    assert all(t.read_text() == "not yours" for t in outside.values())
    document, inputs, weights = record.read_record(first)
    assert document["inputs_file"] == "iter14-2.inputs.npz"
    assert weights.endswith("iter14-2.caffemodel") and inputs["data"][3, 2] == 11
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]


def test_saved_weights_load_as_caffes_own(make_net, tmp_path):
    net = make_net(NET)
    ours = _write(tmp_path, net)
    _, _, weights = record.read_record(ours)
    theirs = tmp_path / "caffe.caffemodel"
    net.save(str(theirs))
    fresh_ours, fresh_theirs = make_net(NET), make_net(NET)
    fresh_ours.copy_from(weights)
    fresh_theirs.copy_from(str(theirs))
    for name in ("fc",):
        for mine, caffes, original in zip(fresh_ours.params[name], fresh_theirs.params[name],
                                          net.params[name]):
            assert np.array_equal(mine.data, original.data)
            assert np.array_equal(caffes.data, original.data)


def test_a_failed_write_is_an_os_error_and_leaves_nothing(make_net, tmp_path, monkeypatch):
    net = make_net(NET)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(record, "weights_proto", full)
    with pytest.raises(OSError):
        _write(tmp_path, net)
    assert os.listdir(tmp_path) == [n for n in os.listdir(tmp_path) if n.startswith("net")]
