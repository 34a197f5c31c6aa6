import pytest
import torch
import torch.nn.functional as F

from adrec import losses
from adrec.losses import linear_cross_entropy


@pytest.mark.parametrize("chunk", [2**24, 7 * 33], ids=["one-chunk", "many-chunks"])
@pytest.mark.parametrize("freeze_weight", [False, True], ids=["trainable-E", "frozen-E"])
def test_matches_cross_entropy_value_and_gradients(monkeypatch, chunk, freeze_weight):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    h = torch.randn(50, 16, requires_grad=True)
    w = torch.randn(33, 16, requires_grad=not freeze_weight)
    y = torch.randint(1, 33, (50,))
    expected = F.cross_entropy(h @ w.T, y)
    expected.backward()
    gh, gw = h.grad.clone(), None if freeze_weight else w.grad.clone()
    h.grad = None
    if not freeze_weight:
        w.grad = None
    got = linear_cross_entropy(h, w, y)
    (2.5 * got).backward()  # the upstream gradient must scale both results
    assert abs(got.item() - expected.item()) < 1e-5
    assert torch.allclose(h.grad, 2.5 * gh, atol=1e-5)
    if freeze_weight:
        assert w.grad is None
    else:
        assert torch.allclose(w.grad, 2.5 * gw, atol=1e-5)


def test_empty_input_is_an_error():
    with pytest.raises(ValueError, match="at least one position"):
        linear_cross_entropy(torch.zeros(0, 4), torch.zeros(5, 4), torch.zeros(0, dtype=torch.long))
