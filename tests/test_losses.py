import pytest
import torch
import torch.nn.functional as F

from feedbackcam import losses


def _masks():
    m = torch.zeros(1, 4, 4)
    m[0, :2] = 1  # top half
    return m


def test_jaccard_loss_values():
    m = _masks()
    assert losses.jaccard_loss(m.clone(), m).item() == pytest.approx(0.0)
    assert losses.jaccard_loss(1 - m, m).item() == pytest.approx(1.0)
    y = torch.zeros(1, 4, 4)
    y[0, :1] = 1  # a quarter of the image: J = 4 / 8
    assert losses.soft_jaccard(y, m).item() == pytest.approx(0.5)
    assert losses.jaccard_loss(y, m).item() == pytest.approx(0.25)
    soft = torch.full((1, 4, 4), 0.5)  # J = 0.5*8 / (8 + 16*0.5 - 0.5*8) = 4/12
    assert losses.soft_jaccard(soft, m).item() == pytest.approx(1 / 3)


def test_dice_energy_and_mse_values():
    m = _masks()
    y = torch.zeros(1, 4, 4)
    y[0, :1] = 1
    assert losses.dice_loss(y, m).item() == pytest.approx(1 - 2 * 4 / 12)
    inside_and_out = torch.zeros(1, 4, 4)
    inside_and_out[0, 0, 0] = 3.0
    inside_and_out[0, 3, 3] = 1.0
    assert losses.outside_energy_loss(inside_and_out, m).item() == pytest.approx(0.25)
    assert losses.outside_energy_loss(torch.zeros(1, 4, 4), m).item() == 0.0
    target = torch.rand(1, 4, 4)
    assert losses.map_mse_loss(target, target).item() == 0.0
    assert losses.map_mse_loss(torch.zeros(1, 4, 4), target).item() == pytest.approx(
        target.pow(2).mean().item()
    )


def test_rrr_penalises_only_gradients_outside_the_mask():
    m = _masks()
    grads = torch.zeros(1, 3, 4, 4)
    grads[0, :, :2] = 5.0  # inside the mask: free
    assert losses.rrr_loss(grads, m).item() == 0.0
    grads[0, 0, 3, 3] = 2.0
    assert losses.rrr_loss(grads, m).item() == pytest.approx(4.0 / 16)


def test_input_gradients_need_an_input_that_requires_grad():
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    logits = (x.flatten(1) @ torch.rand(48, 3)) * 1.0
    g = losses.input_gradients(logits, x)
    assert g.shape == x.shape and g.requires_grad
    with pytest.raises(ValueError, match="require grad"):
        losses.input_gradients(logits, x.detach())


def test_combined_loss_endpoints_and_validation():
    cls, exp = torch.tensor(2.0), torch.tensor(0.5)
    assert losses.combined_loss(cls, exp, 0.0) == cls
    assert losses.combined_loss(cls, exp, 1.0) == exp
    assert losses.combined_loss(cls, exp, 0.3).item() == pytest.approx(0.7 * 2 + 0.3 * 0.5)
    with pytest.raises(ValueError, match="lambda"):
        losses.combined_loss(cls, exp, 1.5)


def test_class_weights_change_the_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    assert losses.classification_loss(logits, labels) == F.cross_entropy(logits, labels)
    w = losses.classification_loss(logits, labels, (1.0, 3.0))
    assert w == F.cross_entropy(logits, labels, weight=torch.tensor([1.0, 3.0]))
    with pytest.raises(ValueError, match="class_weights"):
        losses.classification_loss(logits, labels, (1.0, 2.0, 3.0))


def test_samples_without_feedback_add_no_explanation_loss():
    masks = torch.zeros(3, 4, 4)
    masks[0, :2] = 1
    masks[2, :2] = 1
    has = torch.tensor([True, True, False])  # sample 1: empty mask; sample 2: no mask given
    present = losses.feedback_present(masks, has)
    assert present.tolist() == [True, False, False]
    per_sample = torch.tensor([0.2, 100.0, 100.0], requires_grad=True)
    loss = losses.masked_mean(per_sample, present)
    assert loss.item() == pytest.approx(0.2)
    loss.backward()
    assert per_sample.grad.tolist() == [1.0, 0.0, 0.0]
    none = losses.masked_mean(per_sample, torch.zeros(3, dtype=torch.bool))
    assert none.item() == 0.0


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="shape"):
        losses.jaccard_loss(torch.rand(2, 4, 4), torch.rand(2, 8, 8))
