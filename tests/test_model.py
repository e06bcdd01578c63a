import pytest
import torch

from model import ResNetUNet, UNet


def count_parameters(model):
    return sum(parameter.numel() for parameter in model.parameters())


def test_default_unet_is_the_classic_31m_parameter_model():
    model = UNet()
    assert 30_000_000 < count_parameters(model) < 32_000_000
    assert model.bottleneck[0].out_channels == 1024
    assert model.head.out_channels == 1 and model.downs[0][0].in_channels == 3


@pytest.mark.parametrize("height, width", [(37, 53), (64, 64), (161, 243)])
def test_logits_have_the_input_size_for_odd_and_even_sizes(height, width):
    model = UNet(features=(4, 8, 16, 32)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, height, width))
    assert out.shape == (2, 1, height, width)


def test_full_carvana_resolution():
    model = UNet(features=(2, 4, 8, 16)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 1280, 1918))
    assert out.shape == (1, 1, 1280, 1918)


def test_features_set_the_widths_and_depth():
    model = UNet(features=(8, 16, 32))
    assert len(model.downs) == 3 and model.bottleneck[0].out_channels == 64
    assert count_parameters(model) < count_parameters(UNet(features=(8, 16, 32, 64)))


def test_too_small_input_is_a_clear_error():
    with pytest.raises(ValueError, match="smaller than 16x16"):
        UNet(features=(4, 8, 16, 32))(torch.randn(1, 3, 8, 40))


def test_skip_connections_carry_fine_detail():
    """A one-pixel change reaches the output at that pixel through the first skip connection."""
    torch.manual_seed(0)
    model = UNet(features=(4, 8)).eval()
    x = torch.randn(1, 3, 32, 32)
    y = x.clone()
    y[0, :, 5, 7] += 5.0
    with torch.no_grad():
        difference = (model(y) - model(x)).abs()[0, 0]
    # Far outside the receptive field only round-off remains, orders of magnitude smaller.
    assert difference[5, 7] > 1000 * difference[20:, 20:].max()


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_matrix_product_upsampling_equals_the_transposed_convolution(dtype):
    """model.transposed_conv_as_matmul, the CPU path: same outputs and the same gradients (input, weight, bias) as the
    ConvTranspose2d it stands in for, in float32 and under bfloat16 autocast, odd sizes included."""
    from model import transposed_conv_as_matmul

    torch.manual_seed(0)
    up = torch.nn.ConvTranspose2d(12, 5, kernel_size=2, stride=2).to(memory_format=torch.channels_last)
    x = torch.randn(3, 12, 7, 9).contiguous(memory_format=torch.channels_last)
    results = []
    for function in (up, lambda x: transposed_conv_as_matmul(up, x)):
        up.zero_grad()
        inputs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            y = function(inputs)
        (y.float() * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        results.append((y.float(), inputs.grad, up.weight.grad.clone(), up.bias.grad.clone()))
    (y, *gradients), (expected, *expected_gradients) = results[1], results[0]
    assert y.shape == (3, 5, 14, 18) and y.is_contiguous(memory_format=torch.channels_last)
    tolerance = 1e-4 if dtype is None else 3e-2  # sums in another order
    torch.testing.assert_close(y, expected, atol=tolerance, rtol=tolerance)
    for got, want in zip(gradients, expected_gradients):
        torch.testing.assert_close(got.float(), want.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("make, tolerance", [(lambda: UNet(features=(4, 8, 16, 32)), 1e-5),
                                             (lambda: ResNetUNet("resnet18"), 1e-4)])
def test_models_with_both_memory_layouts_give_the_same_logits(make, tolerance):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        expected = model(x)
        model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("features", [(4, 8, 8), (16, 8), (6, 10, 12)])
def test_widths_that_do_not_double_work_too(features):
    model = UNet(features=features)
    assert model(torch.randn(2, 3, 32, 48)).shape == (2, 1, 32, 48)
