"""The opt-in C stem kernels (htnet.kernels, HTNET_CPU_KERNELS=1) give the pure-PyTorch path's
results: the stem's forward outputs, its gradients, and a whole grouped STSTNet training step."""
import shutil

import pytest
import torch

from htnet import kernels
from htnet.models import create_model
from htnet.models.grouped import _StemFn, grouped_model

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the kernels cannot be built here")


@pytest.fixture
def switch(monkeypatch):
    """switch(on): HTNET_CPU_KERNELS for the models run next (the built library is cached)."""
    def set_kernels(on):
        monkeypatch.setenv("HTNET_CPU_KERNELS", "1" if on else "0")
        return kernels.cpu_kernels()
    return set_kernels


def test_off_by_default(monkeypatch):
    monkeypatch.delenv("HTNET_CPU_KERNELS", raising=False)
    assert kernels.cpu_kernels() is None


def stem(x, weight, bias):
    weight = weight.clone().requires_grad_()
    bias = bias.clone().requires_grad_()
    s1, s2, pmax, _ = _StemFn.apply(x, weight, bias, False)
    (s1.sum() * 0.3 + (s2 * 1e-3).sum() + (pmax * torch.linspace(-1, 1, pmax.shape[1])[None, :, None, None]).sum()).backward()
    return s1, s2, pmax, weight.grad, bias.grad


def test_stem_kernels_match_pytorch(switch):
    torch.manual_seed(0)
    x = (torch.rand(7, 3, 28, 28) * 255).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(48, 3, 3, 3) * 0.05, torch.randn(48) * 0.1
    assert switch(True) is not None, "the kernels did not build"
    with_kernels = stem(x, weight, bias)
    switch(False)
    without = stem(x, weight, bias)
    for a, b in zip(with_kernels, without):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


def test_grouped_training_step_is_the_same_with_and_without_kernels(switch):
    torch.manual_seed(1)
    states = [create_model("ststnet").state_dict() for _ in range(3)]
    x, y = torch.rand(16, 3, 28, 28) * 255, torch.randint(0, 3, (16,))
    mask = torch.ones(16, 3)
    mask[:4, 0] = 0

    def step():
        model = grouped_model("ststnet", states, {}).train()
        model.dropout.p = 0.0
        logits = model(x, mask)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 3), y[:, None].expand(16, 3).reshape(-1))
        loss.backward()
        return logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    assert switch(True) is not None
    logits_on, grads_on = step()
    switch(False)
    logits_off, grads_off = step()
    torch.testing.assert_close(logits_on, logits_off, rtol=1e-4, atol=1e-4)
    for key in grads_off:
        torch.testing.assert_close(grads_on[key], grads_off[key], rtol=1e-3,
                                   atol=1e-5 * grads_off[key].abs().max().item())
