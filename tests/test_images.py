"""to_rgb (utils/data/images.py): the picture a file shows, checked against NumPy constructions of it."""
import numpy as np
import pytest
from PIL import Image

from utils.data.dataset import ImageTransform, LMDBImageTextDataset
from utils.data.images import EXIF_ORIENTATION, to_rgb
from utils.data.pack import PackOptions, folder_items, pack


def _pattern(h=6, w=10):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _with_orientation(arr, orientation, path):
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[EXIF_ORIENTATION] = orientation
    img.save(path, exif=exif)  # PNG: lossless, so the comparison is exact
    return Image.open(path)


@pytest.mark.parametrize("orientation, upright", [
    (1, lambda a: a),
    (3, lambda a: a[::-1, ::-1]),          # rotated 180 degrees
    (6, lambda a: np.rot90(a, k=-1)),      # shown turned 90 degrees clockwise (a phone held upright)
    (8, lambda a: np.rot90(a, k=1)),       # 90 degrees counter-clockwise
    (2, lambda a: a[:, ::-1]),             # mirrored
])
def test_exif_orientation_is_applied(orientation, upright, tmp_path):
    arr = _pattern()
    out = to_rgb(_with_orientation(arr, orientation, tmp_path / "x.png"))
    assert np.array_equal(np.asarray(out), upright(arr))


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000, 32768, 65535, 128]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    img = Image.open(tmp_path / "g16.png")
    assert img.mode.startswith("I")
    out = np.asarray(to_rgb(img))
    expected = np.round(values / 257).astype(np.uint8)  # 65535 -> 255
    assert out.shape == (1, 6, 3) and np.array_equal(out, np.repeat(expected[..., None], 3, axis=2))


def test_transparency_is_composited_onto_white():
    rgb = _pattern(4, 5).astype(np.float64)
    alpha = np.linspace(0, 255, 20).round().reshape(4, 5, 1)
    rgba = Image.fromarray(np.concatenate([rgb, alpha], axis=2).astype(np.uint8), "RGBA")
    expected = rgb * alpha / 255 + 255 * (1 - alpha / 255)
    out = np.asarray(to_rgb(rgba)).astype(np.float64)
    assert np.abs(out - expected).max() <= 1  # 8-bit rounding
    assert np.array_equal(out[0, 0], [255, 255, 255])  # fully transparent: the background

    palette = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), "P")
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    palette.info["transparency"] = 0  # index 0 is transparent
    assert np.asarray(to_rgb(palette)).tolist() == [[[255, 255, 255], [200, 10, 10]],
                                                    [[200, 10, 10], [255, 255, 255]]]


@pytest.mark.parametrize("keep_original", [False, True])
def test_packed_photos_are_read_upright(keep_original, tmp_path):
    """A phone photo stored sideways with an EXIF orientation, and a 16-bit scan, come out of the data set as
    they are shown, with the upright size in the shard index (the min-side / aspect filters read it)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    arr = np.zeros((40, 20, 3), dtype=np.uint8)
    arr[:, :10] = 255  # stored: white left half; shown (orientation 6, turned clockwise): white top half
    _with_orientation(arr, 6, folder / "phone.png")
    Image.fromarray(np.full((30, 30), 65535, dtype=np.uint16)).save(folder / "scan.png")
    for name in ("phone", "scan"):
        (folder / f"{name}.txt").write_text(name)
    pack(folder_items(folder), tmp_path / "out", PackOptions(keep_original=keep_original))
    ds = LMDBImageTextDataset([tmp_path / "out"], ImageTransform(20))
    assert ds.shards[0].sizes.tolist() == [[40, 20], [30, 30]]
    phone, scan = (ds[i] for i in range(2))
    assert phone["caption"] == "phone" and scan["caption"] == "scan"
    # the centre 20x20 crop of the upright 40x20 image: top half white, bottom half black
    rows = phone["image"].mean(dim=(0, 2))
    assert rows[:8].min() > 0.9 and rows[12:].max() < -0.9
    assert scan["image"].min() > 0.99  # 65535 is white, and so is every pixel
