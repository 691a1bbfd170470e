"""Discovery before anyone marks: the suspicion score (feedbackcam.suspicion), the explanation
clusters (feedbackcam.clusters), ``feedbackcam clusters`` and ``worklist add --order
suspicious``.

The models are built by hand so that what decides is known exactly: one decides from a magenta
patch beside the lesion (a shortcut), one from the lesion's dark area (the lesion itself)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_propagate import SIZE, patched_images
from torch import nn

from feedbackcam.checkpoint import ModelSpec, save_checkpoint
from feedbackcam.cli import main
from feedbackcam.clusters import explanation_clusters, map_features
from feedbackcam.data.dataset import ArrayDataset
from feedbackcam.data.prepared import save_prepared
from feedbackcam.models import small_cnn
from feedbackcam.self_explaining import SelfExplaining
from feedbackcam.suspicion import combine, donor_table, outside_share, suspicion, uncertainty


class Detector(nn.Module):
    """Class 1 when the share of pixels whose colour passes a fixed linear test exceeds
    ``level``: a 1x1 convolution, ReLU (the explanation layer), average, a fixed linear head."""

    def __init__(self, weights, bias: float, level: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor(weights, dtype=torch.float32).view(1, 3, 1, 1))
            self.conv.bias.fill_(bias)
            self.head.weight.copy_(torch.tensor([[-1000.0], [1000.0]]))
            self.head.bias.copy_(torch.tensor([1000.0 * level, -1000.0 * level]))

    def forward(self, x):
        return self.head(self.relu(self.conv(x)).mean((1, 2, 3))[:, None])


def detector(weights, bias, level) -> SelfExplaining:
    return SelfExplaining(Detector(weights, bias, level), "relu", mean=(0, 0, 0), std=(1, 1, 1))


def patch_model() -> SelfExplaining:
    """Decides from the magenta patch (r + b - 2g is high only there): a shortcut."""
    return detector([1.0, -2.0, 1.0], -0.6, 0.004)


def lesion_model() -> SelfExplaining:
    """Decides from the dark lesion's area (class 1: a large lesion): no shortcut."""
    return detector([-1 / 3, -1 / 3, -1 / 3], 0.5, 0.022)


@pytest.fixture(scope="module")
def scene():
    return patched_images(n=120, seed=3)


def test_outside_share_is_the_explanation_map_outside_the_keep_mask():
    keep = torch.zeros(3, 8, 8)
    keep[:, :4] = 1
    keep[2] = 0  # no keep mask: nothing to judge
    sal = torch.zeros(3, 8, 8)
    sal[0, 1, 1] = 1.0  # inside
    sal[1, 6, 6], sal[1, 1, 1] = 1.0, 0.6  # outside, and 60 % of the max inside: half out
    sal[2, 6, 6] = 1.0
    got = outside_share(sal, keep)
    assert got[0] == 0 and got[1] == pytest.approx(0.5) and torch.isnan(got[2])
    # below 50 % of the maximum is not part of the map
    sal[0, 6, 6] = 0.4
    assert outside_share(sal, keep)[0] == 0


def test_uncertainty_combine_and_donors():
    probs = torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0]])
    assert uncertainty(probs).tolist() == pytest.approx([0.0, 1.0, 0.75], abs=1e-6)
    both = combine({"outside": np.array([1.0, np.nan]), "uncertainty": np.array([0.0, 0.4])})
    assert both.tolist() == pytest.approx([0.5, 0.4])  # a missing sign is left out, not zero
    table = donor_table(10, 4, seed=1)
    assert table.shape == (10, 4)
    assert all(i not in row and len(set(row)) == 4 for i, row in enumerate(table.tolist()))
    assert donor_table(3, 4).shape == (3, 2) and donor_table(1, 4).shape == (1, 0)


def test_a_shortcut_model_is_suspicious_where_the_shortcut_decides(scene):
    images, patches, lesions, has = scene
    shortcut = suspicion(patch_model(), images, lesions)
    assert (shortcut.predicted == has).all()  # the hand-built model decides from the patch
    # the patched images come first: their map lies on the patch, other surroundings flip them
    head = shortcut.order()[: int(has.sum())]
    assert has[head].mean() >= 0.9
    assert np.nanmean(shortcut.outside[has]) > 0.9
    assert np.nanmean(shortcut.swap[has]) > np.nanmean(shortcut.swap[~has]) + 0.3
    # a model that decides from the lesion is not suspicious on the same images
    honest = suspicion(lesion_model(), images, lesions)
    assert np.nanmean(honest.outside) < 0.1
    assert np.nanmean(honest.swap) < 0.1
    assert honest.score[has].mean() < shortcut.score[has].mean() - 0.3
    # without keep masks only the uncertainty is left, and it says so (NaN signs)
    blind = suspicion(patch_model(), images)
    assert np.isnan(blind.outside).all() and np.isnan(blind.swap).all()
    assert np.allclose(blind.score, blind.uncertainty)


def test_clusters_are_found_per_class_and_ranked_by_suspicion():
    rng = np.random.default_rng(0)
    centres = np.array([[5.0, 0], [0, 5.0], [-5.0, 0]])
    group = np.repeat([0, 1, 2], 30)
    features = centres[group] + rng.normal(0, 0.3, (90, 2))
    predicted = np.where(group == 2, 1, 0)  # groups 0 and 1 are one class, group 2 another
    score = np.where(group == 1, 0.8, 0.1) + rng.uniform(0, 0.05, 90)
    found = explanation_clusters(features, predicted, score, k=2)
    top = found.ranked[0]
    assert found.purity(group == 1) == 1.0 and len(found.members[top]) == 30
    assert found.classes[top] == 0
    assert score[found.members[top][0]] == score[group == 1].max()  # most suspicious first
    assert sorted(found.classes.values()) == [0, 0, 1, 1]  # k clusters within each class
    with pytest.raises(ValueError, match="one row per image"):
        explanation_clusters(features, predicted[:10], score)


def test_map_clusters_separate_a_patch_strategy(scene):
    images, patches, lesions, has = scene
    model = patch_model()
    found = suspicion(model, images, lesions)
    groups = explanation_clusters(map_features(found.maps), found.predicted, found.score, k=4)
    assert groups.purity(has) == 1.0  # the most suspicious cluster is the patch's


def _small_cnn_checkpoint(path):
    torch.manual_seed(0)
    model = small_cnn(num_classes=2, width=8)
    spec = ModelSpec("small_cnn", ("clean", "patch"), model.layers, SIZE, {"width": 8})
    save_checkpoint(path, model, spec)
    return path


def test_clusters_command_writes_a_ranked_report(tmp_path, scene, capsys):
    images, patches, lesions, has = scene
    data = ArrayDataset(
        images=images,
        masks=lesions,
        labels=has.astype(np.int64),
        has_mask=np.ones(len(images), bool),
        ids=tuple(f"im{i:03d}" for i in range(len(images))),
        classes=("clean", "patch"),
    )
    save_prepared(data, tmp_path / "prepared")
    ckpt = _small_cnn_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "report"
    args = ["clusters", "--data", str(tmp_path / "prepared"), "--model", str(ckpt)]
    assert main([*args, "--out", str(out), "--clusters", "3"]) == 0
    rows = list(csv.DictReader((out / "clusters.csv").read_text().splitlines()))
    assert sorted(r["id"] for r in rows) == sorted(data.ids)  # every image once
    ranks = [int(r["cluster"]) for r in rows]
    assert ranks == sorted(ranks) and ranks[0] == 1
    summary = (out / "summary.md").read_text()
    assert summary.count("\n| ") - 1 == max(ranks)  # one table row per cluster
    with Image.open(out / "clusters.png") as sheet:
        assert sheet.size[0] > 400
    assert json.loads((out / "config.json").read_text())["with_lesion_mask"] == len(images)
    # a model of another input size is named, not run
    small = ModelSpec("small_cnn", ("clean", "patch"), ("features.relu4",), 32, {"width": 8})
    save_checkpoint(tmp_path / "m32.pt", small_cnn(2, width=8), small)
    bad = ["clusters", "--data", str(tmp_path / "prepared"), "--model", str(tmp_path / "m32.pt")]
    assert main([*bad, "--out", str(tmp_path / "r2")]) == 2
    assert "expects 32 px" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()


def test_worklist_in_suspicious_order(tmp_path, scene, capsys):
    from feedbackcam.service import worklist as lists
    from feedbackcam.service.db import Worklist, connect
    from feedbackcam.service.settings import Settings

    images, patches, lesions, has = scene
    folder, masks = tmp_path / "incoming", tmp_path / "lesions"
    folder.mkdir()
    masks.mkdir()
    for i in range(12):
        Image.fromarray(images[i]).save(folder / f"case{i:02d}.png")
        Image.fromarray(lesions[i] * 255).save(masks / f"case{i:02d}.png")
    ckpt = _small_cnn_checkpoint(tmp_path / "m.pt")
    store = ["--data-dir", str(tmp_path / "app")]
    connect(Settings(data_dir=tmp_path / "app").database_url)[0].dispose()  # an empty store
    # no model and nothing served: a clear error, no worklist
    assert main(["worklist", "add", str(folder), "--order", "suspicious", *store]) == 2
    assert "needs a model" in capsys.readouterr().err
    cmd = ["worklist", "add", str(folder), "--order", "suspicious", "--model", str(ckpt)]
    assert main([*cmd, "--masks", str(masks), *store]) == 0
    printed = capsys.readouterr().out
    assert "suspicion" in printed and "outside" in printed
    engine, sessions = connect(Settings(data_dir=tmp_path / "app").database_url)
    with sessions() as session:
        made = session.query(Worklist).one()
        names = [e.name for e in lists.entries(session, made.id)]
    engine.dispose()
    # the stored order is the suspicion order of the same model on the same inputs
    from feedbackcam.checkpoint import load_checkpoint

    model, _, _ = load_checkpoint(ckpt)
    expected = suspicion(model.eval(), images[:12], lesions[:12]).order()
    assert names == [f"case{i:02d}.png" for i in expected]
    assert names != sorted(names)  # not simply the folder's order
