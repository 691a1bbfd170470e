"""Real artifacts and "decide from the lesion" (issue 18): counterfactuals that never paint over a
lesion, the surroundings loss, the objective's added terms, real cut-outs pasted off the lesion,
artifact annotations, trap splits, ClArC, the noise-aware guard."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from feedbackcam import clarc
from feedbackcam import counterfactual as cf
from feedbackcam.balance import auto_scaled
from feedbackcam.data.artifacts import cut_out, paste_cutouts, read_artifact_flags
from feedbackcam.data.dataset import FeedbackBatch
from feedbackcam.models import small_cnn
from feedbackcam.objective import FeedbackConfig, loss_terms
from feedbackcam.selection import drops, images_needed, noise_margins
from feedbackcam.train import feedback_step


def _batch(n=6, size=32, seed=0) -> FeedbackBatch:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g)
    keep = torch.zeros(n, size, size)
    for i in range(n):  # lesions at different places
        y, x = 4 + 3 * i % 16, 6 + 5 * i % 14
        keep[i, y : y + 10, x : x + 10] = 1
    ignore = torch.zeros(n, size, size)
    ignore[:, :6, -6:] = 1
    ones = torch.ones(n, dtype=torch.bool)
    return FeedbackBatch(images, torch.arange(n) % 3, keep, ones, ignore, ones)


# ------------------------------------------------------------------ counterfactuals


def test_a_moved_artifact_never_paints_over_the_recipients_lesion():
    b = _batch()
    ignore = b.ignore.clone()
    ignore[0] = 0
    ignore[0, 10:20, 10:20] = 1  # donor 0's artifact lies where recipient 1's lesion is
    keep = b.masks.clone()
    keep[1] = 0
    keep[1, 12:18, 12:18] = 1
    recipients = torch.tensor([1, 2, 3, 4, 5, 0])
    pasted, base = cf.transplant(b.images, ignore, recipients, protect=keep)
    lesion = keep[1] > 0
    assert torch.equal(pasted[0][:, lesion], base[0][:, lesion])  # the lesion is the recipient's
    moved = (ignore[0] > 0) & ~lesion
    assert torch.equal(pasted[0][:, moved], b.images[0][:, moved])  # the rest of it moved
    unprotected, _ = cf.transplant(b.images, ignore, recipients)
    assert not torch.equal(unprotected[0][:, lesion], base[0][:, lesion])


def test_swap_surroundings_keeps_the_lesion_and_erases_the_donors():
    b = _batch()
    donors = torch.tensor([1, 2, 3, 4, 5, 0])
    swapped, region = cf.swap_surroundings(b.images, b.masks, donors, margin=0.0)
    for i, d in enumerate(donors.tolist()):
        inside = region[i] > 0
        assert torch.equal(swapped[i][:, inside], b.images[i][:, inside])
        outside = ~inside & (b.masks[d] == 0)  # the donor's skin, where it had no lesion
        assert torch.equal(swapped[i][:, outside], b.images[d][:, outside])
        donor_lesion = (b.masks[d] > 0) & ~inside
        colours = swapped[i][:, donor_lesion]
        assert (colours == colours[:, :1]).all()  # filled with one colour: no second lesion
    grown, _ = cf.swap_surroundings(b.images, b.masks, donors, margin=0.1)
    assert (cf.dilate(b.masks, 3) >= b.masks).all() and not torch.equal(grown, swapped)


def test_the_eight_symmetries_are_distinct_and_keep_a_non_square_image_its_shape():
    x = torch.arange(20.0).reshape(1, 4, 5)
    square = torch.arange(16.0).reshape(1, 4, 4)
    assert len({tuple(cf.turned(square, c).flatten().tolist()) for c in range(8)}) == 8
    assert torch.equal(cf.turned(square, 0), square)
    assert torch.equal(cf.turned(square, 2), torch.rot90(square, 1, dims=(-2, -1)))
    assert torch.equal(cf.turned(square, 1), square.flip(-1))
    torch.manual_seed(0)
    codes = {cf.draw_symmetry(x.shape) for _ in range(200)}
    assert codes == {0, 1, 4, 5}  # no quarter turn of a 4 x 5 image
    assert all(cf.turned(x, c).shape == x.shape for c in codes)
    assert {cf.draw_symmetry(square.shape) for _ in range(200)} == set(range(8))
    with pytest.raises(ValueError, match="quarter turn"):
        cf.turned(x, 2)


def test_a_turned_artifact_lands_where_the_turned_donor_has_it_and_never_on_a_lesion():
    b = _batch()
    recipients = torch.tensor([1, 2, 3, 4, 5, 0])
    keep = b.masks.clone()
    keep[1] = 0
    keep[1, -3:, :3] = 1  # recipient 1's lesion where part of donor 0's turned artifact lands
    pasted, base = cf.transplant(b.images, b.ignore, recipients, protect=keep, symmetry=4)
    half_turn = cf.turned(b.ignore[0], 4) > 0  # top right -> bottom left
    assert half_turn[-1, 0] and not half_turn[0, -1]
    lesion = keep[1] > 0
    moved = half_turn & ~lesion
    assert moved.any() and (half_turn & lesion).any()
    assert torch.equal(pasted[0][:, moved], cf.turned(b.images[0], 4)[:, moved])
    assert torch.equal(pasted[0][:, lesion], base[0][:, lesion])  # the lesion stays its own
    assert torch.equal(pasted[0][:, ~half_turn], base[0][:, ~half_turn])
    # the surroundings turn too, the receiver's lesion stays where it is
    donors = torch.tensor([1, 2, 3, 4, 5, 0])
    swapped, region = cf.swap_surroundings(b.images, b.masks, donors, margin=0.0, symmetry=3)
    plain, _ = cf.swap_surroundings(b.images, b.masks, donors, margin=0.0)
    inside = region[0] > 0
    assert torch.equal(swapped[0][:, inside], b.images[0][:, inside])
    background = cf.turned(cf.fill_region(b.images[1:2], b.masks[1:2]), 3)[0]
    assert torch.equal(swapped[0][:, ~inside], background[:, ~inside])
    assert not torch.equal(swapped[0][:, ~inside], plain[0][:, ~inside])


def test_counterfactual_symmetries_change_the_step_only_when_asked(monkeypatch):
    from feedbackcam.losses import invariance

    b = _batch()
    plain = FeedbackConfig(lam=1.0, explanation_loss="jaccard")
    turning = replace(plain, counterfactual_symmetries=True)

    def never(shape):
        raise AssertionError("a symmetry drawn although none was asked for")

    monkeypatch.setattr(invariance, "draw_symmetry", never)
    _, g_plain = _step(b, plain)
    assert not FeedbackConfig().counterfactual_symmetries  # off unless asked
    drawn = []

    def fixed(code):
        def draw(shape):
            drawn.append(code)
            return code

        return draw

    monkeypatch.setattr(invariance, "draw_symmetry", fixed(0))
    _, g_identity = _step(b, turning)
    assert torch.equal(g_identity, g_plain)  # code 0: where the regions lay
    monkeypatch.setattr(invariance, "draw_symmetry", fixed(4))
    _, g_half_turn = _step(b, turning)
    assert torch.isfinite(g_half_turn).all() and not torch.allclose(g_half_turn, g_plain)
    assert len(drawn) == 4  # the surroundings and the ignore term, once a step each


def test_the_symmetries_flag_reaches_simulate_and_the_apps_objective():
    import argparse

    from feedbackcam.options import add_feedback_args, feedback_config

    p = argparse.ArgumentParser()
    add_feedback_args(p)
    default = FeedbackConfig().counterfactual_symmetries
    assert feedback_config(p.parse_args([])).counterfactual_symmetries == default
    assert feedback_config(p.parse_args(["--counterfactual-symmetries"])).counterfactual_symmetries
    off = p.parse_args(["--no-counterfactual-symmetries"])
    assert not feedback_config(off).counterfactual_symmetries


# ------------------------------------------------------------------ the surroundings loss


def _step(batch, cfg, seed=1):
    torch.manual_seed(0)
    model = small_cnn(num_classes=3, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    torch.manual_seed(seed)
    stats = feedback_step(model, batch, opt, cfg)
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return stats, torch.cat(grads) if grads else None  # none: a skipped (non-finite) step


def test_the_surroundings_loss_learns_from_keep_masks_and_what_lies_outside_them():
    cfg = FeedbackConfig(lam=1.0, explanation_loss="surroundings", ignore_loss=None)
    b = _batch()
    stats, g = _step(b, cfg)
    assert stats["loss_exp"] > 0 and torch.isfinite(g).all()
    # the loss depends on the surroundings: other skin outside the lesions, another gradient
    other = b.images.clone()
    outside = cf.dilate(b.masks, 1) == 0
    other[outside[:, None].expand_as(other)] = torch.rand(int(outside.sum()) * 3)
    _, g2 = _step(b._replace(images=other), cfg)
    assert not torch.allclose(g, g2)
    # a single marked image has no other surroundings to borrow: no loss
    one = b.masks.clone()
    one[1:] = 0
    assert _step(b._replace(masks=one), cfg)[0]["loss_exp"] == 0.0


def test_the_surroundings_loss_keeps_each_lesions_own_label():
    """Relabelling the batch changes the loss (CE on the swapped images uses the receiver's
    label); with every class weighted 0 no label is left and relabelling changes nothing."""
    b = _batch()
    relabelled = b._replace(labels=(b.labels + 1) % 3)

    def loss(batch, weights):
        cfg = FeedbackConfig(
            lam=1.0, explanation_loss="surroundings", ignore_loss=None, class_weights=weights
        )
        return _step(batch, cfg)[0]["loss_exp"]

    assert loss(b, None) != pytest.approx(loss(relabelled, None), rel=1e-4)
    assert loss(b, (0.0,) * 3) == pytest.approx(loss(relabelled, (0.0,) * 3), rel=1e-5)


def test_the_default_objective_adds_the_surroundings_and_ignore_terms():
    b = _batch()
    names = [t.name for t in loss_terms(FeedbackConfig(), b)]
    assert names == ["jaccard", "surroundings", "invariance_balanced"]
    thesis = FeedbackConfig(surroundings_loss=None, ignore_loss=None)
    assert [t.name for t in loss_terms(thesis, b)] == ["jaccard"]
    no_ignore = b._replace(ignore=None, has_ignore=None)
    assert [t.name for t in loss_terms(FeedbackConfig(), no_ignore)] == ["jaccard", "surroundings"]
    assert [t.name for t in loss_terms(FeedbackConfig(explanation_loss="surroundings"), b)] == [
        "surroundings",
        "invariance_balanced",
    ]
    with pytest.raises(ValueError, match="surroundings_loss"):
        FeedbackConfig(surroundings_loss="invariance_balanced")  # an ignore-mask loss
    torch.manual_seed(0)
    model = small_cnn(num_classes=3, width=8)
    scaled = auto_scaled(model, [b], FeedbackConfig(lam=0.5))
    assert scaled.surroundings_scale not in (None, 1.0) and scaled.ignore_scale not in (None, 1.0)


def test_keep_regions_are_never_filled_by_the_ignore_losses():
    """An ignore stroke that overlaps the same image's keep mask fills only the part outside
    the keep region: painting keep over the whole ignore region changes nothing."""
    b = _batch()
    cfg = FeedbackConfig(
        lam=1.0, explanation_loss="invariance_balanced", surroundings_loss=None, ignore_loss=None
    )
    both = b._replace(ignore=torch.maximum(b.ignore, b.masks))  # ignore covers the lesion too
    assert _step(both, cfg)[0]["loss_exp"] == pytest.approx(_step(b, cfg)[0]["loss_exp"])


# ------------------------------------------------------------------ real artifacts


def _lesions(n=5, size=40):
    yy, xx = np.mgrid[:size, :size]
    lesion = ((yy - 20) ** 2 + (xx - 20) ** 2 < 64).astype(np.uint8)
    images = np.full((n, size, size, 3), 180, np.uint8)
    images[:, lesion > 0] = (90, 60, 40)
    return images, np.repeat(lesion[None], n, 0)


def test_real_cutouts_are_pasted_off_the_lesion_seeded_and_alone():
    images, lesions = _lesions()
    source = np.zeros((40, 40, 3), np.uint8)
    source[..., 2] = 250
    mask = np.zeros((40, 40), np.uint8)
    mask[14:26, :9] = 1  # at the left edge, clear of the lesion
    cut = cut_out(source, mask, "src")
    out, masks, has = paste_cutouts(images, lesions, [cut], seed=3)
    again, _, _ = paste_cutouts(images, lesions, [cut], seed=3)
    assert has.all() and np.array_equal(out, again)
    assert not (masks.astype(bool) & lesions.astype(bool)).any()
    changed = (out != images).any(-1)
    assert np.array_equal(changed, masks.astype(bool))  # only the patch's pixels change
    assert (out[masks.astype(bool)][:, 2] == 250).all()
    over = np.zeros((40, 40), np.uint8)
    over[10:30, 10:30] = 1  # would cover the lesion however it is turned
    _, none, has = paste_cutouts(images, lesions, [cut_out(source, over)], seed=0)
    assert not has.any() and not none.any()


def test_artifact_flags_are_read_and_bad_values_named(tmp_path):
    path = tmp_path / "flags.csv"
    path.write_text("image_id,ruler,ink\nISIC_0000001,1,0\nISIC_0000002_downsampled,0,1\n")
    ids, flags = read_artifact_flags(path)
    assert ids == ("ISIC_0000001", "ISIC_0000002")
    assert flags["ruler"].tolist() == [True, False] and flags["ink"].tolist() == [False, True]
    path.write_text("image_id,ruler\nISIC_0000001,yes\n")
    with pytest.raises(ValueError, match=r"flags\.csv: row 2, column 'ruler'"):
        read_artifact_flags(path)
    path.write_text("name,ruler\nx,1\n")
    with pytest.raises(ValueError, match="no id column"):
        read_artifact_flags(path)


def test_trap_splits_reverse_the_correlation_and_the_free_split_has_none():
    from feedbackcam.shortcuts.isic_real import TRAP_STRENGTH, trap_indices

    rng = np.random.default_rng(0)
    labels = (rng.random(1500) < 0.25).astype(np.int64)
    has = rng.random(1500) < np.where(labels == 1, 0.6, 0.45)
    split = trap_indices(labels, has, seed=1)
    star = int(split["star"][0])
    assert star == 1  # the artifact goes with class 1 in this data

    def rate(rows, c):
        return has[rows][labels[rows] == c].mean()

    train, test, free, val = split["train"], split["test"], split["free"], split["val"]
    assert rate(train, 1) == pytest.approx(TRAP_STRENGTH, abs=0.03)
    assert rate(train, 0) == pytest.approx(1 - TRAP_STRENGTH, abs=0.03)
    assert rate(test, 1) == 0.0 and rate(test, 0) == 1.0  # reversed
    assert abs(rate(free, 1) - rate(free, 0)) < 0.03  # no correlation
    assert len(free) == pytest.approx(len(train), abs=2)
    assert labels[free].mean() == pytest.approx(labels[train].mean(), abs=0.01)
    for a, b in ((train, test), (train, val), (free, test), (free, val), (val, test)):
        assert not set(a) & set(b)
    assert np.array_equal(trap_indices(labels, has, seed=1)["train"], train)  # seeded


# ------------------------------------------------------------------ ClArC


def test_clarc_finds_a_planted_direction_and_projects_it_out():
    torch.manual_seed(0)
    model = small_cnn(num_classes=3, width=8)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(40, 3, 32, 32, generator=g) * 0.5
    has = np.arange(40) % 2 == 0
    images[has, 0, :8, :8] = 1.0  # the artifact: a red corner
    d = clarc.artifact_direction(model, images, has)
    assert d.artifact > d.clean and abs(float(d.v.norm()) - 1) < 1e-5
    with torch.no_grad():

        def along(x):
            acts = model(x).activations[0].mean(dim=(2, 3))
            return (acts @ d.v).numpy()

        before = along(images)
        with clarc.projected(model, d):
            after = along(images)
        with clarc.augmented(model, d):
            added = along(images)
        restored = along(images)
    assert before[has].mean() > before[~has].mean()
    assert np.allclose(after, d.clean, atol=1e-4)  # every image at the clean level
    assert np.allclose(added, d.artifact, atol=1e-4)
    assert np.allclose(restored, before)  # the hook is gone after the block
    with pytest.raises(ValueError, match="with and without"):
        clarc.artifact_direction(model, images, np.ones(40, bool))


def test_benchmark_methods_name_their_terms():
    from feedbackcam.shortcuts.bench import method_config
    from feedbackcam.shortcuts.config import check_method

    cfg = method_config("jaccard+surroundings+invariance_balanced", 0.9)
    assert (cfg.explanation_loss, cfg.surroundings_loss, cfg.ignore_loss) == (
        "jaccard",
        "surroundings",
        "invariance_balanced",
    )
    alone = method_config("invariance_balanced", 0.5)
    assert alone.surroundings_loss is None and alone.ignore_loss is None  # exactly its terms
    assert method_config("class", 0.9).lam == 0.0
    with pytest.raises(ValueError, match="at most one"):
        check_method("jaccard+rrr_ignore+invariance")
    with pytest.raises(ValueError, match="explanation_loss"):
        check_method("jaccard+nope")


# ------------------------------------------------------------------ the noise-aware guard


def test_the_guard_widens_its_tolerance_by_the_validation_sets_noise():
    labels = np.array([0] * 100 + [1] * 20)
    ref = labels.copy()
    cand = labels.copy()
    cand[100:102] = 0  # 2 of 20 class-1 images now wrong: sensitivity 1.0 -> 0.9
    margins = noise_margins(labels, ref, cand, ["a", "b"], confidence=0.95)
    assert margins["sensitivity b"] == pytest.approx(1.645 * np.sqrt(2 - 4 / 20) / 20, rel=1e-3)
    reference = {"avg_sensitivity": 1.0, "sensitivity": {"a": 1.0, "b": 1.0}}
    candidate = {"avg_sensitivity": 0.95, "sensitivity": {"a": 1.0, "b": 0.9}}
    assert drops(reference, candidate, 0.02, per_class=True)  # a point threshold refuses it
    assert not drops(reference, candidate, 0.02, per_class=True, margins=margins)
    cand[100:115] = 0  # 15 of 20 lost: beyond any noise
    margins = noise_margins(labels, ref, cand, ["a", "b"])
    collapsed = {"avg_sensitivity": 0.625, "sensitivity": {"a": 1.0, "b": 0.25}}
    assert drops(reference, collapsed, 0.02, per_class=True, margins=margins)
    assert images_needed(0.05, changed=0.2) == 217


# ------------------------------------------------------------------ isic-real on a tiny folder


def _fake_isic(root, n=(30, 12, 8), size=48):
    """An ISIC 2017 layout with lesion masks, and artifacts/: a few patched NV (two with masks),
    artifact flags for every image."""
    img_dir = root / "ISIC-2017_Training_Data"
    seg_dir = root / "ISIC-2017_Training_Part1_GroundTruth"
    art = root / "artifacts"
    for d in (img_dir, seg_dir, art / "patch_masks"):
        d.mkdir(parents=True)
    images, lesions = _lesions(sum(n), size)
    rows, flags, patched = ["image_id,melanoma,seborrheic_keratosis"], [], []
    k = 0
    for label, count in enumerate(n):
        for _ in range(count):
            iid = f"ISIC_{k:07d}"
            image = images[k].copy()
            if label == 0 and k < 6:  # six patched NV, at the top-left corner
                image[:10, :10] = (20, 200, 220)
                patched.append(iid)
                if k < 2:
                    mask = np.zeros((size, size), np.uint8)
                    mask[:10, :10] = 255
                    Image.fromarray(mask).save(art / "patch_masks" / f"{iid}.png")
            Image.fromarray(image).save(img_dir / f"{iid}.jpg", quality=98)
            Image.fromarray(lesions[k] * 255).save(seg_dir / f"{iid}_segmentation.png")
            rows.append(f"{iid},{int(label == 1)}.0,{int(label == 2)}.0")
            flags.append(f"{iid},{k % 2},0,0,0,{k % 3 == 0:d},0,{int(iid in patched)}")
            k += 1
    (root / "ISIC-2017_Training_Part3_GroundTruth.csv").write_text("\n".join(rows) + "\n")
    head = "image_id,dark_corner,hair,gel_border,gel_bubble,ruler,ink,patches"
    (art / "artifact_flags.csv").write_text("\n".join([head, *flags]) + "\n")
    lists = {"patch": patched, "ruler": [], "skin_marker": []}
    (art / "artifact_lists.json").write_text(json.dumps(lists))


def test_isic_real_keeps_patched_images_in_training_and_pastes_real_patches_at_test(tmp_path):
    from feedbackcam.shortcuts import BenchConfig
    from feedbackcam.shortcuts.isic_real import isic_real_data

    _fake_isic(tmp_path / "isic")
    cfg = BenchConfig(
        datasets=("isic-real",), isic_root=str(tmp_path / "isic"), isic_size=48, isic_real_pool=20
    )
    d = isic_real_data(0, cfg, tmp_path / "cache")
    patched = {f"ISIC_{k:07d}" for k in range(6)}
    assert patched <= set(d.base.ids) and not patched & set(d.clean_base.ids)  # the reference
    assert not patched & (set(d.val.data.ids) | set(d.test.data.ids))
    assert set(d.pool.ids) <= set(d.base.ids) and len(d.pool) == 20  # the model's own images
    marked = [i for i, h in zip(d.pool.ids, d.pool.has_ignore) if h]
    assert sorted(marked) == ["ISIC_0000000", "ISIC_0000001"]  # the clinician's two masks
    t = d.test
    pasted = t.data.ignore.reshape(len(t.data), -1).any(1)
    assert pasted.all()
    assert not (t.data.ignore.astype(bool) & (t.data.masks > 0)).any()  # never on the lesion
    nv = d.classes.index("NV")
    assert t.target == nv and np.array_equal(t.misleads, t.data.labels != nv)
    assert set(t.flags) >= {"ruler", "patches", "annotated"} and t.flags["annotated"].all()


# ------------------------------------------------------------------ the decision's offsets


def test_refit_bias_restores_the_offsets_and_changes_nothing_else():
    from feedbackcam.data.synth import SynthConfig, as_array_dataset, make_synthderm
    from feedbackcam.decision import head, head_inputs, refit_bias

    synth = SynthConfig(n=60, size=32, seed=0, confounder="patch", confounder_rate=0.5)
    data = as_array_dataset(make_synthderm(synth))
    torch.manual_seed(0)
    model = small_cnn(num_classes=3, width=8)
    layer = head(model)
    fitted = refit_bias(model, data)
    best = layer.bias.detach().clone()
    weights = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("fc.bias")}
    with torch.no_grad():
        layer.bias.add_(torch.tensor([5.0, -5.0, 0.0]))  # a shifted decision: all say class 0
    change = refit_bias(model, data)

    def centred(b):  # softmax cannot tell offsets that differ by a constant
        return b - b.mean()

    assert torch.allclose(centred(layer.bias.detach()), centred(best), atol=0.05)  # same optimum
    assert torch.allclose(centred(change), torch.tensor([-5.0, 5.0, 0.0]), atol=0.1)
    assert fitted.abs().max() > 0  # the first fit moved the untrained offsets too
    for k, v in model.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k  # nothing but the bias moved
    # marked regions are filled before the features are taken
    marked = data.has_ignore
    assert marked.any()
    plain = head_inputs(model, data, fill=False)
    filled = head_inputs(model, data, fill=True)
    assert torch.equal(plain[~torch.from_numpy(marked)], filled[~torch.from_numpy(marked)])
    assert not torch.allclose(plain[torch.from_numpy(marked)], filled[torch.from_numpy(marked)])
    # the training loop's tensors and a subset of them, as simulate hands them over
    index = np.arange(0, 60, 2)
    as_arrays = head_inputs(model, data, index=index)
    assert torch.equal(head_inputs(model, data.tensors(), index=index), as_arrays)
    assert torch.equal(as_arrays, filled[index])
    before = layer.bias.detach().clone()
    half = refit_bias(model, data.tensors(), index=index)
    with torch.no_grad():
        layer.bias.copy_(before)
    assert torch.allclose(refit_bias(model, replace(data, **subset(data, index))), half, atol=1e-6)


def subset(data, index):
    keep = ("images", "masks", "labels", "has_mask", "ignore", "has_ignore")
    return {**{k: getattr(data, k)[index] for k in keep}, "ids": tuple(data.ids[i] for i in index)}


def test_simulate_demo_and_the_app_learn_with_the_same_default_objective():
    from feedbackcam.demo import QUICK, DemoConfig
    from feedbackcam.service.settings import Settings
    from feedbackcam.simulate import SimulationConfig

    def terms(fb: FeedbackConfig):
        return (fb.explanation_loss, fb.surroundings_loss, fb.ignore_loss, fb.cam)

    default = terms(FeedbackConfig())
    assert default == ("jaccard", "surroundings", "invariance_balanced", "gradcam")
    for fb in (
        SimulationConfig().feedback,
        DemoConfig().simulation.feedback,
        QUICK.simulation.feedback,
        Settings().feedback,
    ):
        assert terms(fb) == default
    assert SimulationConfig().class_weighted and SimulationConfig().guard_confidence == 0.95
