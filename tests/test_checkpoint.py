import pytest
import torch

from feedbackcam import checkpoint
from feedbackcam.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from feedbackcam.models import build_model


def _spec():
    return ModelSpec("small_cnn", ("NV", "MEL", "BKL"), ("features.relu4",), 32, {"width": 8})


def test_round_trip_describes_itself(tmp_path):
    torch.manual_seed(0)
    model = build_model("small_cnn", 3, width=8)
    path = save_checkpoint(tmp_path / "m.pt", model, _spec(), config={"lr": 0.1})
    loaded, spec, payload = load_checkpoint(path)
    assert spec == _spec()
    assert payload["config"] == {"lr": 0.1}
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model.eval()(x).logits)


def test_torchvision_architectures_round_trip(tmp_path):
    model = build_model("torchvision:resnet18", 2, layers="layer4")
    spec = ModelSpec("torchvision:resnet18", ("a", "b"), ("layer4",), 64)
    loaded, _, _ = load_checkpoint(save_checkpoint(tmp_path / "r.pt", model, spec))
    assert loaded.layers == ("layer4",)


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = build_model("small_cnn", 3, width=8)
    path = save_checkpoint(tmp_path / "m.pt", model, _spec())
    before = path.read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, _spec())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind


def test_bad_checkpoints_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    with pytest.raises(ValueError, match="junk.pt"):
        load_checkpoint(junk)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(1)}, foreign)
    with pytest.raises(ValueError, match="foreign.pt.*not a feedbackcam checkpoint"):
        load_checkpoint(foreign)


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="arch"):
        build_model("alexnet", 3)
    with pytest.raises(ValueError, match="explanation layer"):
        build_model("torchvision:resnet18", 3)
