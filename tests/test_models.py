"""Backbones: exact upstream architectures (entry names, shapes, parameter counts) and interface."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from iicrepro import cli
from iicrepro.errors import UserError
from iicrepro.models import BACKBONES, build_backbone, count_parameters, describe
from iicrepro.models.r21d import mid_channels

UPSTREAM_KEYS = Path(__file__).parent / "data" / "upstream-checkpoint-keys.tsv"

# spec 8: learnable parameters without and with a 101-class head, width 1
PARAMS = {
    "c3d": (27_661_440, 27_713_253),
    "r3d": (14_361_792, 14_413_605),
    "r21d": (14_365_303, 14_417_116),
    "r3d18": (33_166_272, 33_166_272 + 512 * 101 + 101),
}


def meta_model(name: str, **kwargs):
    """Built on the meta device: real module structure, no memory, no arithmetic."""
    with torch.device("meta"):
        return build_backbone(name, **kwargs).eval()


def upstream_entries(model: str) -> list[tuple[str, tuple[int, ...]]]:
    entries = []
    for line in UPSTREAM_KEYS.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, key, shape = line.split("\t")
        if name == model:
            entries.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    return entries


@pytest.mark.parametrize("name", BACKBONES)
def test_parameter_counts_match_spec(name):
    without, with_head = PARAMS[name]
    assert count_parameters(meta_model(name)) == without
    assert count_parameters(meta_model(name, num_classes=101)) == with_head


@pytest.mark.parametrize("name", ["c3d", "r3d", "r21d"])
def test_state_dict_names_and_shapes_are_upstreams(name):
    expected = upstream_entries(name)
    assert len(expected) > 50
    ours = [(k, tuple(v.shape)) for k, v in meta_model(name, num_classes=101).state_dict().items()]
    assert ours == expected  # same names, shapes and order as upstream's state dict
    headless = [k for k, _ in expected if not k.startswith("linear.")]
    assert list(meta_model(name).state_dict()) == headless


@pytest.mark.parametrize("name", BACKBONES)
def test_paper_clip_shapes(name):
    x = torch.empty(1, 3, 16, 112, 112, device="meta")
    model = meta_model(name)
    assert model.out_dim == 512
    assert tuple(model(x).shape) == (1, 512)
    assert tuple(model.conv_map(x).shape) == (1, 512, 2, 7, 7)
    assert tuple(model.retrieval_features(x).shape) == (1, 9216)
    assert tuple(model.retrieval_features(x, conv_pool=False).shape) == (1, 512 * 2 * 7 * 7)
    assert tuple(meta_model(name, num_classes=101)(x).shape) == (1, 101)


@pytest.mark.parametrize("name", ["c3d", "r3d", "r21d"])
def test_real_forward_is_consistent_across_outputs(name):
    torch.manual_seed(0)
    model = build_backbone(name, width=0.125, num_classes=7).eval()
    x = torch.rand(2, 3, 16, 112, 112)
    with torch.no_grad():
        conv = model.conv_map(x)
        assert conv.shape == (2, 64, 2, 7, 7)
        pooled = model.features(x)
        torch.testing.assert_close(pooled, conv.mean(dim=(2, 3, 4)))
        torch.testing.assert_close(model(x), model.linear(pooled))
        retrieval = model.retrieval_features(x)
        assert retrieval.shape == (2, 64 * 2 * 3 * 3)
        # max over each 2x2 spatial window of the first 6x6 (floor), per channel and time step
        manual = conv[..., :6, :6].unflatten(4, (3, 2)).unflatten(3, (3, 2)).amax(dim=(4, 6))
        torch.testing.assert_close(retrieval, manual.flatten(1))
        torch.testing.assert_close(model.retrieval_features(x, conv_pool=False), conv.flatten(1))
        # the two clips are treated independently
        torch.testing.assert_close(model(x[1:]), model(x)[1:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["c3d", "r3d"])
@pytest.mark.parametrize("width", [0.5, 0.3])
def test_width_scales_every_channel(name, width):
    full = meta_model(name).state_dict()
    narrow = meta_model(name, width=width).state_dict()
    assert list(full) == list(narrow)

    def scale(c: int) -> int:
        return c if c == 3 else max(1, round(c * width))  # RGB input stays 3

    for key, t in full.items():
        shape = tuple(t.shape)
        if len(shape) == 5:  # conv weight: out, in, kernel
            expected = (scale(shape[0]), scale(shape[1]), *shape[2:])
        else:
            expected = tuple(scale(c) for c in shape)
        assert tuple(narrow[key].shape) == expected, key
    assert meta_model(name, width=width).out_dim == round(512 * width)


def test_r21d_mid_channels_follow_formula_at_any_width():
    for width in (1.0, 0.25):
        sd = meta_model("r21d", width=width).state_dict()
        spatial = [k for k in sd if k.endswith("spatial_conv.weight")]
        assert len(spatial) == 12  # stem + 8 block convs + 3 shortcut projections
        for key in spatial:
            mid, cin, _, kh, kw = sd[key].shape
            cout, mid_t, kt, _, _ = sd[key.replace("spatial_conv", "temporal_conv")].shape
            assert mid == mid_t == mid_channels((kt, kh, kw), cin, cout)
    assert mid_channels((3, 7, 7), 3, 64) == 83  # the stem quirk of spec 8


def test_tiny_width_keeps_at_least_one_channel():
    model = build_backbone("r3d", width=0.001)
    assert model.out_dim == 1
    assert model.conv1.temporal_spatial_conv.weight.shape[0] == 1


@pytest.mark.parametrize("kwargs", [{"width": 0.5}, {"width": 2.0}])
def test_r3d18_only_at_width_one(kwargs):
    with pytest.raises(UserError, match="width 1.0"):
        build_backbone("r3d18", **kwargs)


def test_bad_names_and_widths_are_user_errors():
    with pytest.raises(UserError, match="c3d, r3d, r21d, r3d18"):
        build_backbone("resnet50")
    with pytest.raises(UserError, match="positive"):
        build_backbone("r3d", width=0)


def test_small_input_recipe_model():
    """notes/synthetic-recipe.md: width 0.25 R3D, 8x40x40 clip -> 128x1x2x2 map, ~0.9 M params."""
    torch.manual_seed(0)
    model = build_backbone("r3d", width=0.25, small_input=True).eval()
    assert 0.85e6 < count_parameters(model) < 0.95e6
    conv1 = model.conv1.temporal_spatial_conv
    assert conv1.kernel_size == (3, 3, 3) and conv1.stride == (1, 2, 2)
    assert model.conv2.block1.downsampleconv.temporal_spatial_conv.stride == (1, 2, 2)
    x = torch.rand(3, 3, 8, 40, 40)
    with torch.no_grad():
        assert model.conv_map(x).shape == (3, 128, 1, 2, 2)
        assert model(x).shape == (3, 128)
        assert model.retrieval_features(x, conv_pool=False).shape == (3, 512)


@pytest.mark.parametrize("name", BACKBONES)
def test_small_input_final_map_for_every_backbone(name):
    width = 1.0 if name == "r3d18" else 0.25
    x = torch.empty(2, 3, 8, 40, 40, device="meta")
    conv = meta_model(name, width=width, small_input=True).conv_map(x)
    assert tuple(conv.shape) == (2, round(512 * width), 1, 2, 2)


def test_models_cli_table(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    for name, (without, with_head) in PARAMS.items():
        assert rows[name][1:] == [f"{without:,}", f"{with_head:,}", "512", "512x2x7x7", "9216"]


def test_models_cli_narrow_width_marks_r3d18(capsys):
    assert cli.main(["models", "--width", "0.5"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["r3d18"][1] == "n/a"
    assert rows["r3d"][1] == f"{count_parameters(meta_model('r3d', width=0.5)):,}"
    assert rows["r3d"][3:5] == ["256", "256x2x7x7"]


def test_describe_small_clip():
    d = describe("r21d", width=0.25, small_input=True, clip=(8, 40, 40))
    assert d["conv_map"] == (128, 1, 2, 2) and d["retrieval_dim"] == 128
    assert d["params_head101"] - d["params"] == 128 * 101 + 101
