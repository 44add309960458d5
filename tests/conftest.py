import pytest
import torch

from fsg.models import MLP


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def make_task(n=96, d=8, k=3, seed=0):
    """A small learnable classification task: labels = argmax(x·T) for a fixed random T."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    t = torch.randn(d, k, generator=g)
    return x, (x @ t).argmax(1)


def make_mlp(seed=0, d=8, hidden=12, k=3):
    torch.manual_seed(seed)
    return MLP(d, [hidden], k)
