import numpy as np
import pytest
from PIL import Image

from feedbackcam.checkpoint import ModelSpec, save_checkpoint
from feedbackcam.cli import main
from feedbackcam.explain import fit_square
from feedbackcam.imageio import read_rgb
from feedbackcam.models import build_model


@pytest.fixture
def ckpt(tmp_path):
    model = build_model("small_cnn", 3, width=8)
    spec = ModelSpec("small_cnn", ("NV", "MEL", "BKL"), ("features.relu4",), 48, {"width": 8})
    return save_checkpoint(tmp_path / "m.pt", model, spec)


def test_explain_writes_an_overlay_and_prints_the_prediction(tmp_path, ckpt, capsys):
    img = tmp_path / "lesion.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8)).save(img)
    out = tmp_path / "overlay.png"
    assert main(["explain", str(img), "--model", str(ckpt), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "lesion.jpg" in text and any(c in text for c in ("NV", "MEL", "BKL"))
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size[0] > 100


def test_explain_refuses_a_broken_image_and_writes_nothing(tmp_path, ckpt, capsys):
    img = tmp_path / "broken.jpg"
    good = tmp_path / "good.jpg"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(good)
    img.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    out = tmp_path / "overlay.png"
    assert main(["explain", str(img), "--model", str(ckpt), "--out", str(out)]) == 2
    assert "broken.jpg" in capsys.readouterr().err
    assert not out.exists()


def test_read_rgb_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.png"):
        read_rgb(tmp_path / "nothing.png")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png"):
        read_rgb(text)
    big = tmp_path / "big.png"
    Image.new("L", (200, 200)).save(big)
    with pytest.raises(ValueError, match="more than"):
        read_rgb(big, max_pixels=100)
    gray = tmp_path / "gray.png"
    Image.new("L", (10, 12)).save(gray)
    assert read_rgb(gray).shape == (12, 10, 3)
    assert read_rgb(gray, size=8).shape == (8, 8, 3)


def test_fit_square_squashes_or_pads_and_says_where_the_image_is():
    rgb = np.full((60, 80, 3), 200, np.uint8)
    squashed, box = fit_square(rgb, 48, "squash")
    assert squashed.shape == (48, 48, 3) and box == (0, 0, 48, 48) and (squashed == 200).all()
    padded, box = fit_square(rgb, 48, "pad")
    assert box == (0, 6, 48, 42)  # 80 px -> 48: scale 0.6; 10 px black above and below
    assert (padded[6:42] == 200).all() and not padded[:6].any() and not padded[42:].any()
    with pytest.raises(ValueError, match="fit"):
        fit_square(rgb, 48, "crop")


@pytest.mark.parametrize("fit, said", [("squash", "squashed from 80x60"), ("pad", "padded")])
def test_explain_says_how_it_fitted_a_non_square_image(tmp_path, ckpt, capsys, fit, said):
    img = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (60, 80, 3), np.uint8)).save(img)
    out = tmp_path / "overlay.png"
    assert main(["explain", str(img), "--model", str(ckpt), "--out", str(out), "--fit", fit]) == 0
    text = capsys.readouterr().out
    assert said in text and "80x60 aspect ratio" in text
    assert out.is_file()
