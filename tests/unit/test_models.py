import pytest
import torch

from htnet.errors import UserError
from htnet.models import create_model, list_models, model_input


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_registry():
    assert list_models() == ["dual_inception", "htnet", "offapexnet", "ststnet"]
    assert model_input("htnet") == "face_crops"
    assert {model_input(name) for name in ("ststnet", "offapexnet", "dual_inception")} == {"whole_face"}
    known = "dual_inception, htnet, offapexnet, ststnet"
    with pytest.raises(UserError, match=f"unknown model 'resnet' \\(known: {known}\\)"):
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


def test_offapexnet_layout_and_streams():
    """Two streams (u, v) of conv 5x5 (6, 16) + 2x2 max-pool, then FC 1024, FC 1024, FC 3: 2.66M parameters
    (the STSTNet paper's rerun states 2.77M)."""
    model = create_model("offapexnet").eval()
    assert [model.u_stream[0].kernel_size, model.u_stream[0].out_channels, model.u_stream[3].out_channels] == \
        [(5, 5), 6, 16]
    assert [m.out_features for m in model.classifier if isinstance(m, torch.nn.Linear)] == [1024, 1024, 3]
    assert count(model) == 2 * (6 * 25 + 6 + 16 * 6 * 25 + 16) + 1568 * 1024 + 1024 + 1024 * 1025 + 1024 * 3 + 3
    x = torch.rand(4, 3, 28, 28) * 255
    with torch.no_grad():
        out = model(x)
        assert out.shape == (4, 3)
        strain_changed = x.clone()
        strain_changed[:, 0] = 0          # channel 0 (optical strain) is unused; 1 (v) and 2 (u) are read
        torch.testing.assert_close(model(strain_changed), out)
        for channel in (1, 2):
            moved = x.clone()
            moved[:, channel] = 0
            assert not torch.allclose(model(moved), out)


def test_dual_inception_layout_and_streams():
    """Per stream two inception blocks (6, then 16 filters per branch; 1x1, 3x3, 5x5, pool) with 2x2 max-pooling;
    FC 1024 and the output: 6.45M parameters, no dropout (the released code's)."""
    model = create_model("dual_inception").eval()
    block = model.u_stream[0]
    assert [branch[-2].kernel_size for branch in block.branches] == [(1, 1), (3, 3), (5, 5), (1, 1)]
    assert {branch[-2].out_channels for branch in block.branches} == {6}
    assert {branch[-2].out_channels for branch in model.v_stream[2].branches} == {16}
    assert model.classifier[0].in_features == 2 * 64 * 7 * 7 and model.classifier[2].p == 0.0
    assert count(model) == 6_449_867
    x = torch.rand(4, 3, 28, 28) * 255
    with torch.no_grad():
        out = model(x)
        no_strain = x.clone()
        no_strain[:, 0] = 0
        torch.testing.assert_close(model(no_strain), out)
    model.train()(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name, config, message", [
    ("offapexnet", {"dropout": 1.0}, "offapexnet: dropout must be a number in [0, 1), got 1.0"),
    ("offapexnet", {"hidden": 0}, "offapexnet: hidden must be a positive integer, got 0"),
    ("dual_inception", {"num_classes": 2.5}, "dual_inception: num_classes must be a positive integer, got 2.5"),
    ("dual_inception", {"in_channels": 3}, "model dual_inception has no argument 'in_channels'"),
])
def test_baseline_configs_are_checked(name, config, message):
    with pytest.raises(UserError) as error:
        create_model(name, **config)
    assert str(error.value) == message
