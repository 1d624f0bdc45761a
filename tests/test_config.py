import json

import pytest

import arc_peft
from arc_peft import AdaptMLPConfig, ARCConfig, ConfigError, config_from_dict


def test_defaults_match_the_papers():
    arc = ARCConfig()
    assert (arc.rank, arc.positions, arc.dropout, arc.init, arc.blocks) == (
        50,
        ("attn", "mlp"),
        0.1,
        "paper",
        None,
    )
    mlp = AdaptMLPConfig()
    assert (mlp.bottleneck, mlp.scale, mlp.dropout, mlp.placement, mlp.layernorm) == (
        64,
        0.1,
        0.1,
        "parallel",
        None,
    )


@pytest.mark.parametrize(
    "config",
    [
        ARCConfig(),
        ARCConfig(rank=8, positions=("attn",), dropout=0.0, init="identity", blocks=(-2, -1)),
        AdaptMLPConfig(),
        AdaptMLPConfig(bottleneck=8, scale="learnable", placement="sequential", layernorm="in"),
        AdaptMLPConfig(scale=0.05, layernorm="out", blocks=[0, 3]),
    ],
)
def test_plain_json_round_trip(config):
    text = config.to_json()
    data = json.loads(text)  # plain JSON: no custom types
    assert data["method"] == config.method
    assert config_from_dict(data) == config
    assert type(config).from_json(text) == config
    assert hash(config_from_dict(data)) == hash(config)


def test_configs_are_frozen_and_canonical():
    config = ARCConfig(positions=["mlp", "attn"], blocks=[0, -1])
    assert config.positions == ("attn", "mlp")
    assert config.blocks == (0, -1)
    with pytest.raises(AttributeError):
        config.rank = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (ARCConfig, {"rank": 0}, "rank"),
        (ARCConfig, {"rank": 2.5}, "rank"),
        (ARCConfig, {"rank": True}, "rank"),
        (ARCConfig, {"positions": ()}, "positions"),
        (ARCConfig, {"positions": "attn"}, "positions"),
        (ARCConfig, {"positions": ("attn", "ffn")}, "positions"),
        (ARCConfig, {"positions": ("attn", "attn")}, "positions"),
        (ARCConfig, {"dropout": 1.0}, "dropout"),
        (ARCConfig, {"dropout": -0.1}, "dropout"),
        (ARCConfig, {"init": "xavier"}, "init"),
        (ARCConfig, {"blocks": ()}, "blocks"),
        (ARCConfig, {"blocks": (1, 1)}, "blocks"),
        (ARCConfig, {"blocks": 3}, "blocks"),
        (ARCConfig, {"blocks": ("0",)}, "blocks"),
        (AdaptMLPConfig, {"bottleneck": -4}, "bottleneck"),
        (AdaptMLPConfig, {"scale": "big"}, "scale"),
        (AdaptMLPConfig, {"scale": float("nan")}, "scale"),
        (AdaptMLPConfig, {"placement": "serial"}, "placement"),
        (AdaptMLPConfig, {"layernorm": "both"}, "layernorm"),
        (AdaptMLPConfig, {"dropout": 2}, "dropout"),
    ],
)
def test_bad_values_name_the_field_value_and_what_is_allowed(cls, kwargs, field):
    # ConfigError (a ValueError): one type to catch for every bad config value.
    with pytest.raises(ConfigError, match=rf"{cls.__name__}\.{field}=") as info:
        cls(**kwargs)
    message = str(info.value)
    assert repr(next(iter(kwargs.values())))[:6] in message
    assert "expected" in message


def test_from_dict_rejects_unknown_fields_and_methods():
    with pytest.raises(ConfigError, match="unknown ARCConfig field"):
        config_from_dict({"method": "arc", "rank": 4, "alpha": 2})
    with pytest.raises(ConfigError, match="unknown adapter method 'lora'"):
        config_from_dict({"method": "lora"})
    with pytest.raises(ConfigError, match="must be a JSON object"):
        config_from_dict(["arc"])
    with pytest.raises(ConfigError, match="not 'adaptmlp'"):
        AdaptMLPConfig.from_dict(ARCConfig().to_dict())


def test_public_api_is_explicit():
    assert "inject_arc" in arc_peft.__all__
    for name in arc_peft.__all__:
        assert hasattr(arc_peft, name), name
