"""The Fisher's label draws (:func:`repq.alloc.fisher.draw_labels`) follow the model's softmax."""

import numpy as np
import torch

from repq.alloc.fisher import draw_labels


def test_draws_follow_the_softmax_and_never_a_zero_probability_class():
    logits = torch.tensor([[2.0, 0.0, -1.0, float("-inf"), 0.5],
                           [0.0, 0.0, 0.0, 0.0, 0.0],
                           [-30.0, 40.0, -30.0, -30.0, -30.0]])
    n = 40_000
    y = draw_labels(logits.repeat_interleave(n, 0), torch.Generator().manual_seed(3)).reshape(3, n)
    p = torch.softmax(logits.double(), -1).numpy()
    for r in range(3):
        freq = np.bincount(y[r].numpy(), minlength=5) / n
        sd = np.sqrt(p[r] * (1 - p[r]) / n)
        assert np.all(np.abs(freq - p[r]) <= 5 * sd + 1e-12), (r, freq, p[r])
    assert not (y[0] == 3).any()            # probability 0
    assert (y[2] == 1).all()                # all but certain


def test_the_generator_decides_the_draws():
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(0))
    a = draw_labels(logits, torch.Generator().manual_seed(5))
    b = draw_labels(logits, torch.Generator().manual_seed(5))
    c = draw_labels(logits, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.int64 and a.shape == (64,) and int(a.max()) < 300


def test_non_finite_logits_are_refused():
    import pytest

    from repq.errors import UsageError

    for bad in (float("nan"), float("-inf")):
        logits = torch.zeros(3, 5)
        logits[1] = bad
        with pytest.raises(UsageError, match="not finite"):
            draw_labels(logits, torch.Generator().manual_seed(0))
