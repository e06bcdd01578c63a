"""The ResNet encoders (model.ResNetEncoder, model.ResNetUNet): torchvision's names and shapes, any
input size, the same values with every speed and memory switch, checkpoints of either model; and
their ImageNet weights (pretrained.py): loaded exactly, or a one-line error that loads nothing."""
import copy
import hashlib
import json

import pytest
import torch

import pretrained
import utils
from conftest import ROOT
from model import ResNetEncoder, ResNetUNet, UNet, build_model
from pretrained import PretrainedWeightsError, load_pretrained, normalization
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
                                 "decoder_widths": (256, 128, 64, 32, 16),
                                 "normalization": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


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


def random_weights(shapes):
    """Random tensors with those names and shapes, as a torchvision file holds them."""
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            weights[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            weights[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            weights[key] = torch.randn(shape, generator=generator)
    return weights


def own_shapes(name):
    """The encoder's names and shapes (the test above: torchvision's) with torchvision's fc.*."""
    shapes = {key: value.shape for key, value in ResNetEncoder(name).state_dict().items()}
    return {**shapes, "fc.weight": (1000, shapes["layer4.1.bn2.weight"][0]), "fc.bias": (1000,)}


@pytest.fixture(scope="module")
def resnet18_weights():
    return random_weights(own_shapes("resnet18"))


def assert_loaded(model, weights):
    encoder = model.encoder.state_dict()
    for key, value in weights.items():
        if not key.startswith("fc."):
            assert torch.equal(encoder[key], value), key


def test_normalization_is_imagenets_for_the_resnets_and_none_for_the_unet():
    assert normalization("resnet34") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert normalization("unet") == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="unknown encoder 'vgg11'"):
        normalization("vgg11")


def test_a_file_with_torchvisions_names_and_shapes_loads_every_tensor(tmp_path):
    weights = random_weights(reference("resnet18"))  # fc.* included, as in torchvision's file
    torch.save(weights, tmp_path / "resnet18.pth")
    model = ResNetUNet("resnet18")
    decoder = copy.deepcopy(model.decoder.state_dict())
    assert load_pretrained(model, str(tmp_path / "resnet18.pth")) == str(tmp_path / "resnet18.pth")
    assert_loaded(model, weights)
    for key, value in model.decoder.state_dict().items():  # the decoder is left as it was
        assert torch.equal(value, decoder[key])


def test_a_file_saved_before_batchnorm_counted_its_batches_loads_too(tmp_path, resnet18_weights):
    weights = {k: v for k, v in resnet18_weights.items() if not k.endswith("num_batches_tracked")}
    torch.save(weights, tmp_path / "old.pth")
    model = ResNetUNet("resnet18")
    load_pretrained(model, tmp_path / "old.pth")
    assert_loaded(model, weights)


def wrong_shape(weights):
    return {**weights, "layer2.0.conv1.weight": torch.zeros(128, 32, 3, 3)}


def with_nan(weights):
    return {**weights, "bn1.bias": torch.full((64,), float("nan"))}


@pytest.mark.parametrize("change, message", [
    (wrong_shape, (r"layer2\.0\.conv1\.weight has shape \(128, 32, 3, 3\) where resnet18 has "
                   r"\(128, 64, 3, 3\)")),
    (lambda w: {k: v for k, v in w.items() if k != "layer3.1.bn1.bias"},
     r"not torchvision's resnet18 weights: names 1 missing \(such as layer3\.1\.bn1\.bias\)"),
    (lambda w: {**w, "layer5.0.conv1.weight": torch.zeros(1)}, r"1 unexpected \(such as layer5"),
    (with_nan, "bn1.bias holds NaN or infinite values"),
    (lambda w: list(w.values()), "holds a list that is not a state dict of tensors"),
    (lambda w: {"state_dict": w}, "holds a dict that is not a state dict of tensors"),
    ("truncated", r"not a readable weights file \(.*\); download https://\S+resnet18-\S+ again"),
    ("text", r"not a readable weights file \(not written by torch.save, or holding more than"),
    ("absent", "no such weights file"),
])
def test_files_that_do_not_fit_are_one_line_errors_that_load_nothing(tmp_path, resnet18_weights,
                                                                     change, message):
    path = tmp_path / "weights.pth"
    if change == "truncated":
        torch.save(resnet18_weights, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif change == "text":
        path.write_text("<html>a download page saved by mistake</html>\n")
    elif change != "absent":
        torch.save(change(resnet18_weights), path)
    model = ResNetUNet("resnet18")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PretrainedWeightsError, match=message) as error:
        load_pretrained(model, str(path))
    assert "\n" not in str(error.value) and str(path) in str(error.value)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_resnet18_weights_for_a_resnet34_name_what_is_missing(tmp_path, resnet18_weights):
    torch.save(resnet18_weights, tmp_path / "resnet18.pth")
    # 8 more blocks of 2 convolutions and 2 BatchNorms (4 tensors each, the counter not counted)
    with pytest.raises(PretrainedWeightsError, match="names 80 missing .*layer1.2.conv1.weight"):
        load_pretrained(ResNetUNet("resnet34"), tmp_path / "resnet18.pth")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """torch's hub cache in tmp_path, as TORCH_HOME sets it: where "imagenet" downloads go."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert torch.hub.get_dir() == str(tmp_path / "torch" / "hub")
    return tmp_path / "torch" / "hub" / "checkpoints"


def served(monkeypatch, url):
    """The table's resnet18 URL replaced by url."""
    monkeypatch.setitem(pretrained.IMAGENET_URLS, "resnet18", url)


def test_imagenet_weights_download_once_into_the_hub_cache(tmp_path, monkeypatch, hub,
                                                           resnet18_weights):
    torch.save(resnet18_weights, tmp_path / "file.pth")
    digest = hashlib.sha256((tmp_path / "file.pth").read_bytes()).hexdigest()
    source = tmp_path / f"resnet18-{digest[:8]}.pth"  # the name carries its hash, as torchvision's
    (tmp_path / "file.pth").rename(source)
    served(monkeypatch, source.as_uri())
    model = ResNetUNet("resnet18")
    assert load_pretrained(model, "imagenet") == source.as_uri()
    assert_loaded(model, resnet18_weights)
    assert [path.name for path in hub.iterdir()] == [source.name]
    source.unlink()  # the second time, from the cache: nothing downloaded
    model = ResNetUNet("resnet18")
    load_pretrained(model, "imagenet")
    assert_loaded(model, resnet18_weights)


def test_a_download_with_the_wrong_hash_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, hub):
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "resnet18-00000000.pth")
    served(monkeypatch, (tmp_path / "resnet18-00000000.pth").as_uri())
    expected = 'not the expected one .*expected "00000000"'
    with pytest.raises(PretrainedWeightsError, match=expected) as error:
        load_pretrained(ResNetUNet("resnet18"), "imagenet")
    assert "\n" not in str(error.value) and "ENCODER_WEIGHTS" in str(error.value)
    assert list(hub.iterdir()) == []


def test_a_machine_without_internet_gets_one_line_naming_the_url(monkeypatch, hub):
    url = "http://127.0.0.1:9/resnet18-12345678.pth"  # the discard port: nothing listens
    served(monkeypatch, url)
    expected = f"cannot download {url} .*ENCODER_WEIGHTS"
    with pytest.raises(PretrainedWeightsError, match=expected) as error:
        load_pretrained(ResNetUNet("resnet18"), "imagenet")
    assert "\n" not in str(error.value) and str(hub / "resnet18-12345678.pth") in str(error.value)


def test_a_damaged_file_in_the_cache_is_named_with_what_to_do(monkeypatch, hub):
    hub.mkdir(parents=True)
    (hub / "resnet18-12345678.pth").write_bytes(b"PK\x03\x04 half a file")
    served(monkeypatch, "http://127.0.0.1:9/resnet18-12345678.pth")
    expected = "resnet18-12345678.pth: not a readable weights file .*delete it to download it again"
    with pytest.raises(PretrainedWeightsError, match=expected):
        load_pretrained(ResNetUNet("resnet18"), "imagenet")


def test_the_plain_unet_takes_no_pretrained_weights():
    model = UNet(features=(4, 8))
    assert load_pretrained(model, "none") == "none"
    with pytest.raises(PretrainedWeightsError, match="plain UNet has no pretrained weights"):
        load_pretrained(model, "imagenet")
