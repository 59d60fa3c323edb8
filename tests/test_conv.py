"""models.conv: Winograd (NNPACK) for wide 3x3 fp32 CPU inference convolutions, nn.Conv2d everywhere else."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import conv as conv_module
from models.conv import Conv2d

C, PIX = conv_module._MIN_CHANNELS, 64  # the smallest layer and map the Winograd path takes


@pytest.fixture
def nnpack_calls(monkeypatch):
    """Counts calls of NNPACK's convolution (still computing them)."""
    calls = []
    real = torch._nnpack_spatial_convolution

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", counting)
    return calls


def _layer():
    torch.manual_seed(0)
    layer = Conv2d(C, C, 3, 1, 1)
    with torch.no_grad():
        layer.weight.mul_(3)  # unit-variance outputs, so the tolerance below is relative
    return layer


def test_wide_inference_convolutions_go_through_winograd_and_agree_with_direct_convolution(nnpack_calls):
    assert conv_module._HAVE_NNPACK  # the x86 CPU wheels this project pins are built with NNPACK
    layer = _layer()
    x = torch.randn(3, C, PIX, PIX, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = layer(x)
        direct = F.conv2d(x, layer.weight, layer.bias, padding=1)
        exact = F.conv2d(x.double(), layer.weight.double(), layer.bias.double(), padding=1)
        alone = layer(x[1:2])
        channels_last = layer(x.contiguous(memory_format=torch.channels_last))
    assert [tuple(s) for s in nnpack_calls] == [(1, C, PIX, PIX)] * 7  # image by image: 3 + 1 + 3
    # Winograd's error is ~10x that of direct convolution (here 1.3e-4 vs 1.3e-5 for outputs up to 9, std 1.7),
    # still 1.5e-5 of the largest output.
    assert exact.std() > 1
    assert (out - exact).abs().max() < 3e-5 * exact.abs().max()
    assert not torch.equal(out, direct)  # it really is another algorithm
    assert torch.equal(alone, out[1:2])  # an image's result does not depend on its batch
    assert torch.equal(channels_last, out)


@pytest.mark.parametrize("case", ["grad", "autocast", "narrow", "small map", "stride 2", "no padding", "dilated",
                                  "grouped", "float64"])
def test_everything_else_stays_nn_conv2d(nnpack_calls, case):
    kwargs = {"stride 2": {"stride": 2}, "no padding": {"padding": 0}, "dilated": {"dilation": 2},
              "grouped": {"groups": 2}}.get(case, {})
    padding = kwargs.pop("padding", 1)
    torch.manual_seed(0)
    c_in = C // 2 if case == "narrow" else C
    layer = Conv2d(c_in, C, 3, padding=padding, **kwargs)
    reference = nn.Conv2d(c_in, C, 3, padding=padding, **kwargs)
    reference.load_state_dict(layer.state_dict())
    pix = PIX // 2 if case == "small map" else PIX
    x = torch.randn(1, c_in, pix, pix)
    if case == "float64":
        layer, reference, x = layer.double(), reference.double(), x.double()
    if case == "grad":
        out = layer(x)
        assert out.requires_grad
        assert torch.equal(out, reference(x))
    else:
        with torch.no_grad():
            if case == "autocast":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    assert layer(x).dtype == torch.bfloat16
            else:
                assert torch.equal(layer(x), reference(x))
    assert nnpack_calls == []


def test_conv2d_module_is_an_nn_conv2d_with_the_same_state_dict():
    torch.manual_seed(0)
    ours = Conv2d(8, 4, 3, 1, 1)
    torch.manual_seed(0)
    theirs = nn.Conv2d(8, 4, 3, 1, 1)
    assert isinstance(ours, nn.Conv2d)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
