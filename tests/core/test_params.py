"""param_str errors surface at net construction, naming layer type, key, value and what is allowed."""

import pytest

from safe_layers.core.params import Field, ParamError, Schema
from safe_layers.core.schemas import SCHEMAS

GUARDED = """
name: "p"
layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ dim: 2 dim: 3 }} }} }}
layer {{ name: "g" type: "Python" bottom: "x" top: "x"
  python_param {{ module: "safe_layers" layer: "NaNGuard" param_str: "{param_str}" }} }}
"""


@pytest.mark.parametrize("param_str, expected", [
    ("{name: g1, acton: abort}",
     "NaNGuard 'g1' param_str: unknown key 'acton'; allowed keys: action, backward_action"),
    ("{action: explode}",
     "NaNGuard param_str: key 'action' has value 'explode'; allowed: one of warn, clamp, abort, zero"),
    ("{max_abs: -1}",
     "NaNGuard param_str: key 'max_abs' has value -1; allowed: a number > 0 and <= 3.4028235e+38"),
    ("{max_abs: big}",
     "NaNGuard param_str: key 'max_abs' has value 'big'; allowed: a number > 0 and <= 3.4028235e+38"),
    ("{log_first: 2.5}",
     "NaNGuard param_str: key 'log_first' has value 2.5; allowed: an integer >= 0"),
    ("{log_every: true}",
     "NaNGuard param_str: key 'log_every' has value True; allowed: an integer >= 1"),
    ("{name: g2, action: zero}",
     "NaNGuard 'g2' param_str: key 'action' has value 'zero', which only a backward pass can do"),
    ("{check: forward, backward_action: zero}",
     "NaNGuard param_str: key 'backward_action' has no effect with check: forward"),
    ("{max_abs: 10, bound: 100}",
     "NaNGuard param_str: key 'bound' (100) must not exceed 'max_abs' (10)"),
    ("[1, 2]",
     "NaNGuard param_str: must be a YAML mapping"),
    ("{action: [warn",
     "NaNGuard param_str: is not valid YAML"),
])
def test_bad_param_str_fails_at_net_construction(make_net, param_str, expected):
    with pytest.raises(ParamError) as info:
        make_net(GUARDED.format(param_str=param_str))
    assert str(info.value).startswith(expected), str(info.value)


def test_good_param_str_builds_and_defaults_apply(make_net):
    net = make_net(GUARDED.format(param_str="{name: g, action: clamp, max_abs: 5}"))
    assert list(net.blobs) == ["x"]


def test_bad_param_str_under_caffe_binary_exits_nonzero_with_the_message(caffe_bin, tmp_path):
    net = tmp_path / "net.prototxt"
    net.write_text(GUARDED.format(param_str="{name: g, check: sideways}"))
    result = caffe_bin("time", "-model", net, "-iterations", "1")
    assert result.returncode != 0
    assert ("NaNGuard 'g' param_str: key 'check' has value 'sideways'; "
            "allowed: one of forward, backward, both") in result.stderr


def test_schema_types_are_strict():
    schema = Schema("Demo", [Field("rate", float, 1.0, "a rate", low=0.0),
                             Field("flag", bool, False, "a flag"),
                             Field("sizes", list, None, "sizes", item_kind=int)])
    assert schema.parse("{rate: 3}").rate == 3.0  # YAML int accepted for a float key
    assert schema.parse("{rate: 1e4}").rate == 1e4  # PyYAML reads 1e4 as a string
    assert schema.parse("").as_dict() == {"rate": 1.0, "flag": False, "sizes": None}
    assert schema.parse("{sizes: [1, 2]}").sizes == [1, 2]
    for bad in ("{rate: .nan}", "{rate: nan}", "{rate: -1}", "{rate: fast}", "{rate: true}", "{flag: 1}", "{sizes: [1, x]}", "{sizes: 3}"):
        with pytest.raises(ParamError, match="Demo param_str: key"):
            schema.parse(bad)


def test_a_key_given_twice_is_an_error_naming_it(make_net):
    with pytest.raises(ParamError) as info:
        make_net(GUARDED.format(param_str="{name: g, action: clamp, max_abs: 5, action: abort}"))
    assert str(info.value) == ("NaNGuard 'g' param_str: key 'action' given more than once (YAML would "
                               "silently keep the last value); give each key once")


def test_a_key_given_twice_fails_under_the_caffe_binary_too(caffe_bin, tmp_path):
    net = tmp_path / "net.prototxt"
    net.write_text(GUARDED.format(param_str="{name: g, action: clamp, action: warn}"))
    result = caffe_bin("time", "-model", net, "-iterations", "1")
    assert result.returncode != 0
    assert "NaNGuard 'g' param_str: key 'action' given more than once" in result.stderr


def _numeric_fields():
    from safe_layers.core.schemas import SCHEMAS
    return [(schema, field) for schema in SCHEMAS.values() for field in schema.fields.values()
            if field.kind in (int, float)]


@pytest.mark.parametrize("schema, field", _numeric_fields(),
                         ids=lambda x: getattr(x, "layer_type", None) or getattr(x, "name", None))
def test_every_numeric_key_has_finite_float32_bounds(schema, field):
    from safe_layers.core.params import FLOAT32_MAX
    assert field.low is not None and field.high is not None
    assert -FLOAT32_MAX <= field.low <= field.high <= FLOAT32_MAX
    for bad in (".inf", "-.inf", ".nan", "1e39", "-1e39", str(10 ** 40)):
        with pytest.raises(ParamError, match=r"key '%s' has value .*; allowed: .* and <= " % field.name):
            schema.parse("{%s: %s}" % (field.name, bad))


@pytest.mark.parametrize("param_str, expected", [
    ("{history: 100000000000000000000}", "GradientClip param_str: key 'history' has value "
                                         "100000000000000000000; allowed: an integer >= 1 and <= 1000000"),
    ("{max_norm: 1, clip: 1e-50, mode: value}", "GradientClip param_str: key 'clip' has value '1e-50' "
                                                "(float32 rounds it to 0); allowed: a number > 0 and"),
])
def test_numbers_out_of_reach_name_the_key(param_str, expected):
    from safe_layers.core.schemas import GRADIENT_CLIP
    with pytest.raises(ParamError) as info:
        GRADIENT_CLIP.parse(param_str)
    assert str(info.value).startswith(expected), str(info.value)


@pytest.mark.parametrize("param_str", ["{action: clamp, max_abs: .inf}", "{action: clamp, nan_value: .inf}",
                                       "{dump_dir: d, dump_max_mb: .inf}", "{bound: 1e39}"])
def test_infinite_guard_params_fail_at_net_construction(make_net, param_str):
    with pytest.raises(ParamError, match=r"^NaNGuard param_str: key '(max_abs|nan_value|dump_max_mb|bound)' "
                                         r"has value (inf|'1e39'); allowed: a number"):
        make_net(GUARDED.format(param_str=param_str))


# --- param_str nobody should write: bounded in time, memory and message length ---------

ALIAS_BOMB = "\n".join(["a0: &a0 [x, x, x, x, x, x, x, x, x]"] +
                       ["a%d: &a%d [*a%d, *a%d, *a%d, *a%d, *a%d, *a%d, *a%d, *a%d, *a%d]"
                        % ((i, i) + (i - 1,) * 9) for i in range(1, 10)])


def test_a_yaml_alias_bomb_is_refused_before_it_is_built():
    assert len(ALIAS_BOMB) < 600  # expands to 9**10 elements if built and printed
    with pytest.raises(ParamError) as caught:
        SCHEMAS["NaNGuard"].parse(ALIAS_BOMB)
    message = str(caught.value)
    assert "uses a YAML alias (*a0)" in message and len(message) < 400


def test_nesting_past_the_bound_is_refused_naming_the_bound():
    deep = "name: g\nmode: " + "[" * 500 + "]" * 500
    with pytest.raises(ParamError, match="nests mappings or lists deeper than 32"):
        SCHEMAS["NaNGuard"].parse(deep)


def test_an_oversized_param_str_is_refused_by_its_length():
    huge = "name: g\n" + "# padding\n" * 10000
    with pytest.raises(ParamError, match=r"is 100008 characters long; at most 65536") as caught:
        SCHEMAS["NaNGuard"].parse(huge)
    assert len(str(caught.value)) < 400


def test_a_long_wrong_value_is_echoed_short():
    with pytest.raises(ParamError) as caught:
        SCHEMAS["NaNGuard"].parse("action: [%s]" % ", ".join(["clamp"] * 5000))
    message = str(caught.value)
    assert message.startswith("NaNGuard param_str: key 'action' has value ['clamp', 'clamp'")
    assert "..." in message and len(message) < 600
