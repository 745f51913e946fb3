"""fastflat.update_bn: torch's own update_bn tests (test/optim/test_swa_utils.py) pass with it, and it takes
any batch (call_fn, pytorch #49082) and, with exact=True, gives the statistics of all the examples."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastflat


class DNN(nn.Module):  # torch's SWATestDNN
    def __init__(self, input_features):
        super().__init__()
        self.n_features = 100
        self.fc1 = nn.Linear(input_features, self.n_features)
        self.bn = nn.BatchNorm1d(self.n_features)

    def compute_preactivation(self, x):
        return self.fc1(x)

    def forward(self, x):
        return self.bn(self.fc1(x))


class CNN(nn.Module):  # torch's SWATestCNN
    def __init__(self, input_channels):
        super().__init__()
        self.n_features = 10
        self.conv1 = nn.Conv2d(input_channels, self.n_features, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(self.n_features, momentum=0.3)

    def compute_preactivation(self, x):
        return self.conv1(x)

    def forward(self, x):
        return self.bn(self.conv1(x))


def _whole_set_statistics(net, loader):
    """Mean and biased variance of every preactivation, over all examples (torch's test computes these)."""
    total, squares, count = torch.zeros(net.n_features), torch.zeros(net.n_features), 0
    for (x, *_) in loader:
        pre = net.compute_preactivation(x)
        pre = pre.transpose(1, 3) if pre.dim() == 4 else pre
        pre = pre.contiguous().view(-1, net.n_features)
        count += pre.shape[0]
        total += pre.sum(0)
        squares += (pre**2).sum(0)
    mean = total / count
    return mean, squares / count - mean**2, count


@pytest.mark.parametrize("make, shape", [(lambda: DNN(5), (100, 5)), (lambda: CNN(3), (100, 3, 5, 5))])
@pytest.mark.parametrize("exact", [False, True])
def test_torchs_update_bn_cases(make, shape, exact):
    """torch's _test_update_bn: after update_bn the running statistics are the data's, with the (x, y)
    loader, after a reset, and with the x-only loader; the training mode is kept."""
    torch.manual_seed(0)
    x, y = torch.rand(*shape), torch.rand(shape[0])
    dl_x = DataLoader(TensorDataset(x), batch_size=5, shuffle=True)
    dl_xy = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True)
    net = make().train()
    with torch.no_grad():
        mean, variance, _ = _whole_set_statistics(net, dl_x)
    for loader in (dl_xy, dl_xy, dl_x):
        net.apply(lambda m: isinstance(m, nn.modules.batchnorm._BatchNorm) and (
            m.running_mean.zero_(), m.running_var.fill_(1.0)))
        fastflat.update_bn(loader, net, device=x.device, exact=exact)
        torch.testing.assert_close(net.bn.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(net.bn.running_var, variance, atol=1e-1, rtol=0)
    assert net.training


def test_torchs_eval_mode_and_momentum_are_kept():
    cnn = CNN(3).eval()
    fastflat.update_bn(DataLoader(TensorDataset(torch.rand(100, 3, 5, 5)), batch_size=5), cnn)
    assert not cnn.training and cnn.bn.momentum == 0.3


def test_the_default_equals_torchs_update_bn_bit_for_bit():
    torch.manual_seed(1)
    batches = [(torch.rand(n, 3, 5, 5),) for n in (8, 8, 3)]
    ours, theirs = CNN(3), CNN(3)
    theirs.load_state_dict(ours.state_dict())
    fastflat.update_bn(batches, ours)
    torch.optim.swa_utils.update_bn(batches, theirs)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)


def test_exact_statistics_weigh_a_short_last_batch_by_its_size():
    """512 + 488 examples: torch's per-batch average is off the examples' mean; exact=True is not."""
    torch.manual_seed(2)
    x = torch.randn(1000, 4) * torch.linspace(1, 3, 1000)[:, None]  # batches with different statistics
    net = nn.BatchNorm1d(4)
    batches = [(x[:512],), (x[512:],)]
    fastflat.update_bn(batches, net)
    cumulative = (net.running_mean - x.mean(0)).abs().max()
    fastflat.update_bn(batches, net, exact=True)
    torch.testing.assert_close(net.running_mean, x.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net.running_var, x.var(0), rtol=1e-5, atol=1e-6)  # unbiased, as BatchNorm keeps
    assert cumulative > 1e-4


def test_any_batch_goes_through_call_fn():
    """pytorch #49082: a model taking keyword inputs, batches of dicts."""
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, *, image, mask):
            return self.bn(image * mask)

    torch.manual_seed(3)
    batches = [{"image": torch.randn(6, 3), "mask": torch.ones(6, 3)} for _ in range(4)]
    net = Keyword()
    fastflat.update_bn(batches, net, call_fn=lambda model, batch: model(**batch), exact=True)
    everything = torch.cat([b["image"] for b in batches])
    torch.testing.assert_close(net.bn.running_mean, everything.mean(0), rtol=1e-5, atol=1e-6)


def test_a_model_without_batchnorm_is_left_alone():
    net = nn.Linear(3, 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fastflat.update_bn([torch.randn(4, 3)], net)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
