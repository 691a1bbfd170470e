import numpy as np
import pytest
import torch

from feedbackcam.data.dataset import ArrayDataset
from feedbackcam.evaluate import evaluate
from feedbackcam.explain import explain


def _data(n=10, size=32, seed=0):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), np.uint8)
    masks[:, 8:24, 8:24] = 1
    has = np.ones(n, bool)
    has[:3] = False
    return ArrayDataset(
        rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        masks,
        rng.integers(0, 3, n),
        has,
        tuple(f"img{i}" for i in range(n)),
        ("NV", "MEL", "BKL"),
    )


def test_evaluate_scores_every_image_and_excludes_those_without_masks(tiny_model):
    data = _data()
    ev = evaluate(tiny_model, data, batch_size=4)
    s = ev.summary()
    assert s["n_test"] == 10 and s["n_without_mask"] == 3 and ev.jaccard.n == 7
    assert ev.probs.shape == (10, 3) and np.allclose(ev.probs.sum(1), 1, atol=1e-5)
    pred = ev.probs.argmax(1)
    assert s["accuracy"] == pytest.approx((pred == data.labels).mean())
    assert ev.explained.shape == (10, 32, 32) and ev.explained.dtype == bool
    # batch size does not change the result
    again = evaluate(tiny_model, data, batch_size=10)
    assert np.array_equal(again.explained, ev.explained)


def test_explain_restores_the_training_mode_and_leaves_no_graph(tiny_model):
    tiny_model.train()
    x = torch.rand(2, 3, 32, 32)
    ex = explain(tiny_model, x, targets=1)
    assert tiny_model.training
    assert not ex.saliency.requires_grad and ex.targets.tolist() == [1, 1]
    assert ex.saliency.shape == (2, 32, 32) and float(ex.saliency.max()) <= 1
    assert not x.requires_grad  # the caller's tensor is not modified


def test_explain_works_for_a_frozen_model(tiny_model):
    for p in tiny_model.parameters():
        p.requires_grad_(False)
    ex = explain(tiny_model, torch.rand(1, 3, 32, 32))
    assert ex.saliency.shape == (1, 32, 32)


def test_array_dataset_validates_shapes():
    data = _data()
    with pytest.raises(ValueError, match="masks"):
        ArrayDataset(
            data.images, data.masks[:, :8], data.labels, data.has_mask, data.ids, data.classes
        )
    with pytest.raises(ValueError, match="labels"):
        ArrayDataset(
            data.images, data.masks, data.labels + 5, data.has_mask, data.ids, data.classes
        )
    sub = data.subset([2, 5])
    assert sub.ids == ("img2", "img5") and len(sub) == 2
