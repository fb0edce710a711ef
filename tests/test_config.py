"""CompressionConfig: defaults, parsing, validation messages, pairing rules, derived values."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest

from lightning_compress import COMPRESSORS, FEEDBACKS, TRANSPORTS, CompressionConfig


def test_defaults_are_valid() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the defaults must not even warn
        config = CompressionConfig()
    assert config.compressor in COMPRESSORS
    assert config.feedback in FEEDBACKS
    assert config.transport in TRANSPORTS
    assert 0.0 < config.density <= 1.0
    assert config.make_compressor().name == config.compressor


def test_from_string_names() -> None:
    config = CompressionConfig.from_string("compressor=sign,feedback=doublesqueeze")
    assert config.compressor == "sign"
    assert config.feedback == "doublesqueeze"
    assert config == CompressionConfig(compressor="sign", feedback="doublesqueeze")


def test_from_string_numbers_get_field_types() -> None:
    config = CompressionConfig.from_string("compressor=topk, density=0.05 ,bits=8,warmup_steps=3")
    assert config.compressor == "topk"
    assert config.density == 0.05 and type(config.density) is float
    assert config.bits == 8 and type(config.bits) is int
    assert config.warmup_steps == 3 and type(config.warmup_steps) is int


def test_from_string_diana_alpha_none() -> None:
    config = CompressionConfig.from_string("compressor=randk,feedback=diana,density=0.1,diana_alpha=none")
    assert config.diana_alpha is None
    config = CompressionConfig.from_string("compressor=randk,feedback=diana,density=0.1,diana_alpha=0.5")
    assert config.diana_alpha == 0.5


def test_block_size_default_is_finer_for_doublesqueeze_and_an_explicit_value_wins() -> None:
    assert CompressionConfig().block_size is None
    assert CompressionConfig().block_size_resolved == 1024
    assert CompressionConfig(feedback="doublesqueeze").block_size_resolved == 256
    for feedback in ("ef", "ef21", "none"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sign without feedback warns
            assert CompressionConfig(feedback=feedback).block_size_resolved == 1024
    assert CompressionConfig(feedback="doublesqueeze", block_size=1024).block_size_resolved == 1024
    # the compressor gets the resolved value, for every block compressor
    assert CompressionConfig(feedback="doublesqueeze").make_compressor().block_size == 256
    qsgd = CompressionConfig(compressor="qsgd", bits=8, feedback="doublesqueeze").make_compressor()
    assert qsgd.block_size == 256
    assert CompressionConfig(compressor="qsgd", bits=4, block_size=128).make_compressor().block_size == 128
    # 'none' in the inline form means the default; the dict form round-trips None
    parsed = CompressionConfig.from_string("feedback=doublesqueeze,block_size=none")
    assert parsed.block_size is None and parsed.block_size_resolved == 256
    assert CompressionConfig.from_dict(parsed.to_dict()) == parsed
    with pytest.raises(ValueError, match="block_size"):
        CompressionConfig(block_size=0)
    with pytest.raises(TypeError, match="block_size"):
        CompressionConfig(block_size=256.0)


def test_ef21_step_is_checked_and_reaches_the_scheme() -> None:
    from lightning_compress.feedback import make_feedback

    config = CompressionConfig.from_string("compressor=topk,density=0.01,feedback=ef21,ef21_step=1.3")
    assert config.ef21_step == 1.3 and CompressionConfig.from_dict(config.to_dict()) == config
    assert make_feedback("ef21", config.make_compressor(), ef21_step=config.ef21_step_for(None)).step == 1.3
    # A step set by hand holds with any optimizer.
    assert config.ef21_step_for("sgd") == config.ef21_step_for("adam") == config.ef21_step_for(None) == 1.3
    # None: where EF21's estimate lags (top-k/dgc at 5% or less), 1.1 with SGD's or Adam's momentum in the
    # exchange; 1 without an optimizer's momentum and for every other configuration.
    assert CompressionConfig(feedback="ef21").ef21_step is None
    assert CompressionConfig(feedback="ef21").ef21_step_for("sgd") == 1.0
    for compressor in ("topk", "dgc"):
        sparse = CompressionConfig(compressor=compressor, density=0.05, feedback="ef21")
        assert [sparse.ef21_step_for(kind) for kind in ("sgd", "adam", None)] == [1.1, 1.1, 1.0]
        dense_enough = CompressionConfig(compressor=compressor, density=0.06, feedback="ef21")
        assert dense_enough.ef21_step_for("sgd") == dense_enough.ef21_step_for("adam") == 1.0
    assert CompressionConfig(compressor="topk", density=0.01, feedback="ef21", ef21_step=1).ef21_step_for("sgd") == 1.0
    assert CompressionConfig.from_string("compressor=topk,feedback=ef21,ef21_step=none").ef21_step is None
    # 0 would never move the estimate; 2 and beyond make step * C non-contractive.
    for bad in (0.0, -1.0, 2.0, 3.0, float("nan"), float("inf")):
        _raises_naming("ef21_step", repr(bad), compressor="topk", feedback="ef21", ef21_step=bad)
    with pytest.raises(TypeError, match="ef21_step"):
        CompressionConfig(ef21_step="1.2")


def test_ef21s_default_step_follows_the_optimizer_whose_momentum_is_in_the_exchange() -> None:
    import torch

    from lightning_compress import CompressionState, attach_optimizer

    config = CompressionConfig(compressor="topk", density=0.01, feedback="ef21")
    params = [torch.nn.Parameter(torch.zeros(4))]
    cases = {
        "no optimizer": (None, 1.0),
        "SGD + momentum": (lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9), 1.1),
        "SGD, no momentum (it stays in the optimizer)": (lambda: torch.optim.SGD(params, lr=0.1), 1.0),
        "AdamW": (lambda: torch.optim.AdamW(params, lr=1e-3), 1.1),
        "Adam": (lambda: torch.optim.Adam(params, lr=1e-3), 1.1),
    }
    for label, (make, expected) in cases.items():
        state = CompressionState(config, {id(params[0]): "w"})
        if make is not None:
            attach_optimizer(state, make())
        assert state.ef21_step() == expected, label
    # set by hand, it wins over the optimizer
    state = CompressionState(config.replace(ef21_step=1.0), {id(params[0]): "w"})
    attach_optimizer(state, torch.optim.SGD(params, lr=0.1, momentum=0.9))
    assert state.ef21_step() == 1.0


def _raises_naming(match_option: str, value: str, **kwargs) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError) as info:
            CompressionConfig(**kwargs)
    message = str(info.value)
    assert match_option in message, message
    assert value in message, message


@pytest.mark.parametrize(
    "kwargs, option, value",
    [
        (dict(compressor="gzip"), "compressor", "gzip"),
        (dict(feedback="momentum"), "feedback", "momentum"),
        (dict(transport="carrier_pigeon"), "transport", "carrier_pigeon"),
        (dict(compressor="topk", density=0.0), "density", "0.0"),
        (dict(compressor="topk", density=1.5), "density", "1.5"),
        (dict(compressor="topk", density=math.nan), "density", "nan"),
        (dict(compressor="qsgd", bits=3), "bits", "3"),
        (dict(warmup_steps=-1), "warmup_steps", "-1"),
        (dict(compressor="topk", feedback="diana"), "diana", "topk"),
        (dict(compressor="sign", feedback="diana"), "diana", "sign"),
        (dict(compressor="randk", density=0.01, feedback="ef21"), "ef21", "randk"),
        (dict(compressor="sign", transport="allreduce"), "allreduce", "sign"),
        (dict(compressor="sign", feedback="doublesqueeze", transport="allgather"), "doublesqueeze", "allgather"),
    ],
)
def test_invalid_options_raise_value_error_naming_option_and_value(kwargs, option, value) -> None:
    _raises_naming(option, value, **kwargs)


def test_invalid_option_messages_list_the_allowed_values() -> None:
    with pytest.raises(ValueError) as info:
        CompressionConfig(compressor="gzip")
    assert all(name in str(info.value) for name in COMPRESSORS)
    with pytest.raises(ValueError) as info:
        CompressionConfig(feedback="momentum")
    assert all(name in str(info.value) for name in FEEDBACKS)


def test_unknown_key_in_from_string() -> None:
    with pytest.raises(ValueError, match="colour") as info:
        CompressionConfig.from_string("compressor=sign,colour=blue")
    assert "density" in str(info.value)  # names what is allowed


def test_unknown_key_in_from_dict() -> None:
    with pytest.raises(ValueError, match="colour"):
        CompressionConfig.from_dict({"compressor": "sign", "colour": "blue"})


def test_malformed_item_without_equals() -> None:
    with pytest.raises(ValueError, match="compressor") as info:
        CompressionConfig.from_string("compressor")
    assert "key=value" in str(info.value)
    with pytest.raises(ValueError, match="sign"):
        CompressionConfig.from_string("feedback=ef,sign")


def test_from_string_bad_number_raises_value_error_naming_field() -> None:
    with pytest.raises(ValueError, match="density") as info:
        CompressionConfig.from_string("density=lots")
    assert "lots" in str(info.value)
    with pytest.raises(ValueError, match="bits"):
        CompressionConfig.from_string("bits=4.5")


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(density="x"), "density"),
        (dict(bits=8.0), "bits"),
        (dict(compressor=3), "compressor"),
        (dict(warmup_steps=True), "warmup_steps"),
    ],
)
def test_wrong_type_raises_type_error(kwargs, option) -> None:
    with pytest.raises(TypeError, match=option):
        CompressionConfig(**kwargs)


@pytest.mark.parametrize("compressor", ("topk", "dgc", "sign"))
def test_feedback_none_with_biased_compressor_warns(compressor: str) -> None:
    with pytest.warns(UserWarning, match=compressor):
        CompressionConfig(compressor=compressor, feedback="none")


@pytest.mark.parametrize("compressor", ("none", "fp16", "bf16", "randk", "qsgd"))
def test_feedback_none_with_near_identity_or_unbiased_does_not_warn(compressor: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CompressionConfig(compressor=compressor, feedback="none")


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(compressor="sign", feedback="doublesqueeze"), "two_pass"),
        (dict(compressor="topk", feedback="doublesqueeze"), "two_pass"),
        (dict(compressor="randk", feedback="diana"), "allreduce"),
        (dict(compressor="randk", feedback="none"), "allreduce"),
        (dict(compressor="fp16", feedback="ef"), "allreduce"),
        (dict(compressor="sign", feedback="ef"), "allgather"),
        (dict(compressor="topk", feedback="ef21"), "allgather"),
        (dict(compressor="sign", feedback="ef", transport="two_pass"), "two_pass"),
        (dict(compressor="randk", feedback="diana", transport="allgather"), "allgather"),
    ],
)
def test_transport_resolved(kwargs, expected) -> None:
    assert CompressionConfig(**kwargs).transport_resolved == expected


def test_to_dict_from_dict_roundtrip() -> None:
    config = CompressionConfig(
        compressor="qsgd", bits=4, feedback="diana", block_size=256, warmup_steps=2, seed=7, diana_alpha=0.25
    )
    as_dict = config.to_dict()
    assert as_dict["compressor"] == "qsgd" and as_dict["bits"] == 4 and as_dict["diana_alpha"] == 0.25
    assert set(as_dict) == {f.name for f in dataclasses.fields(CompressionConfig)}
    assert all(isinstance(v, (str, int, float, type(None))) for v in as_dict.values())
    assert CompressionConfig.from_dict(as_dict) == config


def test_to_string_roundtrip_through_from_string() -> None:
    config = CompressionConfig(compressor="topk", density=0.05, feedback="ef21", warmup_steps=3)
    text = ",".join(f"{k}={v}" for k, v in config.to_dict().items())
    assert CompressionConfig.from_string(text) == config


def test_frozen() -> None:
    config = CompressionConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.density = 0.5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.compressor = "topk"  # type: ignore[misc]
    assert config.density == CompressionConfig().density


def test_replace_validates_and_copies() -> None:
    config = CompressionConfig(compressor="topk", density=0.05)
    other = config.replace(density=0.2)
    assert other.density == 0.2 and config.density == 0.05
    with pytest.raises(ValueError, match="density"):
        config.replace(density=2.0)
    with pytest.raises(ValueError, match="diana"):
        config.replace(feedback="diana")
    with pytest.raises(TypeError, match="bits"):
        config.replace(bits="8")


def test_make_compressor_carries_settings() -> None:
    config = CompressionConfig(compressor="qsgd", bits=4, block_size=128, feedback="diana")
    comp = config.make_compressor()
    assert comp.name == "qsgd" and comp.bits == 4 and comp.block_size == 128


def test_density_warmup_schedule_and_its_rules() -> None:
    # DGC's schedule (Lin et al. 2018): 75%, 93.75%, 98.4375%, 99.6% sparsity, then the target of 99.9%.
    cfg = CompressionConfig(compressor="topk", density=0.001, density_warmup_steps=40, warmup_steps=5)
    assert [cfg.density_at(s) for s in (0, 4, 5, 14, 15, 25, 35, 44, 45, 1000)] == [
        0.001, 0.001, 0.25, 0.25, 0.0625, 0.015625, 0.00390625, 0.00390625, 0.001, 0.001,
    ]  # fmt: skip (the dense steps before it keep `density`: their compressor is not used)
    assert CompressionConfig(compressor="dgc", density=0.5, density_warmup_steps=9).density_at(0) == 0.5
    assert CompressionConfig(compressor="randk", density=0.1, feedback="diana", density_warmup_steps=2).density_at(1) == 0.25
    # By default 100 steps for topk and dgc below 25%; off for randk, for densities from 25% and when set to 0.
    for compressor in ("topk", "dgc"):
        default = CompressionConfig(compressor=compressor, density=0.01)
        assert default.density_warmup_steps is None and default.density_warmup_steps_resolved == 100
        assert [default.density_at(s) for s in (0, 33, 34, 66, 67, 99, 100)] == [
            0.25, 0.25, 0.0625, 0.0625, 0.015625, 0.015625, 0.01,
        ]  # fmt: skip
    assert CompressionConfig(compressor="topk", density=0.01, density_warmup_steps=0).density_at(0) == 0.01
    assert CompressionConfig(compressor="topk", density=0.25).density_warmup_steps_resolved == 0
    assert CompressionConfig(compressor="randk", density=0.01, feedback="diana").density_at(0) == 0.01
    assert CompressionConfig(compressor="sign").density_warmup_steps_resolved == 0
    assert CompressionConfig.from_string("compressor=topk,density_warmup_steps=none").density_warmup_steps is None
    assert CompressionConfig.from_string("compressor=topk,density_warmup_steps=69").density_warmup_steps == 69
    with pytest.raises(ValueError, match="`density_warmup_steps` must be >= 0"):
        CompressionConfig(compressor="topk", density_warmup_steps=-1)
    for compressor in ("sign", "qsgd", "powersgd", "fp16"):
        with pytest.raises(ValueError, match="warms up the density of"):
            CompressionConfig(compressor=compressor, density_warmup_steps=10)


def test_gravac_refuses_a_density_warmup() -> None:
    from lightning_compress import CompressionState
    from lightning_compress.adaptive import attach_gravac

    state = CompressionState(CompressionConfig(compressor="topk", density_warmup_steps=10), {})
    with pytest.raises(ValueError, match="density warm-up"):
        attach_gravac(state)
    assert state.adaptive is None
    # The default warm-up (unset) gives way to GraVAC, which picks the density from the first step.
    state = CompressionState(CompressionConfig(compressor="topk", density=0.01), {})
    assert state.compressor.density == 0.25
    attach_gravac(state)
    assert state.config.density_warmup_steps_resolved == 0 and state.compressor.density == 0.01


def test_a_new_density_keeps_the_length_of_the_default_warmup() -> None:
    from lightning_compress import CompressionState

    # request_update changes the default warm-up's target, not its length (100 from 1%, none from 25%).
    for start, length, now in ((0.01, 100, 0.25), (0.25, 0, 0.05)):
        state = CompressionState(CompressionConfig(compressor="topk", density=start), {})
        state.request_update(density=0.05)
        state.finish_step()
        assert state.config.density_warmup_steps_resolved == length and state.compressor.density == now
