"""onnxfactor.data: npz / image folder / script / iterable sources, the feed checks, the overlap rule."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxfactor.data import Batch, FeedSource, ImageSpec, check_disjoint, image_spec, open_source, sample_digests
from onnxfactor.data.images import ImageFolderSource
from onnxfactor.errors import UsageError
from tests.conftest import MODELS

Image = pytest.importorskip("PIL.Image")
skdata = pytest.importorskip("skimage.data")

SCALE = 1 / 255


# ------------------------------------------------------------------------------------------------
# Models (only their inputs matter here) and helpers


def model_with(*inputs: tuple[str, int, list]) -> onnx.ModelProto:
    """A model whose real inputs are ``(name, elem_type, shape)``; one Identity per input."""
    values = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n, _, _ in inputs]
    outputs = [helper.make_tensor_value_info(f"{n}_out", t, s) for n, t, s in inputs]
    return helper.make_model(helper.make_graph(nodes, "m", values, outputs), opset_imports=[helper.make_opsetid("", 17)])


def image_model(shape, elem=TensorProto.FLOAT) -> onnx.ModelProto:
    return model_with(("x", elem, list(shape)))


def vector_model(batch="N") -> onnx.ModelProto:
    """x float32 [batch, 4]."""
    return model_with(("x", TensorProto.FLOAT, [batch, 4]))


def int_model() -> onnx.ModelProto:
    """ids int64 [N, 3], mask bool [N, 3], pixels uint8 [N, 3]."""
    return model_with(("ids", TensorProto.INT64, ["N", 3]), ("mask", TensorProto.BOOL, ["N", 3]), ("pixels", TensorProto.UINT8, ["N", 3]))


def rows(n, start=0):
    return (np.arange(start, start + n, dtype=np.float32)[:, None] + np.arange(4, dtype=np.float32) / 10)


def collect(source: FeedSource) -> list[Batch]:
    return list(source.batches())


def assert_same_batches(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        assert (x.size, x.start, x.per_sample) == (y.size, y.start, y.per_sample)
        assert x.feeds.keys() == y.feeds.keys()
        for k in x.feeds:
            np.testing.assert_array_equal(x.feeds[k], y.feeds[k])
        assert (x.labels is None) == (y.labels is None)
        if x.labels is not None:
            np.testing.assert_array_equal(x.labels, y.labels)


def one_line_error(info) -> str:
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------------------
# Image folder: real photos, hand-computed preprocessing

H, W = 24, 31  # astronaut (512x512) letterboxes to 24x24 + 7 pad columns (3 left, 4 right); coffee (400x600) to 21x31 + 3 pad rows


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """``a/coffee.jpg`` (400x600 RGB JPEG), ``a/sub/camera.PNG`` (512x512 grayscale), ``b/astronaut.png`` (512x512 RGB)."""
    root = tmp_path_factory.mktemp("photos")
    (root / "a" / "sub").mkdir(parents=True)
    (root / "b").mkdir()
    Image.fromarray(skdata.coffee()).save(root / "a" / "coffee.jpg", quality=90)
    Image.fromarray(skdata.camera()).save(root / "a" / "sub" / "camera.PNG")
    Image.fromarray(skdata.astronaut()).save(root / "b" / "astronaut.png")
    (root / "b" / "notes.txt").write_text("not an image")
    return root


ORDER = ["a/coffee.jpg", "a/sub/camera.PNG", "b/astronaut.png"]


def decoded(path: Path, channels: int) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("L" if channels == 1 else "RGB")


def normalised(pixels: np.ndarray, *, mean=(0.0,), std=(1.0,), bgr=False) -> np.ndarray:
    """uint8 H x W [x C] -> float64 H x W x C, channels reversed for bgr, then scale / mean / std."""
    x = pixels.astype(np.float64)
    if x.ndim == 2:
        x = x[:, :, None]
    if bgr:
        x = x[:, :, ::-1]
    return (x * SCALE - np.asarray(mean)) / np.asarray(std)


def stretch_ref(path, channels):
    return np.asarray(decoded(path, channels).resize((W, H), Image.BILINEAR))


def test_folder_order_paths_and_batches(photos):
    source = open_source(photos, image_model(["N", 3, H, W]), batch_size=2)
    assert source.samples == 3 and source.describe == f"images in {photos.name}/ (3 files, stretch {H}x{W})"
    assert source.paths == frozenset((photos / p).resolve() for p in ORDER)
    batches = collect(source)
    assert [(b.size, b.start) for b in batches] == [(2, 0), (1, 2)]
    assert all(b.labels is None and b.per_sample == {"x"} for b in batches)
    x = np.concatenate([b.feeds["x"] for b in batches])
    assert x.dtype == np.float32 and x.shape == (3, 3, H, W)
    for i, rel in enumerate(ORDER):  # sorted by relative path, recursively; the grayscale one is expanded to RGB
        expected = normalised(stretch_ref(photos / rel, 3)).transpose(2, 0, 1)
        np.testing.assert_allclose(x[i], expected, atol=1e-6, rtol=0)
    assert_same_batches(batches, collect(source))  # re-iterable


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_folder_stretch_bgr_mean_std(photos, layout):
    mean, std = (0.406, 0.456, 0.485), (0.225, 0.224, 0.229)  # in the fed (BGR) order
    shape = ["N", 3, H, W] if layout == "nchw" else ["N", H, W, 3]
    spec = ImageSpec(mean=mean, std=std, channel_order="bgr")
    (batch,) = collect(open_source(photos, image_model(shape), images=spec))
    for i, rel in enumerate(ORDER):
        expected = normalised(stretch_ref(photos / rel, 3), mean=mean, std=std, bgr=True)
        got = batch.feeds["x"][i] if layout == "nhwc" else batch.feeds["x"][i].transpose(1, 2, 0)
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    # bgr really reverses: the red-dominated coffee cup has its largest raw channel first in RGB, last in BGR
    raw = stretch_ref(photos / ORDER[0], 3).astype(np.float64).mean(axis=(0, 1))
    assert raw[0] > raw[2]


def test_folder_letterbox_geometry(photos):
    mean, std = (0.5,), (0.25,)
    source = open_source(photos, image_model([1, 3, H, W]), images=ImageSpec(resize="letterbox", mean=mean, std=std))
    assert source.describe == f"images in {photos.name}/ (3 files, letterbox {H}x{W})"
    x = np.concatenate([b.feeds["x"] for b in source.batches()]).transpose(0, 2, 3, 1)  # N x H x W x C
    pad = (114 * SCALE - 0.5) / 0.25

    coffee = x[0]  # 400x600: s = 31/600, resized to 21x31, 3 pad rows: 1 on top, 2 at the bottom
    np.testing.assert_allclose(coffee[[0, 22, 23]], pad, atol=1e-6, rtol=0)
    resized = np.asarray(decoded(photos / ORDER[0], 3).resize((31, 21), Image.BILINEAR))
    np.testing.assert_allclose(coffee[1:22], normalised(resized, mean=mean, std=std), atol=1e-6, rtol=0)

    astronaut = x[2]  # 512x512: s = 24/512, resized to 24x24, 7 pad columns: 3 left, 4 right
    np.testing.assert_allclose(astronaut[:, [0, 1, 2, 27, 28, 29, 30]], pad, atol=1e-6, rtol=0)
    resized = np.asarray(decoded(photos / ORDER[2], 3).resize((24, 24), Image.BILINEAR))
    np.testing.assert_allclose(astronaut[:, 3:27], normalised(resized, mean=mean, std=std), atol=1e-6, rtol=0)
    assert not np.allclose(astronaut[:, 3], pad)  # the image starts right after the padding


def test_folder_short_side_center_crop(photos):
    source = open_source(photos, image_model(["N", H, W, 3]), images=ImageSpec(resize="short-side+center-crop"))
    (batch,) = collect(source)
    x = batch.feeds["x"]
    # coffee 400x600: s = max(24/400, 31/600) = 0.06 -> 24x36, 5 extra columns: 2 cut on the left, 3 on the right
    resized = np.asarray(decoded(photos / ORDER[0], 3).resize((36, 24), Image.BILINEAR))
    np.testing.assert_allclose(x[0], normalised(resized[:, 2:33]), atol=1e-6, rtol=0)
    # astronaut 512x512: s = max(24/512, 31/512) -> 31x31, 7 extra rows: 3 cut on top, 4 at the bottom
    resized = np.asarray(decoded(photos / ORDER[2], 3).resize((31, 31), Image.BILINEAR))
    np.testing.assert_allclose(x[2], normalised(resized[3:27]), atol=1e-6, rtol=0)


def test_folder_grayscale_model_and_image_size(photos):
    spec = image_spec("12x10")
    source = open_source(photos, image_model(["N", 1, "h", "w"]), images=spec)
    (batch,) = collect(source)
    assert batch.feeds["x"].shape == (3, 1, 12, 10)
    for i, rel in enumerate(ORDER):  # RGB photos are converted with Pillow's "L"
        expected = normalised(np.asarray(decoded(photos / rel, 1).resize((10, 12), Image.BILINEAR)))
        np.testing.assert_allclose(batch.feeds["x"][i].transpose(1, 2, 0), expected, atol=1e-6, rtol=0)


def test_folder_uint8_input_takes_raw_pixels(photos):
    (batch,) = collect(open_source(photos, image_model(["N", 3, H, W], TensorProto.UINT8), images=ImageSpec(scale=1.0)))
    assert batch.feeds["x"].dtype == np.uint8
    np.testing.assert_array_equal(batch.feeds["x"][2], stretch_ref(photos / ORDER[2], 3).transpose(2, 0, 1))
    with pytest.raises(UsageError, match="takes raw pixels; pass --scale 1"):
        open_source(photos, image_model(["N", 3, H, W], TensorProto.UINT8))


def test_folder_fixed_batch_drops_the_rest_and_max_samples(photos):
    source = open_source(photos, image_model([2, 3, H, W]))
    assert [b.size for b in source.batches()] == [2] and source.samples == 2
    source = open_source(photos, image_model(["N", 3, H, W]), max_samples=2, batch_size=1)
    assert [(b.start, b.size) for b in source.batches()] == [(0, 1), (1, 1)]
    assert source.paths == frozenset((photos / p).resolve() for p in ORDER[:2])


def test_folder_is_read_batch_by_batch(photos, monkeypatch):
    loads = []
    original = ImageFolderSource.load
    monkeypatch.setattr(ImageFolderSource, "load", lambda self, path: loads.append(path.name) or original(self, path))
    batches = open_source(photos, image_model(["N", 3, H, W]), batch_size=1).batches()
    next(batches)
    assert loads == ["coffee.jpg"]
    next(batches)
    assert loads == ["coffee.jpg", "camera.PNG"]


@pytest.mark.parametrize(
    ("make", "model", "spec", "fragments"),
    [
        ("empty", ["N", 3, H, W], None, ["holds no image files", "jpg, jpeg, png, bmp, webp"]),
        ("garbage", ["N", 3, H, W], None, ["cannot read image", "broken.png", "remove or replace the file"]),
        ("photos", ["N", 3, "h", "w"], None, ["dynamic spatial dims", "--image-size HxW"]),
        ("photos", ["N", 3, H, 3], None, ["cannot tell the channel axis", "--layout"]),
        ("photos", ["N", 4, H, W], ImageSpec(layout="nchw"), ["4 channels", "data-loader script"]),
        ("photos", ["N", 3, H, W], ImageSpec(size=(8, 8)), ["axis 2 is fixed at 24, got 8"]),
        ("photos", ["N", 3, H, W], ImageSpec(mean=(0.1, 0.2)), ["--mean has 2 values", "3 channels"]),
        ("photos", [3, H, W], None, ["not an image batch"]),
    ],
    ids=["empty", "garbage", "dynamic_size", "ambiguous_layout", "four_channels", "size_vs_fixed", "mean_length", "rank3"],
)
def test_folder_errors(make, model, spec, fragments, photos, tmp_path):
    folder = photos
    if make == "empty":
        folder = tmp_path / "empty"
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "readme.txt").write_text("no images here")
    elif make == "garbage":
        folder = tmp_path / "bad"
        folder.mkdir()
        (folder / "broken.png").write_bytes(b"\x89PNG garbage, not an image")
    with pytest.raises(UsageError) as info:
        collect(open_source(folder, image_model(model), images=spec))
    message = one_line_error(info)
    for fragment in fragments:
        assert fragment in message, message


def test_folder_needs_one_input(photos):
    with pytest.raises(UsageError, match="an image folder feeds one input, but the model has 2: ids, mask"):
        open_source(photos, model_with(("ids", TensorProto.FLOAT, ["N", 3, H, W]), ("mask", TensorProto.FLOAT, ["N", 3, H, W])))


def test_folder_without_pillow(photos, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(UsageError) as info:
        open_source(photos, image_model(["N", 3, H, W]))
    assert one_line_error(info) == "reading an image folder needs Pillow: pip install 'onnxfactor[images]'"


def test_one_image_file_is_not_a_folder(photos):
    with pytest.raises(UsageError, match="is one image; give the folder"):
        open_source(photos / "b" / "astronaut.png", image_model(["N", 3, H, W]))


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, ImageSpec()),
        ({"image_size": "224x320", "resize": "letterbox", "mean": "0.5", "std": "0.2,0.3,0.4", "layout": "nhwc"},
         ImageSpec(size=(224, 320), resize="letterbox", mean=(0.5,), std=(0.2, 0.3, 0.4), layout="nhwc")),
        ({"image_size": "64", "channel_order": "bgr", "scale": 1.0}, ImageSpec(size=(64, 64), channel_order="bgr", scale=1.0)),
    ],
)
def test_image_spec_parses(kwargs, expected):
    assert image_spec(**kwargs) == expected


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [({"image_size": "224x"}, "--image-size"), ({"image_size": "0x3"}, "--image-size"), ({"mean": "0.5,abc"}, "--mean"),
     ({"std": "0.2,0"}, "--std"), ({"scale": 0.0}, "--scale"), ({"resize": "squash"}, "--resize"), ({"layout": "chw"}, "--layout")],
)
def test_image_spec_rejects(kwargs, flag):
    with pytest.raises(UsageError) as info:
        image_spec(**kwargs)
    assert flag in one_line_error(info)


# ------------------------------------------------------------------------------------------------
# Data-loader scripts

LOADER = '''
import numpy as np

calls = []

def helper_not_a_loader():
    pass

def load_data():
    calls.append(1)
    return [{"x": np.full((2, 4), float(i), np.float32), "labels": np.array([i, i + 1])} for i in range(3)]

def batches_of_one():
    for i in range(2):
        yield {"x": np.full((1, 4), 10.0 + i)}
'''


@pytest.fixture
def script(tmp_path):
    def write(body=LOADER, name="loader.py"):
        path = tmp_path / name
        path.write_text(textwrap.dedent(body))
        return path

    return write


def test_script_default_function_and_reiteration(script):
    path = script()
    source = open_source(str(path), vector_model(), role="validation")
    assert source.samples is None and source.describe == "loader.py:load_data"
    assert source.paths == frozenset({path.resolve()})
    first = collect(source)
    assert [(b.start, b.size, b.labels.tolist()) for b in first] == [(0, 2, [0, 1]), (2, 2, [1, 2]), (4, 2, [2, 3])]
    np.testing.assert_array_equal(first[1].feeds["x"], np.ones((2, 4), np.float32))
    assert source.samples == 6 and source.describe == "loader.py:load_data (6 samples)"
    assert_same_batches(first, collect(source))
    module = sys.modules[source._fn.__module__]
    assert module.calls == [1, 1]  # the function is called again on every pass


def test_script_named_function_casts(script):
    source = open_source(f"{script()}:batches_of_one", vector_model())
    batches = collect(source)
    assert [(b.start, b.size) for b in batches] == [(0, 1), (1, 1)]
    assert batches[1].feeds["x"].dtype == np.float32 and batches[1].feeds["x"][0, 0] == 11.0  # float64 -> float32
    assert_same_batches(batches, collect(source))


def test_script_imports_its_neighbours(script):
    script("VALUE = 7.0\n", name="helpers.py")
    path = script("import numpy as np\nfrom helpers import VALUE\n\ndef load_data():\n    return [{'x': np.full((1, 4), VALUE, np.float32)}]\n")
    (batch,) = collect(open_source(path, vector_model()))
    assert batch.feeds["x"][0, 0] == 7.0


@pytest.mark.parametrize(
    ("body", "target", "fragments"),
    [
        ("raise RuntimeError('boom at import\\nsecond line')\n", "", ["loader.py failed on import: RuntimeError: boom at import", "--calibration"]),
        ("def load_data():\n    raise ValueError('no data here')\n", "", ["loader.py:load_data() failed when called: ValueError: no data here"]),
        ("import numpy as np\ndef load_data():\n    yield {'x': np.zeros((1, 4))}\n    raise KeyError('lost')\n", "",
         ["loader.py:load_data failed while yielding batch 1: KeyError: 'lost'"]),
        (LOADER, ":nope", ["loader.py has no function 'nope'", "its functions: batches_of_one, helper_not_a_loader, load_data", "loader.py:FUNCTION"]),
        ("def load_data():\n    return 3\n", "", ["returned int, not an iterable of feed dicts"]),
        ("import numpy as np\ndef load_data():\n    return [{'y': np.zeros((1, 4))}]\n", "",
         ["batch 0 of loader.py has no array for input(s) x", "its keys: y", "model inputs: x"]),
        ("import numpy as np\ndef load_data():\n    return [{'x': np.zeros((1, 4)), 'extra': 1}]\n", "",
         ["batch 0 of loader.py has key(s) 'extra', which are neither model inputs nor 'labels'", "its keys: x, extra", "model inputs: x"]),
        ("import numpy as np\ndef load_data():\n    return [{'x': np.zeros((2, 4))}, {'x': np.array([[0, 0, 0, 0], [1, 2, np.nan, 4.0]])}]\n", "",
         ["array 'x' in loader.py holds NaN at sample 3; remove or fix that sample"]),
        ("import numpy as np\ndef load_data():\n    return [{'x': np.zeros((2, 4)), 'labels': [1, 2]}, {'x': np.zeros((2, 4))}]\n", "",
         ["loader.py: earlier batches carry 'labels' but batch 1 does not"]),
    ],
    ids=["import", "call", "iteration", "missing_function", "not_iterable", "missing_key", "extra_key", "nan", "labels_in_some"],
)
def test_script_errors(body, target, fragments, script):
    path = script(body)
    with pytest.raises(UsageError) as info:
        collect(open_source(f"{path}{target}", vector_model()))
    message = one_line_error(info)
    for fragment in fragments:
        assert fragment in message, message


def test_missing_script_and_npz(tmp_path):
    with pytest.raises(UsageError, match=r"--calibration script '.*nope.py' does not exist"):
        open_source(tmp_path / "nope.py", vector_model())
    with pytest.raises(UsageError, match=r"--data file '.*nope.npz' does not exist"):
        open_source(str(tmp_path / "nope.npz"), vector_model(), role="validation")


# ------------------------------------------------------------------------------------------------
# Python iterables and CalibrationDataReader


def test_generator_is_read_once_and_replayed():
    runs = []

    def gen():
        runs.append(1)
        for i in range(3):
            yield {"x": rows(2, 2 * i)}

    source = open_source(gen(), vector_model())
    assert source.samples is None
    first = collect(source)
    assert [(b.start, b.size) for b in first] == [(0, 2), (2, 2), (4, 2)] and source.samples == 6
    assert_same_batches(first, collect(source))
    assert runs == [1]


def test_generator_partial_pass_then_full_pass():
    source = open_source(({"x": rows(1, i)} for i in range(4)), vector_model())
    next(source.batches())  # abandoned after one batch
    assert [b.feeds["x"][0, 0] for b in source.batches()] == [0.0, 1.0, 2.0, 3.0]
    assert [b.start for b in source.batches()] == [0, 1, 2, 3]


def test_calibration_data_reader_is_replayed():
    quantization = pytest.importorskip("onnxruntime.quantization")

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.calls = 0
            self.items = iter([{"x": rows(3)}, {"x": rows(3, 3)}])

        def get_next(self):
            self.calls += 1
            return next(self.items, None)

    reader = Reader()
    source = open_source(reader, vector_model())
    first = collect(source)
    assert [(b.start, b.size) for b in first] == [(0, 3), (3, 3)]
    assert reader.calls == 3  # two batches and the None that ends them
    assert_same_batches(first, collect(source))
    assert reader.calls == 3 and source.describe == "Reader reader (6 samples)"


def test_list_is_iterated_anew():
    feeds = [{"x": rows(2)}, {"x": rows(2, 2)}]
    source = open_source(feeds, vector_model())
    assert [b.feeds["x"][0, 0] for b in source.batches()] == [0.0, 2.0]
    feeds.append({"x": rows(1, 7)})
    assert [b.feeds["x"][0, 0] for b in source.batches()] == [0.0, 2.0, 7.0]
    assert source.paths == frozenset() and source.samples == 5


def test_max_samples_cuts_the_last_batch_and_wraps_sources():
    source = open_source([{"x": rows(4)}, {"x": rows(4, 4)}, {"x": rows(4, 8)}], vector_model(), max_samples=6)
    assert [(b.start, b.size) for b in source.batches()] == [(0, 4), (4, 2)] and source.samples == 6
    inner = open_source([{"x": rows(4)}], vector_model())
    assert open_source(inner, vector_model()) is inner
    assert [b.size for b in open_source(inner, vector_model(), max_samples=3).batches()] == [3]
    # a fixed batch dimension cannot be cut: the batch that does not fit is dropped
    fixed = open_source([{"x": rows(2)}, {"x": rows(2, 2)}], vector_model(batch=2), max_samples=3)
    assert [b.size for b in fixed.batches()] == [2]


@pytest.mark.parametrize("data", ["a dict", {"x": rows(2)}, 3])
def test_not_data(data):
    with pytest.raises(UsageError) as info:
        open_source(data, vector_model())
    one_line_error(info)


# ------------------------------------------------------------------------------------------------
# The checks, on every kind of source


def _npz(tmp_path, name="bad.npz", **arrays):
    np.savez(tmp_path / name, **arrays)
    return tmp_path / name


def _forms(tmp_path, arrays: dict, model_name="x"):
    """The same arrays as an .npz, as a script (one batch of 10 and the rest) and as a list of two batches."""
    npz = _npz(tmp_path, **arrays)
    first = {k: v[:10] for k, v in arrays.items()}
    rest = {k: v[10:] for k, v in arrays.items()}
    script = tmp_path / "bad_loader.py"
    np.savez(tmp_path / "arrays.npz", **arrays)
    script.write_text(
        "import numpy as np\n"
        f"def load_data():\n    d = np.load({str(tmp_path / 'arrays.npz')!r})\n"
        "    yield {k: d[k][:10] for k in d.files}\n    yield {k: d[k][10:] for k in d.files}\n"
    )
    return {"npz": (npz, "bad.npz"), "script": (str(script), "bad_loader.py"), "list": ([first, rest], "list of feed dicts")}


@pytest.mark.parametrize("form", ["npz", "script", "list"])
@pytest.mark.parametrize(("bad", "word"), [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_nan_and_inf_name_array_and_sample(form, bad, word, tmp_path):
    x = rows(20)
    x[17, 2] = bad
    data, name = _forms(tmp_path, {"x": x})[form]
    with pytest.raises(UsageError) as info:
        collect(open_source(data, vector_model(), batch_size=8))
    message = one_line_error(info)
    assert f"array 'x' in {name}" in message and f"holds {word} at sample 17; remove or fix that sample" in message


def test_npz_nan_is_found_when_opened(tmp_path):
    x = rows(100)
    x[99] = np.nan
    with pytest.raises(UsageError, match="holds NaN at sample 99"):
        open_source(_npz(tmp_path, x=x), vector_model())  # before any batch is asked for
    assert open_source(_npz(tmp_path, "ok.npz", x=x), vector_model(), max_samples=99).samples == 99  # the NaN is not used


def test_overflow_after_cast(tmp_path):
    model = model_with(("x", TensorProto.FLOAT16, ["N", 4]))
    x = rows(3).astype(np.float64)
    x[1, 0] = 1e6
    with pytest.raises(UsageError, match="holds values that overflow float16 at sample 1"):
        collect(open_source([{"x": x}], model))


@pytest.mark.parametrize(
    ("arrays", "fragments"),
    [
        ({"ids": np.array([["a", "b", "c"]]), "mask": np.ones((1, 3), bool), "pixels": np.ones((1, 3))}, ["array 'ids'", "dtype <U1", "int64 input"]),
        ({"ids": np.array([[1.0, 2.5, 3.0]]), "mask": np.ones((1, 3), bool), "pixels": np.ones((1, 3))},
         ["array 'ids'", "non-integer values at sample 0", "int64"]),
        ({"ids": np.ones((2, 3)), "mask": np.array([[0, 1, 1], [1, 2, 0]]), "pixels": np.ones((2, 3))},
         ["array 'mask'", "other than 0 and 1 at sample 1", "bool"]),
        ({"ids": np.ones((1, 3)), "mask": np.ones((1, 3), bool), "pixels": np.array([[0, 255, 256]])},
         ["array 'pixels'", "values from 0 to 256", "uint8 (0 to 255)"]),
        ({"ids": np.ones((1, 3, 1)), "mask": np.ones((1, 3), bool), "pixels": np.ones((1, 3))}, ["has rank 3", "declared [N, 3]"]),
        ({"ids": np.ones((1, 4)), "mask": np.ones((1, 3), bool), "pixels": np.ones((1, 3))}, ["axis 1 is fixed at 3, got 4"]),
        ({"ids": np.ones((2, 3)), "mask": np.ones((1, 3), bool), "pixels": np.ones((2, 3))}, ["disagree on the number of samples", "ids 2, mask 1"]),
    ],
    ids=["strings", "float_for_int", "bool_not_01", "uint8_range", "rank", "fixed_dim", "axis0"],
)
@pytest.mark.parametrize("form", ["list", "npz"])
def test_bad_arrays(arrays, fragments, form, tmp_path):
    data = [arrays] if form == "list" else _npz(tmp_path, **arrays)
    with pytest.raises(UsageError) as info:
        collect(open_source(data, int_model()))
    message = one_line_error(info)
    for fragment in fragments:
        assert fragment in message, message


def test_integral_floats_feed_integer_inputs():
    (batch,) = collect(open_source([{"ids": np.array([[1.0, 2.0, 3.0]]), "mask": np.array([[0.0, 1, 1]]), "pixels": np.array([[0, 255.0, 7]])}], int_model()))
    assert batch.feeds["ids"].dtype == np.int64 and batch.feeds["ids"].tolist() == [[1, 2, 3]]
    assert batch.feeds["mask"].dtype == np.bool_ and batch.feeds["mask"].tolist() == [[False, True, True]]
    assert batch.feeds["pixels"].dtype == np.uint8 and batch.feeds["pixels"].tolist() == [[0, 255, 7]]


def test_labels_and_broadcast_in_feed_dicts():
    model = model_with(("x", TensorProto.FLOAT, ["N", 4]), ("state", TensorProto.FLOAT, [2, "N", 3]), ("sr", TensorProto.INT64, []))
    feeds = [{"x": rows(5), "state": np.zeros((2, 5, 3)), "sr": np.array(16000), "labels": np.eye(3)[[0, 2, 1, 1, 0]],
              "__broadcast__": ["state"]}]
    (batch,) = collect(open_source(feeds, model))
    assert batch.size == 5 and batch.per_sample == {"x"} and batch.labels.tolist() == [0, 2, 1, 1, 0]
    assert batch.feeds["sr"].dtype == np.int64 and batch.feeds["state"].dtype == np.float32
    with pytest.raises(UsageError, match=r"disagree on the number of samples \(axis 0\): x 5, labels 4"):
        collect(open_source([{"x": rows(5), "labels": [0, 1, 2, 3]}], vector_model()))


# ------------------------------------------------------------------------------------------------
# Overlap


def test_same_npz_file_is_refused(tmp_path):
    path = _npz(tmp_path, "d.npz", x=rows(6))
    model = vector_model()
    with pytest.raises(UsageError) as info:
        check_disjoint(open_source(path, model), open_source(str(path), model, role="validation"))
    message = one_line_error(info)
    assert f"share the file {path.resolve()}" in message and "--allow-overlap" in message
    os.link(path, tmp_path / "hard_link.npz")  # another name of the same file: os.path.samefile
    with pytest.raises(UsageError, match="share the file .*d.npz \\(validation: .*hard_link.npz\\)"):
        check_disjoint(open_source(path, model), open_source(tmp_path / "hard_link.npz", model))


def test_partial_overlap_counts_and_names_samples(tmp_path):
    x = rows(15)
    model = vector_model()
    calibration = open_source(_npz(tmp_path, "calib.npz", x=x[:10]), model, batch_size=4)
    validation = open_source(_npz(tmp_path, "val.npz", x=x[5:]), model, role="validation", batch_size=3)
    with pytest.raises(UsageError) as info:
        check_disjoint(calibration, validation)
    assert one_line_error(info) == (
        "calibration and validation data share 5 samples (e.g. calibration sample 5 = validation sample 0); fitting and "
        "validating on the same samples reports accuracy you will not see: use disjoint data or pass --allow-overlap"
    )
    check_disjoint(calibration, open_source(_npz(tmp_path, "other.npz", x=x[10:]), model))  # disjoint: passes


def test_digests_do_not_depend_on_batching_or_form(tmp_path):
    x = rows(7)
    model = vector_model()
    by_3 = sample_digests(open_source(_npz(tmp_path, "d.npz", x=x), model, batch_size=3))
    assert len(by_3) == 7 and sorted(by_3.values()) == list(range(7))
    assert by_3 == sample_digests(open_source([{"x": x[:2]}, {"x": x[2:]}], model))
    assert by_3 == sample_digests(open_source([{"x": x.astype(np.float64)}], model))  # compared after the cast
    assert sample_digests(open_source([{"x": x, "labels": np.arange(7)}], model)) == by_3  # labels are no part of it


def test_folder_and_npz_holding_the_same_image(photos, tmp_path):
    model = image_model(["N", 3, H, W])
    folder = open_source(photos, model)
    astronaut = np.concatenate([b.feeds["x"] for b in folder.batches()])[2]
    other = np.zeros_like(astronaut)
    npz = _npz(tmp_path, "val.npz", x=np.stack([other, other + 1, astronaut]))
    with pytest.raises(UsageError, match=r"share 1 sample \(e.g. calibration sample 2 = validation sample 2\)"):
        check_disjoint(folder, open_source(npz, model, role="validation"))
    # a folder inside the other shares its files
    with pytest.raises(UsageError, match="share the file .*astronaut.png"):
        check_disjoint(folder, open_source(photos / "b", model, role="validation"))


def test_two_functions_of_one_script(script):
    path = script(
        "import numpy as np\n"
        "def calib():\n    return [{'x': np.zeros((2, 4), np.float32)}]\n"
        "def val():\n    return [{'x': np.ones((2, 4), np.float32)}]\n"
    )
    model = vector_model()
    check_disjoint(open_source(f"{path}:calib", model), open_source(f"{path}:val", model, role="validation"))
    with pytest.raises(UsageError, match="share 1 sample"):  # the two zero rows are one sample, twice
        check_disjoint(open_source(f"{path}:calib", model), open_source(f"{path}:calib", model, role="validation"))


def test_bundled_calibration_and_test_sets_are_disjoint():
    model = onnx.load(str(MODELS / "fashion_cnn.onnx"))
    calibration = open_source(MODELS / "fashion_mnist_calib.npz", model)
    test = open_source(MODELS / "fashion_mnist_test.npz", model, role="validation")
    assert calibration.samples == 1000 and test.samples == 1000
    assert calibration.describe == "fashion_mnist_calib.npz (1000 samples)"
    check_disjoint(calibration, test)
    with np.load(MODELS / "fashion_mnist_calib.npz") as calib, np.load(MODELS / "fashion_mnist_test.npz") as ref:
        assert calib["input"].dtype == np.float32 and calib["input"].shape == (1000, 1, 28, 28)
        assert calib["labels"].dtype == np.int64 and calib["indices"].dtype == np.int64
        assert np.all(np.diff(calib["indices"]) > 0) and calib["indices"].max() < 60000
        # normalised alike: both sets take the same 256 values, (k / 255 - 0.2860) / 0.3530
        levels = (np.arange(256, dtype=np.float32) / np.float32(255) - np.float32(0.2860)) / np.float32(0.3530)
        assert np.isin(calib["input"], levels).all() and np.isin(ref["input"], levels).all()


def test_shapes_from_data_fix_dynamic_dims_but_not_fixed_or_given_ones(photos, tmp_path):
    from onnxfactor.data.shapes import rereadable, shapes_from_data, with_data_shapes

    dynamic = image_model(["N", 3, "H", "W"])
    folder = shapes_from_data(dynamic, photos, images=ImageSpec(size=(48, 80)))
    assert folder == {"x": (1, 3, 48, 80)}  # batch 1 whatever the folder's batch size
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 3, 20, 28), np.float32))
    assert shapes_from_data(dynamic, tmp_path / "d.npz") == {"x": (1, 3, 20, 28)}
    assert shapes_from_data(dynamic, tmp_path / "d.npz", given={"x": (1, 3, 9, 9)}) == {}
    fixed_batch = image_model([2, 3, "H", "W"])  # a fixed batch stays the model's
    np.savez(tmp_path / "f.npz", x=np.zeros((4, 3, 20, 28), np.float32))
    assert shapes_from_data(fixed_batch, tmp_path / "f.npz") == {"x": (2, 3, 20, 28)}
    assert shapes_from_data(image_model(["N", 3, 20, 28]), tmp_path / "d.npz") == {}  # only batch is dynamic
    listed = [{"x": np.zeros((2, 3, 7, 5), np.float32)}]
    assert rereadable(listed) and shapes_from_data(dynamic, listed) == {"x": (1, 3, 7, 5)}
    generator = (b for b in listed)
    assert not rereadable(generator) and shapes_from_data(dynamic, generator) == {}
    assert next(generator)["x"].shape == (2, 3, 7, 5)  # not consumed
    shapes, note = with_data_shapes(dynamic, None, [(generator, None, "validation"), (tmp_path / "d.npz", None, "calibration")])
    assert shapes == {"x": (1, 3, 20, 28)} and "calibration data: x=1x3x20x28" in note
    with pytest.raises(UsageError, match="NaN"):
        np.savez(tmp_path / "nan.npz", x=np.full((1, 3, 4, 4), np.nan, np.float32))
        shapes_from_data(dynamic, tmp_path / "nan.npz")
