"""models.linear: oneDNN for small fp32 CPU inference inputs, F.linear everywhere else; same numbers to rounding."""
import torch
import torch.nn.functional as F
from torch import nn

from models import linear as linear_module
from models.linear import Linear, linear


def _onednn(x, weight, bias):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def test_small_inference_inputs_go_through_onednn_and_agree_with_f_linear():
    assert linear_module._HAVE_ONEDNN  # the CPU wheels this project pins are built with oneDNN
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    for shape in ((3, 64), (2, 5, 64), (2, 64, 64)):  # 3, 10 and 128 rows
        x = torch.randn(*shape, generator=g)
        for b in (bias, None):
            with torch.no_grad():
                out = linear(x, weight, b)
            assert torch.equal(out, _onednn(x, weight, b))
            torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
    x = torch.randn(4, 8, 64, generator=g).transpose(0, 1)  # non-contiguous input
    with torch.no_grad():
        torch.testing.assert_close(linear(x, weight, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_training_large_inputs_and_autocast_keep_f_linear():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(32, 16, generator=g, requires_grad=True)
    x = torch.randn(3, 16, generator=g)
    out = linear(x, weight)  # autograd on: F.linear, differentiable
    assert torch.equal(out, F.linear(x, weight)) and out.requires_grad
    out.sum().backward()
    torch.testing.assert_close(weight.grad, x.sum(0).expand(32, 16))
    big = torch.randn(linear_module._ONEDNN_MAX_ROWS + 1, 16, generator=g)
    with torch.no_grad():
        assert torch.equal(linear(big, weight), F.linear(big, weight))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert linear(x, weight).dtype == torch.bfloat16  # autocast still applies


def test_linear_module_is_an_nn_linear_with_the_same_state_dict():
    torch.manual_seed(0)
    ours = Linear(16, 8)
    torch.manual_seed(0)
    theirs = nn.Linear(16, 8)
    assert isinstance(ours, nn.Linear) and ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_linear_under_torch_compile():
    """Inside torch.compile the CPU backend picks its own kernel (it cannot lower oneDNN's op for weights that are
    not graph constants): the compiled module runs and agrees with eager."""
    torch.manual_seed(0)
    layer = Linear(16, 8)
    compiled = torch.compile(layer)
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
