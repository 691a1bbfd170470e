"""What a feedback step costs (issue 21): counterfactual rows only for flagged marks, a bounded
number of them per step with an unbiased weight, and no term run when no row needs it. Speed
itself is measured in bench/feedback_step.py, never here; these tests count rows and calls."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from feedbackcam import counterfactual as cf
from feedbackcam import losses
from feedbackcam.data.dataset import FeedbackBatch
from feedbackcam.models import small_cnn
from feedbackcam.objective import FeedbackConfig, feedback_loss


def _batch(n=12, size=32, marked=3, kind="ignore", seed=0) -> FeedbackBatch:
    """Every row holds a mask array; only the first ``marked`` rows are flagged as feedback."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g)
    flags = torch.arange(n) < marked
    keep = torch.zeros(n, size, size)
    keep[:, 8:24, 8:24] = 1
    ignore = torch.zeros(n, size, size)
    ignore[:, :6, :6] = 1
    labels = torch.arange(n) % 3
    if kind == "ignore":
        return FeedbackBatch(images, labels, keep, torch.zeros(n, dtype=torch.bool), ignore, flags)
    return FeedbackBatch(images, labels, keep, flags)


class _Counting(torch.nn.Module):
    """A model that records the number of rows of every forward pass."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = small_cnn(num_classes=3, width=8)
        self.rows: list[int] = []

    def forward(self, x):
        self.rows.append(x.shape[0])
        return self.net(x)


def test_only_flagged_marks_make_counterfactuals_and_their_loss_is_the_flagged_rows_alone():
    """Unflagged rows hold mask arrays too (as a prepared set's rows can): they must cost
    nothing and change nothing; the loss equals that of the batch with those arrays emptied."""
    b = _batch(marked=3)
    cfg = FeedbackConfig(lam=1.0, counterfactual_share=None)  # every marked row
    model = _Counting()
    torch.manual_seed(1)
    full = feedback_loss(model, b, cfg)
    assert model.rows == [12, 3 * 3]  # the batch, then filled/pasted/blanked of 3 donors
    emptied = b._replace(ignore=b.ignore * b.has_ignore[:, None, None])
    torch.manual_seed(1)
    clean = feedback_loss(model, emptied, cfg)
    assert full.loss.item() == pytest.approx(clean.loss.item(), rel=1e-6)
    assert set(full.terms) == {"jaccard", "surroundings", "invariance_balanced"}
    # no keep mask is flagged: the keep terms run no pass and count 0, as masked_mean would
    assert full.terms["jaccard"].item() == 0 and full.terms["surroundings"].item() == 0


def test_a_term_no_row_needs_runs_nothing_on_the_cpu(monkeypatch):
    calls = []
    entry = losses.get_loss("jaccard")
    counted = dataclasses.replace(entry, fn=lambda *a: calls.append(1) or entry.fn(*a))
    monkeypatch.setitem(losses.EXPLANATION_LOSSES, "jaccard", counted)
    model = _Counting()
    feedback_loss(model, _batch(marked=3), FeedbackConfig(lam=1.0))
    assert calls == []  # the batch has no flagged keep mask
    feedback_loss(model, _batch(marked=3, kind="keep"), FeedbackConfig(lam=1.0))
    assert calls == [1]


@pytest.mark.parametrize("kind, per_row", [("ignore", 3), ("keep", 1)])
def test_counterfactual_share_bounds_the_rows_forwarded_per_term(kind, per_row):
    b = _batch(n=12, marked=12, kind=kind)
    model = _Counting()
    feedback_loss(model, b, FeedbackConfig(lam=1.0, counterfactual_share=None))
    assert model.rows[1:] == [12 * per_row]  # every marked row
    model.rows.clear()
    feedback_loss(model, b, FeedbackConfig(lam=1.0))  # the default: half the batch
    assert model.rows[1:] == [max(1, int(0.5 * 12 / per_row)) * per_row]
    model.rows.clear()
    feedback_loss(model, b, FeedbackConfig(lam=1.0, counterfactual_share=0.25))
    assert model.rows[1:] == [max(1, int(0.25 * 12 / per_row)) * per_row]
    with pytest.raises(ValueError, match="counterfactual_share"):
        FeedbackConfig(counterfactual_share=0.0)


def test_the_drawn_rows_weigh_so_that_the_mean_is_unbiased():
    marked = torch.tensor([0, 2, 3, 5, 7, 8, 9])
    values = torch.arange(10.0) ** 2
    exact = values[marked].mean()
    torch.manual_seed(0)
    total, draws = 0.0, 4000
    for _ in range(draws):
        chosen, w = cf.counterfactual_rows(marked, batch_size=10, share=0.3, per_row=1)
        assert len(chosen) == 3 and set(chosen.tolist()) <= set(marked.tolist())
        total += float((w * values[chosen]).sum()) / len(marked)
    assert total / draws == pytest.approx(float(exact), rel=0.03)
    same, w = cf.counterfactual_rows(marked, batch_size=10, share=None, per_row=3)
    assert torch.equal(same, marked) and w == 1.0


def test_the_target_loss_forwards_the_filled_images_without_a_graph():
    """invariance_target is invariance_balanced's loss (same draws, same value) with the marked
    images filled forwarded apart under no_grad: a target that nothing pulls, and two rows per
    drawn image that back-propagate instead of three."""
    b = _batch(marked=3)
    seen = {}
    for name in ("invariance_balanced", "invariance_target"):
        model = _Counting()
        graphs = []
        model.register_forward_hook(lambda m, i, o, g=graphs: g.append(torch.is_grad_enabled()))
        cfg = FeedbackConfig(lam=1.0, ignore_loss=name, counterfactual_share=None)
        torch.manual_seed(1)
        out = feedback_loss(model, b, cfg)
        out.loss.backward()
        seen[name] = (out.terms[name].item(), model.rows, graphs)
    value, rows, graphs = seen["invariance_balanced"]
    assert rows == [12, 9] and graphs == [True, True]
    target, rows, graphs = seen["invariance_target"]
    assert rows == [3, 12, 6] and graphs == [False, True, True]  # filled, batch, moved/blanked
    assert target == pytest.approx(value, rel=1e-6)


def test_row_subsets_of_counterfactuals_equal_the_whole_batchs_rows():
    b = _batch(n=6, marked=6)
    recipients = torch.tensor([1, 2, 3, 4, 5, 0])
    pasted, base = cf.transplant(b.images, b.ignore, recipients, protect=b.masks)
    donors = torch.tensor([4, 1])
    p2, b2 = cf.transplant(b.images, b.ignore, recipients[donors], b.masks, donors=donors)
    assert torch.equal(p2, pasted[donors]) and torch.equal(b2, base[donors])
    swapped, region = cf.swap_surroundings(b.images, b.masks, recipients, 0.05)
    s2, r2 = cf.swap_surroundings(b.images, b.masks, recipients[donors], 0.05, receivers=donors)
    assert torch.equal(s2, swapped[donors]) and torch.equal(r2, region[donors])


def test_calibrating_several_terms_measures_the_class_gradient_once_per_batch(monkeypatch):
    """auto_scaled calibrates the surroundings and the ignore term on the same batches: the
    class loss's gradient (lambda 0) is the same for both, measured once per batch, and the
    scales equal those calibrated term by term."""
    from feedbackcam import balance

    b = _batch(marked=6)
    both = b._replace(has_mask=b.has_ignore)  # keep and ignore masks on the same rows
    batches = [both, _batch(marked=6, seed=1)._replace(has_mask=b.has_ignore)]
    cfg = FeedbackConfig(lam=0.7)
    lams = []
    real = balance.feedback_step
    monkeypatch.setattr(
        balance, "feedback_step", lambda m, bt, o, c, **k: lams.append(c.lam) or real(m, bt, o, c)
    )
    model = small_cnn(num_classes=3, width=8)
    torch.manual_seed(0)
    scaled = balance.auto_scaled(model, batches, cfg)
    assert lams.count(0.0) == len(batches) and lams.count(1.0) == 2 * len(batches)
    plain = dataclasses.replace(
        cfg, loss_scale=1.0, surroundings_loss=None, ignore_loss=None, surroundings_scale=1.0,
        ignore_scale=1.0,
    )  # fmt: skip
    for term, field in (
        ("surroundings", "surroundings_scale"),
        ("invariance_balanced", "ignore_scale"),
    ):
        torch.manual_seed(0)
        alone = balance.calibrate_loss_scale(
            model, batches, dataclasses.replace(plain, explanation_loss=term)
        )
        assert getattr(scaled, field) == pytest.approx(alone, rel=0.3)


# ------------------------------------------------------- fixed shapes (accelerators): no sync
@pytest.fixture
def fixed(monkeypatch):
    """The accelerator's row selection, on the CPU (no GPU here): fixed shapes, no nonzero."""
    monkeypatch.setattr(cf, "fixed_shapes", lambda device: True)


def test_fixed_rows_have_a_fixed_shape_marked_first_and_unbiased_weights():
    values = torch.arange(10.0) ** 2
    torch.manual_seed(0)
    for marked in ([0, 2, 3, 5, 7, 8, 9], [4], []):
        present = torch.zeros(10, dtype=torch.bool)
        present[marked] = True
        total, draws = 0.0, 2000
        for _ in range(draws):
            rows, w = cf.fixed_rows(present, share=0.3, per_row=1)
            assert rows.shape == (3,) and w.shape == (3,)  # whatever the number marked
            k = min(len(marked), 3)
            assert set(rows[:k].tolist()) <= set(marked) and (w[k:] == 0).all()
            total += float((w * values[rows]).sum()) / max(len(marked), 1)
        exact = float(values[marked].mean()) if marked else 0.0
        assert total / draws == pytest.approx(exact, rel=0.03, abs=1e-6)


def test_with_fixed_shapes_the_ignore_loss_is_the_same_and_fill_the_same(fixed):
    """Every row forwarded, the unmarked at weight 0: the same loss as the marked rows alone."""
    b = _batch(marked=3)
    cfg = FeedbackConfig(lam=1.0, counterfactual_share=None, surroundings_loss=None)
    model = _Counting()
    torch.manual_seed(1)
    got = feedback_loss(model, b, cfg)
    assert model.rows == [12, 3 * 12]  # fixed: every row's counterfactuals
    with pytest.MonkeyPatch.context() as m:
        m.setattr(cf, "fixed_shapes", lambda device: False)
        torch.manual_seed(1)
        want = feedback_loss(model, b, cfg)
        plain = cf.fill_region(b.images, b.ignore * b.has_ignore[:, None, None])
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=1e-5)
    assert torch.allclose(cf.fill_region(b.images, b.ignore * b.has_ignore[:, None, None]), plain)


def test_with_fixed_shapes_a_surroundings_receiver_never_borrows_its_own(fixed):
    present = torch.zeros(8, dtype=torch.bool)
    present[[1, 6]] = True
    torch.manual_seed(0)
    for _ in range(50):
        rows, donors, w = cf.surroundings_pairs(present, share=0.5)
        assert rows.shape == donors.shape == w.shape == (4,)
        live = w > 0
        assert set(rows[live].tolist()) == {1, 6} and set(donors[live].tolist()) == {1, 6}
        assert (rows[live] != donors[live]).all()
    present[6] = False  # one marked image: nothing to borrow, all weights 0
    assert (cf.surroundings_pairs(present, share=0.5)[2] == 0).all()
    b = _batch(marked=6, kind="keep")
    loss = feedback_loss(_Counting(), b, FeedbackConfig(lam=1.0)).loss
    assert torch.isfinite(loss) and loss.item() > 0


def _both_kinds(n=8, size=32, seed=0) -> FeedbackBatch:
    b = _batch(n=n, size=size, marked=n // 2, kind="keep", seed=seed)
    ignore = torch.zeros(n, size, size)
    ignore[:, :6, :6] = 1
    return b._replace(ignore=ignore, has_ignore=torch.arange(n) >= n // 4)


def test_rows_riding_in_the_batchs_forward_give_the_loss_and_gradients_of_separate_forwards(
    monkeypatch,
):
    """One concatenated forward (the batch, then each term's rows: what an accelerator runs) is
    the same computation as a forward per term (what a CPU runs): same loss, same terms, same
    gradients."""
    from feedbackcam import objective

    b = _both_kinds()
    cfg = FeedbackConfig(lam=0.7)  # the default objective: jaccard, surroundings, ignore loss

    def run(together):
        monkeypatch.setattr(objective, "rows_ride_along", lambda model, device: together)
        model = _Counting()
        torch.manual_seed(3)
        out = feedback_loss(model, b, cfg)
        out.loss.backward()
        return model.rows, out, [p.grad.clone() for p in model.parameters()]

    rows, together, grads = run(True)
    assert len(rows) == 1 and rows[0] > 8  # the counterfactual rows rode along
    rows_apart, apart, grads_apart = run(False)
    assert rows_apart[0] == 8 and len(rows_apart) == 3 and sum(rows_apart) == rows[0]
    assert set(together.terms) == {"jaccard", "surroundings", "invariance_balanced"}
    for name, value in together.terms.items():
        assert value.item() != 0
        torch.testing.assert_close(value, apart.terms[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together.loss, apart.loss, rtol=1e-5, atol=1e-6)
    for g, h in zip(grads, grads_apart, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)


def test_rows_ride_along_on_an_accelerator_unless_batch_statistics_mix_them():
    """On a CPU each term's rows get their own forward (measured faster there); elsewhere they
    ride in the batch's, except through BatchNorm in training mode, whose statistics they
    would change."""
    from feedbackcam.objective import rows_ride_along

    plain = _Counting()
    normed = torch.nn.Sequential(torch.nn.BatchNorm2d(3), _Counting())
    accelerator = torch.device("meta")  # any device that is not the CPU
    assert not rows_ride_along(plain, torch.device("cpu"))
    assert rows_ride_along(plain, accelerator)
    assert not rows_ride_along(normed.train(), accelerator)
    assert rows_ride_along(normed.eval(), accelerator)


def test_a_counterfactual_loss_that_reads_the_logits_before_its_rows_is_told_so(monkeypatch):
    def early(inputs, cfg):
        inputs.logits  # noqa: B018 -- the mistake under test
        yield inputs.images[:0]
        return inputs.labels.float()

    entry = losses.ExplanationLoss(early, "ignore", counterfactual=True)
    monkeypatch.setitem(losses.EXPLANATION_LOSSES, "early", entry)
    with pytest.raises(RuntimeError, match="yield its rows before"):
        feedback_loss(_Counting(), _batch(marked=3), FeedbackConfig(lam=1.0, ignore_loss="early"))
    with pytest.raises(TypeError, match="generator"):
        losses.register_loss("plain", needs="ignore", counterfactual=True)(lambda i, c: i.labels)


# ------------------------------------- host counts: rows sized without reading the device back
def test_a_batch_counts_its_feedback_on_the_host_before_it_goes_to_a_device():
    b = _batch(marked=3)  # ignore marks on 3 rows, no keep feedback (flags off)
    assert b.counts is None and b.feedback_counts() == (0, 3)
    assert b.to("meta").counts == (0, 3)  # counted on the CPU, before the move
    assert b.to("cpu").counts is None  # a CPU step reads its flags for free
    k = _batch(marked=5, kind="keep")
    assert k.feedback_counts() == (5, 0)
    both = FeedbackBatch.cat([b.to("meta"), k.to("meta")])
    assert both.counts == (5, 3)
    unknown = k.to("meta")._replace(counts=None)
    assert FeedbackBatch.cat([b.to("meta"), unknown]).counts is None  # unknown stays unknown


def test_tensor_data_batches_carry_the_counts_of_their_rows():
    import numpy as np

    from feedbackcam.data.dataset import ArrayDataset
    from feedbackcam.train import epoch_batches

    rng = np.random.default_rng(0)
    n, size = 20, 8
    masks = np.zeros((n, size, size), np.uint8)
    masks[::2, 2:5, 2:5] = 1  # even rows hold a keep mask ...
    has_mask = np.arange(n) % 4 != 2  # ... but rows 2, 6, 10, ... have their flag off
    ignore = np.zeros((n, size, size), np.uint8)
    ignore[:7, :2, :2] = 1
    data = ArrayDataset(
        rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8),
        masks,
        np.arange(n) % 3,
        has_mask,
        tuple(str(i) for i in range(n)),
        ("a", "b", "c"),
        ignore,
        np.arange(n) != 3,
    )
    tensors = data.tensors()
    seen = 0
    for batch in epoch_batches(tensors, np.arange(n), 6, generator=torch.Generator()):
        assert batch.counts == batch.feedback_counts()
        seen += len(batch.labels)
    assert seen == n
    assert tensors.batch(torch.arange(n)).counts == (5, 6)


def test_with_host_counts_a_term_no_row_needs_is_skipped_and_rows_match_the_marks(fixed):
    """On an accelerator (fixed shapes) without counts every term runs, its rows padded to
    the batch's share; with the host counts a term no row needs is skipped and a term forwards
    no more rows than are marked. The loss is the CPU path's (the marked rows alone)."""
    b = _batch(marked=3)  # ignore marks only
    cfg = FeedbackConfig(lam=1.0, counterfactual_share=None)  # jaccard, surroundings, ignore
    model = _Counting()
    torch.manual_seed(1)
    feedback_loss(model, b, cfg)
    assert model.rows == [12, 12, 3 * 12]  # unknown counts: surroundings' rows too, all padded
    model.rows.clear()
    counted = b._replace(counts=b.feedback_counts())
    torch.manual_seed(1)
    got = feedback_loss(model, counted, cfg)
    assert model.rows == [12, 3 * 3]  # no surroundings rows, the 3 marked rows' variants
    with pytest.MonkeyPatch.context() as m:
        m.setattr(cf, "fixed_shapes", lambda device: False)
        fresh = _Counting()  # seeds torch itself: before the step's seed
        torch.manual_seed(1)
        want = feedback_loss(fresh, b, cfg)
    assert set(got.terms) == set(want.terms)
    for name in got.terms:
        torch.testing.assert_close(got.terms[name], want.terms[name], rtol=1e-5, atol=1e-6)
    # a share below the marked count still draws from the marked rows alone, unbiased
    cfg = dataclasses.replace(cfg, counterfactual_share=0.5)
    marked = _batch(marked=9)
    rows, w = cf.fixed_rows(marked.has_ignore, 0.5, 3, count=9)
    assert rows.shape == (2,) and set(rows.tolist()) <= set(range(9)) and (w == 9 / 2).all()
    rows, w = cf.fixed_rows(marked.has_ignore, 0.5, 3, count=0)
    assert rows.shape == (0,)


def test_the_calibration_probe_holds_the_rare_marks_it_would_miss():
    """Three ignore strokes among 96 images are rarely in a first shuffled batch of 8; the probe
    a fine-tuning calibrates on then gets one batch of the marked rows more, so the ignore term
    is calibrated (not left at scale 1). A probe that already holds them is unchanged, and a
    kind no row carries (keep, here) adds nothing."""
    import numpy as np

    from feedbackcam.balance import auto_scaled, feeding, probe_batches
    from feedbackcam.data.dataset import ArrayDataset

    rng = np.random.default_rng(1)
    n, size = 96, 16
    marked = [5, 50, 90]
    ignore = np.zeros((n, size, size), np.uint8)
    ignore[marked, :4, :4] = 1
    data = ArrayDataset(
        rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8),
        np.zeros((n, size, size), np.uint8),
        np.arange(n) % 3,
        np.zeros(n, bool),
        tuple(str(i) for i in range(n)),
        ("a", "b", "c"),
        ignore,
        np.isin(np.arange(n), marked),
    ).tensors()

    def probe(seed):
        g = torch.Generator().manual_seed(seed)
        return probe_batches(data, np.arange(n), 8, 1, generator=g)

    missed = 0
    for seed in range(12):
        batches = probe(seed)
        assert feeding(batches, "ignore") and not feeding(batches, "keep")
        if len(batches) == 2:  # the shuffled batch missed every mark
            missed += 1
            assert batches[1].counts == (0, 3) and len(batches[1].labels) == 3
        else:
            assert len(batches) == 1 and batches[0].counts[1] > 0
    assert missed > 0
    cfg = FeedbackConfig(lam=0.5, surroundings_loss=None)
    model = small_cnn(3, width=8)
    assert auto_scaled(model, probe(0), cfg).ignore_scale != 1.0


def test_the_interleaved_step_benchmark_runs_and_counts_the_rows_it_forwards(tmp_path):
    """bench/step_ratio.py (issue 21's goal, measured interleaved), one tiny round: a row per
    arm, each with the rows the objective forwards (30 % of 32 marked: 10 rows, at share 0.5 five
    drawn, three counterfactuals each; at 0.3 three drawn)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "bench" / "step_ratio.py"
    out = tmp_path / "ratio.json"
    cmd = [sys.executable, str(script), "--size", "32", "--fractions", "0.3", "--shares", "0.5",
           "0.3", "--rounds", "1", "--steps", "1", "--json", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = json.loads(out.read_text())["rows"]
    assert [(r["counterfactual_share"], r["rows_forwarded"]) for r in rows] == [
        (0.5, 47),
        (0.3, 41),
    ]
    assert all(r["step_vs_classification"] > 0 and r["ignore_loss"] for r in rows)
