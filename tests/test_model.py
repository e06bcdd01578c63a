import pytest
import torch

from model import UNet, count_parameters


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
