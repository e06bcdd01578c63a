"""The ResNet encoders (model.ResNetEncoder, model.ResNetUNet): torchvision's names and shapes, any
input size, the same values with every speed and memory switch, checkpoints of either model."""
import copy
import json

import pytest
import torch

import utils
from conftest import ROOT
from model import ResNetEncoder, ResNetUNet, UNet, build_model
from utils import CheckpointError, load_checkpoint, save_checkpoint

REFERENCE = ROOT.parent / "shared" / "reference" / "torchvision_resnet_state_dicts.json"
ENCODERS = ["resnet18", "resnet34", "resnet50"]


def reference(name):
    """{name: shape} of torchvision's ResNet state dict, fc.* included, from ../shared."""
    if not REFERENCE.is_file():
        pytest.skip("../shared/reference is absent")
    return {key: tuple(shape) for key, shape in json.loads(REFERENCE.read_text())[name].items()}


@pytest.mark.parametrize("name", ENCODERS)
def test_encoder_has_torchvisions_names_and_shapes_without_the_classifier(name):
    expected = {key: shape for key, shape in reference(name).items() if not key.startswith("fc.")}
    got = {key: tuple(value.shape) for key, value in ResNetEncoder(name).state_dict().items()}
    assert sorted(set(expected) - set(got)) == [] and sorted(set(got) - set(expected)) == []
    assert got == expected


@pytest.mark.parametrize("name, sizes", [("resnet18", [(100, 150), (160, 240), (20, 30)]),
                                         ("resnet34", [(100, 150), (160, 240)]),
                                         ("resnet50", [(64, 64)])])
def test_logits_have_the_input_size_whatever_it_is(name, sizes):
    model = ResNetUNet(name).eval()
    for height, width in sizes:  # 20x30 is too small to reflect up to 32: replicated instead
        with torch.no_grad():
            out = model(torch.randn(2, 3, height, width))
        assert out.shape == (2, 1, height, width) and torch.isfinite(out).all()


def test_the_decoder_joins_every_stage_and_the_head_is_the_optimizers_head_group():
    model = ResNetUNet("resnet50", out_channels=2)
    joined = [block[0].in_channels for block in model.decoder]
    assert joined == [2048 + 1024, 256 + 512, 128 + 256, 64 + 64, 32]  # strides 16, 8, 4, 2, none
    head = [name for name, _ in model.named_parameters() if name.startswith("head.")]
    assert head == ["head.weight", "head.bias"]  # train.make_optimizer's "head." group
    assert model.head.out_channels == 2 and model.model_args["encoder"] == "resnet50"


def test_unknown_encoder_is_a_clear_error():
    with pytest.raises(ValueError, match="'resnet101': use one of resnet18, resnet34, resnet50"):
        ResNetUNet("resnet101")


def gradients(model, x, dtype):
    model.zero_grad()
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(x).float()
    (out ** 2).mean().backward()
    return [out.detach()] + [parameter.grad.clone() for parameter in model.parameters()]


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_activation_checkpointing_gives_the_same_outputs_gradients_and_statistics(dtype):
    torch.manual_seed(0)
    plain = ResNetUNet("resnet18").to(memory_format=torch.channels_last)
    saving = copy.deepcopy(plain)
    saving.activation_checkpointing = True
    x = torch.rand(2, 3, 50, 70).contiguous(memory_format=torch.channels_last)  # padded to 64x96
    for got, want in zip(gradients(saving, x, dtype), gradients(plain, x, dtype)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    for got, want in zip(saving.buffers(), plain.buffers()):  # the rerun leaves them alone
        assert torch.equal(got, want)
    assert plain.encoder.layer4[1].bn2.num_batches_tracked == 1  # one step counted, not two


def test_both_memory_layouts_give_the_same_logits():
    torch.manual_seed(0)
    model = ResNetUNet("resnet18").eval()
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        expected = model(x)
        model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixed_precision_logits_are_close_to_float32(dtype):
    torch.manual_seed(0)
    model = ResNetUNet("resnet18").eval().to(memory_format=torch.channels_last)
    x, device = torch.rand(1, 3, 64, 96), torch.device("cpu")
    with torch.no_grad():
        expected = utils.forward(model, x, device)
        got = utils.forward(model, x, device, dtype)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().mean() < 0.05 * expected.abs().mean()


def test_build_model_rebuilds_either_model_from_its_model_args():
    unet = build_model({"in_channels": 3, "out_channels": 1, "features": (4, 8)},
                       matmul_upsampling=False, activation_checkpointing=True)
    assert type(unet) is UNet and unet.activation_checkpointing and not unet.matmul_upsampling
    resnet = build_model({"encoder": "resnet18", "out_channels": 1}, matmul_upsampling=True,
                         activation_checkpointing=True)
    assert type(resnet) is ResNetUNet and resnet.activation_checkpointing
    assert build_model(resnet.model_args).model_args == resnet.model_args
    assert resnet.model_args == {"encoder": "resnet18", "out_channels": 1,
                                 "decoder_widths": (256, 128, 64, 32, 16)}


def test_checkpoint_round_trip_of_a_resnet_unet_with_prefixes(tmp_path):
    torch.manual_seed(0)
    model = ResNetUNet("resnet18", decoder_widths=(32, 16, 16, 8, 8)).eval()
    state = {"model": {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()},
             "model_args": model.model_args}
    save_checkpoint(state, tmp_path / "x.pt")
    loaded = utils.model_from_checkpoint(load_checkpoint(tmp_path / "x.pt"))
    x = torch.rand(1, 3, 40, 56)
    with torch.no_grad():
        assert type(loaded) is ResNetUNet and torch.equal(loaded(x), model(x))


def test_an_old_unet_checkpoint_still_loads(tmp_path):
    model = UNet(features=(4, 8)).eval()
    state = {"model": model.state_dict(), "model_args": dict(model.model_args)}
    save_checkpoint(state, tmp_path / "x.pt")
    loaded = utils.model_from_checkpoint(load_checkpoint(tmp_path / "x.pt"))
    x = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        assert type(loaded) is UNet and torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("model_args, reason", [
    ({"encoder": "resnet101"}, "unknown encoder"),
    ({"encoder": "resnet18", "features": (4,)}, "features"),
    ({"encoder": "resnet34"}, "do not fit ResNetUNet")])
def test_checkpoints_that_do_not_fit_are_one_line_errors(model_args, reason):
    weights = ResNetUNet("resnet18").state_dict()  # under resnet34's arguments: too few blocks
    with pytest.raises(CheckpointError, match=reason) as error:
        utils.model_from_checkpoint({"model": weights, "model_args": model_args})
    assert "\n" not in str(error.value)
