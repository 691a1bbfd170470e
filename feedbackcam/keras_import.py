"""Import the thesis' Keras SkinCare VGG16 (an HDF5 ``.h5`` file) into PyTorch.

The thesis model was built and trained in Keras (Listing 3.1: ``block1_conv1`` ... ``block5_conv3``,
``fc1``, ``fc2``, ``predictions``). This module reads its weights with ``h5py`` (no TensorFlow) and
loads them into :func:`feedbackcam.models.skincare_vgg16`. Three layout differences matter:

- Conv kernels: Keras stores (kh, kw, in, out); torch wants (out, in, kh, kw).
- Dense kernels: Keras stores (in, out); ``nn.Linear`` wants (out, in).
- ``fc1`` reads Keras' ``Flatten`` of a channels-last 7x7x512 map, i.e. features in (h, w, c)
  order; torch flattens (c, h, w). fc1's input rows are permuted accordingly, so the imported
  model gives the Keras logits on the same image.

And one preprocessing difference: Keras VGG16 models normally take
``keras.applications.vgg16.preprocess_input`` ("caffe": RGB to BGR, 0-255, minus the ImageNet
BGR mean). With ``preprocessing="caffe"`` the first conv's input channels are reversed and the
wrapper's mean/std are set so that the imported model takes RGB in [0, 1] like every model here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from .models import VGG16_EXPLANATION_LAYER, SelfExplaining, skincare_vgg16

# Keras layer name -> index in torchvision's VGG16 ``features``.
KERAS_CONV_LAYERS: dict[str, int] = {
    "block1_conv1": 0,
    "block1_conv2": 2,
    "block2_conv1": 5,
    "block2_conv2": 7,
    "block3_conv1": 10,
    "block3_conv2": 12,
    "block3_conv3": 14,
    "block4_conv1": 17,
    "block4_conv2": 19,
    "block4_conv3": 21,
    "block5_conv1": 24,
    "block5_conv2": 26,
    "block5_conv3": 28,
}
# Keras layer name -> index in SkinCareVGG16's ``classifier``.
KERAS_DENSE_LAYERS: dict[str, int] = {"fc1": 0, "fc2": 3, "predictions": 6}
# block5_pool output at 227x227 (and 224x224) input: the (h, w, c) that fc1 flattens.
POOL5_HWC = (7, 7, 512)

Preprocessing = Literal["caffe", "rescale", "tf", "torch"]
# (mean, std) on RGB inputs in [0, 1] that reproduce each Keras preprocessing.
PREPROCESSING: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # keras vgg16.preprocess_input: 255 * x[..., ::-1] - (103.939, 116.779, 123.68), as BGR
    "caffe": ((123.68 / 255, 116.779 / 255, 103.939 / 255), (1 / 255,) * 3),
    "rescale": ((0.0,) * 3, (1.0,) * 3),  # x / 255 (ImageDataGenerator(rescale=1/255))
    "tf": ((0.5,) * 3, (0.5,) * 3),  # x / 127.5 - 1
    "torch": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet mean/std
}


def import_keras(
    h5_path: str | Path,
    num_classes: int | None = None,
    *,
    preprocessing: Preprocessing = "caffe",
) -> SelfExplaining:
    """Convert a Keras HDF5 SkinCare VGG16 into :func:`~feedbackcam.models.skincare_vgg16`.

    Both Keras HDF5 layouts are read: a full model saved with ``model.save("x.h5")`` (weights
    under ``model_weights/<layer>/<layer>/kernel:0``) and a weights-only file from
    ``model.save_weights("x.h5")`` (``<layer>/<layer>/kernel:0`` at the top level).

    Args:
        h5_path: the Keras ``.h5`` file.
        num_classes: size of the ``predictions`` layer; ``None`` reads it from the file. Given,
            it must match the file.
        preprocessing: what the Keras model was trained on, so the imported model can take RGB
            in [0, 1]: ``"caffe"`` (``keras.applications.vgg16.preprocess_input``, the default
            for Keras VGG16), ``"rescale"`` (x / 255), ``"tf"`` (x / 127.5 - 1) or ``"torch"``
            (ImageNet mean/std on x / 255).

    Returns:
        A :class:`~feedbackcam.models.SelfExplaining` SkinCare VGG16 explaining at
        ``"features.29"`` (block5_conv3 after its ReLU), in train mode like a fresh model.

    Raises:
        FileNotFoundError: no file at ``h5_path``.
        ValueError: not an HDF5 file, a layer missing, or a weight of the wrong shape; the message
            names the file and the layer.
        ImportError: ``h5py`` is not installed.
    """
    path = Path(h5_path)
    if preprocessing not in PREPROCESSING:
        raise ValueError(
            f"preprocessing: expected one of {tuple(PREPROCESSING)}, got {preprocessing!r}"
        )
    if num_classes is not None and (
        not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2
    ):
        raise ValueError(f"num_classes: expected an int >= 2 or None, got {num_classes!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Keras weights file not found")
    weights = read_keras_weights(path, [*KERAS_CONV_LAYERS, *KERAS_DENSE_LAYERS])

    file_classes = weights["predictions"][0].shape[-1]
    if num_classes is None:
        num_classes = file_classes
    elif num_classes != file_classes:
        raise ValueError(
            f"{path}: layer 'predictions' has {file_classes} outputs, "
            f"but num_classes={num_classes} was asked for"
        )
    # Every parameter is overwritten below: build on the meta device to skip initialising 70M
    # random weights (seconds on a CPU), then adopt the converted tensors with assign=True.
    with torch.device("meta"):
        net = skincare_vgg16(num_classes).model
    state: dict[str, Tensor] = {}
    for layer, index in KERAS_CONV_LAYERS.items():
        kernel, bias = weights[layer]
        weight = conv_kernel_to_torch(kernel)
        if layer == "block1_conv1" and preprocessing == "caffe":
            # Keras saw BGR; reversing the input channels lets the torch model take RGB.
            weight = weight.flip(1)
        state[f"features.{index}.weight"] = weight
        state[f"features.{index}.bias"] = bias
    for layer, index in KERAS_DENSE_LAYERS.items():
        kernel, bias = weights[layer]
        if layer == "fc1":
            kernel = flatten_rows_hwc_to_chw(kernel, POOL5_HWC, path=path, layer=layer)
        state[f"classifier.{index}.weight"] = dense_kernel_to_torch(kernel)
        state[f"classifier.{index}.bias"] = bias

    own = net.state_dict()
    for key, value in state.items():
        layer = _layer_of(key)
        if own[key].shape != value.shape:
            raise ValueError(
                f"{path}: layer {layer!r} has a weight of shape {tuple(value.shape)} after "
                f"conversion, SkinCare VGG16 expects {tuple(own[key].shape)} ({key})"
            )
    net.load_state_dict(state, assign=True)
    mean, std = PREPROCESSING[preprocessing]
    return SelfExplaining(net, VGG16_EXPLANATION_LAYER, mean=mean, std=std)


def read_keras_weights(path: str | Path, layers: list[str]) -> dict[str, tuple[Tensor, Tensor]]:
    """Read ``(kernel, bias)`` of each named layer from a Keras HDF5 file, in Keras layout.

    Args:
        path: a Keras ``.h5`` file (full model or weights only).
        layers: Keras layer names.

    Returns:
        ``{layer: (kernel, bias)}`` as float32 numpy-backed tensors, shapes as Keras stores them.
    """
    try:
        import h5py
    except ImportError as err:
        raise ImportError(
            "reading Keras .h5 files needs h5py: pip install h5py (or pip install feedbackcam)"
        ) from err
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path}: not a readable HDF5 file ({err})") from err
    with f:
        root = f.get("model_weights", f)
        if "layers" in root and not any(layer in root for layer in layers):
            root = root["layers"]  # Keras 3 ".weights.h5"
        missing = [layer for layer in layers if layer not in root]
        if missing:
            raise ValueError(
                f"{path}: Keras layer(s) {missing} not found; the file has layers "
                f"{sorted(root.keys())}"
            )
        return {layer: _kernel_and_bias(root[layer], path, layer) for layer in layers}


def conv_kernel_to_torch(kernel: Tensor | np.ndarray) -> Tensor:
    """Keras Conv2D kernel (kh, kw, in, out) -> torch Conv2d weight (out, in, kh, kw)."""
    kernel = torch.as_tensor(kernel, dtype=torch.float32)
    if kernel.ndim != 4:
        raise ValueError(f"kernel: expected 4 dims (kh, kw, in, out), got {tuple(kernel.shape)}")
    return kernel.permute(3, 2, 0, 1).contiguous()


def dense_kernel_to_torch(kernel: Tensor | np.ndarray) -> Tensor:
    """Keras Dense kernel (in, out) -> torch Linear weight (out, in)."""
    kernel = torch.as_tensor(kernel, dtype=torch.float32)
    if kernel.ndim != 2:
        raise ValueError(f"kernel: expected 2 dims (in, out), got {tuple(kernel.shape)}")
    return kernel.t().contiguous()


def flatten_rows_hwc_to_chw(
    kernel: Tensor | np.ndarray,
    hwc: tuple[int, int, int],
    *,
    path: str | Path = "<array>",
    layer: str = "dense",
) -> Tensor:
    """Reorder a Dense kernel's input rows from Keras' channels-last flatten to torch's.

    Keras flattens an (h, w, c) map at row ``(i * w + j) * c + k``; ``torch.flatten`` of the
    (c, h, w) map puts the same feature at ``k * h * w + i * w + j``. The returned kernel, still
    (in, out), takes torch-ordered features.
    """
    kernel = torch.as_tensor(kernel, dtype=torch.float32)
    h, w, c = hwc
    if kernel.ndim != 2 or kernel.shape[0] != h * w * c:
        raise ValueError(
            f"{path}: layer {layer!r} kernel has shape {tuple(kernel.shape)}; expected "
            f"({h * w * c}, n) to read a flattened {h}x{w}x{c} map"
        )
    return kernel.reshape(h, w, c, -1).permute(2, 0, 1, 3).reshape(h * w * c, -1).contiguous()


def _kernel_and_bias(group, path: Path, layer: str) -> tuple[Tensor, Tensor]:
    # Keras 2 lists a layer's weights in its "weight_names" attribute ("fc1/kernel:0", ...);
    # without it, try the usual paths: Keras 3's legacy writer may drop the ":0", and Keras 3's
    # ".weights.h5" keeps them unnamed as "vars/0" (kernel) and "vars/1" (bias).
    names = [
        n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get("weight_names", [])
    ]
    tensors = []
    for part, fallback in (("kernel", "vars/0"), ("bias", "vars/1")):
        listed = [n for n in names if n.rsplit("/", 1)[-1].startswith(part)]
        candidates = [*listed, f"{layer}/{part}:0", f"{layer}/{part}", f"{part}:0", part, fallback]
        found = next((group[c] for c in candidates if c in group), None)
        if found is None or not hasattr(found, "shape"):
            raise ValueError(f"{path}: layer {layer!r} has no '{part}' weight")
        tensors.append(torch.from_numpy(np.array(found, dtype=np.float32)))
    kernel, bias = tensors
    if bias.ndim != 1 or bias.shape[0] != kernel.shape[-1]:
        raise ValueError(
            f"{path}: layer {layer!r}: bias of shape {tuple(bias.shape)} does not match a kernel "
            f"of shape {tuple(kernel.shape)}"
        )
    return kernel, bias


def _layer_of(key: str) -> str:
    section, index, _ = key.split(".")
    table = KERAS_CONV_LAYERS if section == "features" else KERAS_DENSE_LAYERS
    return next(name for name, i in table.items() if i == int(index))
