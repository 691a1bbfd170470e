"""The Keras import against numpy channels-last references, on files written with h5py."""

import numpy as np
import pytest
import torch

h5py = pytest.importorskip("h5py")

from feedbackcam.keras_import import (  # noqa: E402
    KERAS_CONV_LAYERS,
    flatten_rows_hwc_to_chw,
    import_keras,
    read_keras_weights,
)

CHANNELS = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
CAFFE_BGR_MEAN = np.array([103.939, 116.779, 123.68], dtype=np.float32)


def keras_shapes(num_classes: int = 8) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Kernel and bias shapes of Listing 3.1, as Keras stores them."""
    shapes = {
        layer: ((3, 3, CHANNELS[i], CHANNELS[i + 1]), (CHANNELS[i + 1],))
        for i, layer in enumerate(KERAS_CONV_LAYERS)
    }
    shapes["fc1"] = ((7 * 7 * 512, 2048), (2048,))
    shapes["fc2"] = ((2048, 2048), (2048,))
    shapes["predictions"] = ((2048, num_classes), (num_classes,))
    return shapes


def write_full_model_h5(path, weights):
    """Keras 2 ``model.save`` layout: model_weights/<layer>/<layer>/kernel:0, with weight_names."""
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights")
        for layer, (kernel, bias) in weights.items():
            group = root.create_group(layer)
            group.attrs["weight_names"] = [f"{layer}/kernel:0".encode(), f"{layer}/bias:0".encode()]
            group[f"{layer}/kernel:0"] = kernel
            group[f"{layer}/bias:0"] = bias


def write_linked_h5(path, source, layout, override=None):
    """Another Keras layout whose datasets link into ``source`` (saves writing 280 MB again)."""
    override = override or {}
    with h5py.File(path, "w") as f:
        for layer in keras_shapes():
            for part, index in (("kernel", 0), ("bias", 1)):
                name = f"{layer}/{layer}/{part}:0" if layout == "weights-only" else None
                if layout == "keras3":
                    name = f"layers/{layer}/vars/{index}"
                if (layer, part) in override:
                    f[name] = override[layer, part]
                else:
                    f[name] = h5py.ExternalLink(
                        str(source), f"model_weights/{layer}/{layer}/{part}:0"
                    )


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
    """A full-size SkinCare VGG16 in Keras layout with He-scaled random weights (~280 MB)."""
    rng = np.random.default_rng(0)
    weights = {}
    for layer, (kshape, bshape) in keras_shapes().items():
        fan_in = int(np.prod(kshape[:-1]))
        kernel = rng.standard_normal(kshape, dtype=np.float32) * np.float32(np.sqrt(2 / fan_in))
        weights[layer] = (kernel, rng.standard_normal(bshape, dtype=np.float32) * 0.1)
    path = tmp_path_factory.mktemp("keras") / "skincare_vgg16.h5"
    write_full_model_h5(path, weights)
    return path, weights


@pytest.fixture(scope="module")
def imported(keras_file):
    return import_keras(keras_file[0]).eval()


def numpy_conv_same(x_hwc: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Keras Conv2D(padding="same") on one channels-last image, straight from the definition."""
    kh, kw = kernel.shape[:2]
    h, w, _ = x_hwc.shape
    padded = np.pad(x_hwc, ((kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    out = np.zeros((h, w, kernel.shape[-1]), dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            out += padded[i : i + h, j : j + w, :] @ kernel[i, j].astype(np.float64)
    return out + bias


def relu(x):
    return np.maximum(x, 0)


def test_head_matches_a_channels_last_numpy_forward_on_a_227_input(keras_file, imported):
    _, weights = keras_file
    x = torch.rand(2, 3, 227, 227, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = imported(x)
        pool5 = imported.model.features(imported.normalize(x))
    assert pool5.shape == (2, 512, 7, 7)
    # Keras sees block5_pool as (7, 7, 512) and flattens it in (h, w, c) order
    flat = pool5.permute(0, 2, 3, 1).reshape(2, -1).double().numpy()
    h = relu(flat @ weights["fc1"][0] + weights["fc1"][1])
    h = relu(h @ weights["fc2"][0] + weights["fc2"][1])
    logits = h @ weights["predictions"][0] + weights["predictions"][1]
    assert out.logits.shape == (2, 8)
    np.testing.assert_allclose(out.logits.double().numpy(), logits, rtol=1e-3, atol=1e-3)
    assert out.activations[0].shape == (2, 512, 14, 14)


@pytest.mark.parametrize("layer", ["block1_conv1", "block2_conv1"])
def test_conv_layers_match_a_channels_last_numpy_convolution(keras_file, imported, layer):
    _, weights = keras_file
    kernel, bias = weights[layer]
    index = KERAS_CONV_LAYERS[layer]
    rng = np.random.default_rng(1)
    rgb = rng.random((9, 11, kernel.shape[2]), dtype=np.float32)  # non-square: catches kh/kw swaps
    if layer == "block1_conv1":
        # The Keras model sees caffe-preprocessed BGR; the torch model RGB in [0, 1].
        keras_in = 255 * rgb[..., ::-1] - CAFFE_BGR_MEAN
        torch_in = imported.normalize(torch.from_numpy(rgb).permute(2, 0, 1)[None])
    else:
        keras_in = rgb
        torch_in = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    expected = numpy_conv_same(keras_in, kernel, bias)
    with torch.no_grad():
        got = imported.model.features[index](torch_in)[0].permute(1, 2, 0).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)


def test_flatten_permutation_maps_torch_flatten_onto_keras_flatten():
    rng = np.random.default_rng(2)
    chw = rng.standard_normal((5, 3, 4)).astype(np.float32)  # (c, h, w)
    kernel = rng.standard_normal((3 * 4 * 5, 6)).astype(np.float32)  # Keras (in, out)
    keras_out = chw.transpose(1, 2, 0).reshape(-1) @ kernel
    torch_out = torch.from_numpy(chw).flatten() @ flatten_rows_hwc_to_chw(kernel, (3, 4, 5))
    np.testing.assert_allclose(torch_out.numpy(), keras_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["weights-only", "keras3"])
def test_other_keras_layouts_read_the_same_weights(keras_file, tmp_path, layout):
    source, weights = keras_file
    path = tmp_path / "weights.h5"
    write_linked_h5(path, source, layout)
    read = read_keras_weights(path, list(keras_shapes()))
    for layer, (kernel, bias) in weights.items():
        assert np.array_equal(read[layer][0].numpy(), kernel), layer
        assert np.array_equal(read[layer][1].numpy(), bias), layer


def test_preprocessing_choices_set_the_wrappers_normalisation(keras_file, imported):
    rescaled = import_keras(keras_file[0], 8, preprocessing="rescale")
    assert rescaled.mean.flatten().tolist() == [0.0, 0.0, 0.0]
    # caffe reverses the input channels of block1_conv1 only
    torch.testing.assert_close(
        imported.model.features[0].weight, rescaled.model.features[0].weight.flip(1)
    )
    torch.testing.assert_close(imported.model.features[2].weight, rescaled.model.features[2].weight)


def test_wrong_class_count_missing_layer_and_bad_shape_name_the_file_and_layer(
    keras_file, tmp_path
):
    source, _ = keras_file
    with pytest.raises(ValueError, match="predictions.*8 outputs"):
        import_keras(source, num_classes=3)

    partial = tmp_path / "partial.h5"
    with h5py.File(partial, "w") as f:
        f["block1_conv1/block1_conv1/kernel:0"] = np.zeros((3, 3, 3, 64), np.float32)
        f["block1_conv1/block1_conv1/bias:0"] = np.zeros(64, np.float32)
    with pytest.raises(ValueError, match="partial.h5.*fc2"):
        import_keras(partial)

    bad = tmp_path / "bad_shape.h5"
    wrong = np.zeros((3, 3, 128, 64), np.float32)
    write_linked_h5(bad, source, "weights-only", {("block3_conv1", "kernel"): wrong})
    with pytest.raises(ValueError, match="bad_shape.h5.*block3_conv1"):
        import_keras(bad)

    not_h5 = tmp_path / "model.h5"
    not_h5.write_text("not hdf5")
    with pytest.raises(ValueError, match="model.h5"):
        import_keras(not_h5)
    with pytest.raises(FileNotFoundError, match="nothing.h5"):
        import_keras(tmp_path / "nothing.h5")
    with pytest.raises(ValueError, match="preprocessing"):
        import_keras(source, preprocessing="bgr")


def test_cli_import_keras_writes_a_self_describing_checkpoint(keras_file, imported, tmp_path):
    from feedbackcam.checkpoint import load_checkpoint
    from feedbackcam.cli import main

    path, _ = keras_file
    out = tmp_path / "skincare.pt"
    assert main(["import-keras", str(path), "--out", str(out)]) == 0
    model, spec, payload = load_checkpoint(out)
    assert spec.arch == "skincare_vgg16" and spec.input_size == 227 and len(spec.classes) == 8
    assert payload["config"]["imported_from"] == str(path)
    for (name, a), b in zip(model.state_dict().items(), imported.state_dict().values()):
        assert torch.equal(a, b), name
