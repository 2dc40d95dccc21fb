import pytest
import torch

from htnet.errors import UserError
from htnet.models import create_model, list_models, model_input


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_registry():
    assert list_models() == ["htnet", "ststnet"]
    assert model_input("htnet") == "face_crops" and model_input("ststnet") == "whole_face"
    with pytest.raises(UserError, match="unknown model 'resnet' \\(known: htnet, ststnet\\)"):
        create_model("resnet")
    with pytest.raises(UserError, match="model htnet has no argument 'depth'"):
        create_model("htnet", depth=3)


def test_paper_config_has_139_6M_parameters():
    model = create_model("htnet")  # image 28, patch 7, dim 256, heads 3, 3 levels, blocks (2, 2, 10)
    assert round(count(model) / 1e6, 1) == 139.6
    with torch.no_grad():
        assert model.eval()(torch.rand(2, 3, 28, 28)).shape == (2, 3)


@pytest.mark.parametrize("config", [
    {"dim": 32, "heads": 2, "block_repeats": (1, 1, 1)},
    {"dim": 16, "heads": 1, "patch_size": 14, "num_hierarchies": 2, "block_repeats": [1, 2]},
    {"dim": 24, "heads": 3, "patch_size": 2, "num_hierarchies": 2, "block_repeats": 1, "num_classes": 5},
    {"dim": 8, "heads": 1, "patch_size": 28, "num_hierarchies": 1, "block_repeats": [1]},
])
def test_htnet_shapes_across_configs(config):
    model = create_model("htnet", **config)
    out = model(torch.rand(3, 3, 28, 28))
    assert out.shape == (3, config.get("num_classes", 3))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_htnet_parameter_names_are_the_reference_ones():
    """The reference Model.HTNet's state_dict keys, for dim 8, 2 levels, blocks (1, 1)."""
    model = create_model("htnet", dim=8, heads=1, patch_size=14, num_hierarchies=2, block_repeats=(1, 1))
    block = ["pos_emb", "layers.0.0.norm.g", "layers.0.0.norm.b", "layers.0.0.fn.to_qkv.weight",
             "layers.0.0.fn.to_out.0.weight", "layers.0.0.fn.to_out.0.bias", "layers.0.1.norm.g",
             "layers.0.1.norm.b", "layers.0.1.fn.net.0.weight", "layers.0.1.fn.net.0.bias",
             "layers.0.1.fn.net.3.weight", "layers.0.1.fn.net.3.bias"]
    expected = (["to_patch_embedding.1.weight", "to_patch_embedding.1.bias"]
                + [f"layers.0.0.{k}" for k in block]
                + ["layers.0.1.0.weight", "layers.0.1.0.bias", "layers.0.1.1.g", "layers.0.1.1.b"]
                + [f"layers.1.0.{k}" for k in block]
                + ["mlp_head.0.g", "mlp_head.0.b", "mlp_head.2.weight", "mlp_head.2.bias"])
    assert list(model.state_dict()) == expected
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["to_patch_embedding.1.weight"] == (8, 3 * 14 * 14, 1, 1)
    assert shapes["layers.1.0.layers.0.0.fn.to_qkv.weight"] == (48, 16, 1, 1)   # level 2: dim 16, 2 heads
    assert shapes["layers.0.1.0.weight"] == (16, 8, 3, 3)                       # Aggregate doubles the width
    assert shapes["mlp_head.2.weight"] == (3, 16)
    # a state_dict round-trip is strict
    create_model("htnet", dim=8, heads=1, patch_size=14, num_hierarchies=2,
                 block_repeats=(1, 1)).load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("config, message", [
    ({"patch_size": 5}, "image_size 28 is not divisible by patch_size 5"),
    ({"num_hierarchies": 4}, "num_hierarchies 4 needs the 4x4 patch grid"),
    ({"block_repeats": (2, 2)}, "block_repeats [2, 2] must be 3 positive integers"),
    ({"block_repeats": (2, 0, 1)}, "block_repeats [2, 0, 1] must be 3 positive integers"),
    ({"dim": 0}, "dim must be a positive integer, got 0"),
    ({"heads": 300}, "heads 300 exceeds dim 256"),
    ({"dropout": 1.5}, "dropout must be a number in [0, 1)"),
])
def test_impossible_htnet_configs_are_rejected_with_the_argument_named(config, message):
    with pytest.raises(UserError) as error:
        create_model("htnet", **config)
    assert message in str(error.value)


def test_ststnet_reference_layout():
    model = create_model("ststnet")
    assert [name for name, _ in model.named_children()] == [
        "conv1", "conv2", "conv3", "relu", "bn1", "bn2", "bn3", "maxpool", "avgpool", "dropout", "fc"]
    assert [model.conv1.out_channels, model.conv2.out_channels, model.conv3.out_channels] == [3, 5, 8]
    assert model.fc.in_features == 400 and model.fc.out_features == 3
    assert count(model) == 3 * (5 + 8 + 3) * 9 + 16 + 2 * 16 + 400 * 3 + 3
    assert model(torch.rand(4, 3, 28, 28)).shape == (4, 3)
