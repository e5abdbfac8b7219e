"""Tests for the data sources: IDX files, save_to_disk folders in the hub's schemas,
imagefolder/audiofolder layouts, the on-disk cache, and the offline hub.

Every test writes its data into ``tmp_path`` and its cache into ``tmp_path / "cache"``
(``REEFL_CACHE_DIR``), so the user's cache is never read or written.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile
from PIL import Image

from reefl.data import folder
from reefl.data.hub import Columns
from reefl.data.idx import read_idx
from reefl.data.sources import FASHION_MNIST_CLASSES, SourceOptions, load_source
from reefl.data.spec import DataError, DataSpec


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A cache of this test's own, and no source remembered from another test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("REEFL_CACHE_DIR", str(root))
    load_source.cache_clear()
    yield root
    load_source.cache_clear()


def load(path: Path, img_size: int = 28, **columns: str) -> DataSpec:
    return load_source(SourceOptions(str(path), Columns(**columns), img_size))


def png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 [H, W] or [H, W, 3] array."""
    stream = io.BytesIO()
    Image.fromarray(array).save(stream, "PNG")
    return stream.getvalue()


def solid(width: int, height: int, colour: tuple[int, ...], mode: str) -> Image.Image:
    """A one-colour image (``colour`` has one value per band of ``mode``)."""
    return Image.new(mode, (width, height), colour if len(colour) > 1 else colour[0])


def save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def wav_bytes(num_samples: int, rate: int, frequency: float = 440.0) -> bytes:
    """A mono 16-bit WAV file of a sine tone."""
    wave = 0.3 * np.sin(2 * np.pi * frequency * np.arange(num_samples) / rate)
    stream = io.BytesIO()
    soundfile.write(stream, wave.astype(np.float32), rate, format="WAV")
    return stream.getvalue()


# -- IDX (Fashion-MNIST as Debian installs it) -------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of uint8 ``array``: magic 0x0000 08 <rank>, big-endian dims, values."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big")
                                                        for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion(folder_path: Path, sizes: tuple[int, int] = (5, 3)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {}
    folder_path.mkdir(parents=True, exist_ok=True)
    for prefix, n in zip(("train", "t10k"), sizes, strict=True):
        arrays[f"{prefix}-images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{prefix}-labels"] = rng.integers(0, 10, n, dtype=np.uint8)
        for kind, rank in (("images", 3), ("labels", 1)):
            data = idx_bytes(arrays[f"{prefix}-{kind}"])
            assert data[:4] == bytes([0, 0, 8, rank])  # 0x00000803 / 0x00000801
            (folder_path / f"{prefix}-{kind}-idx{rank}-ubyte.gz").write_bytes(gzip.compress(data))
    return arrays


def test_fashion_mnist_from_idx_files(tmp_path, monkeypatch):
    written = write_fashion(tmp_path / "fm")
    monkeypatch.setenv("REEFL_FASHION_MNIST_DIR", str(tmp_path / "fm"))
    spec = load_source(SourceOptions("fashion-mnist"))
    assert (spec.name, spec.kind, spec.num_classes) == ("fashion-mnist", "image", 10)
    assert spec.class_names == FASHION_MNIST_CLASSES and spec.class_names[9] == "ankle boot"
    assert spec.train.inputs.shape == (5, 1, 28, 28) and spec.train.inputs.dtype == np.uint8
    assert spec.test is not None and spec.test.inputs.shape == (3, 1, 28, 28)
    np.testing.assert_array_equal(spec.train.inputs[:, 0], written["train-images"])
    np.testing.assert_array_equal(spec.test.inputs[:, 0], written["t10k-images"])
    np.testing.assert_array_equal(spec.train.labels, written["train-labels"])
    np.testing.assert_array_equal(spec.test.labels, written["t10k-labels"])
    assert spec.train.labels.dtype == np.int64 and spec.train.groups is None


def test_truncated_idx_file_names_the_file(tmp_path, monkeypatch):
    write_fashion(tmp_path / "fm")
    monkeypatch.setenv("REEFL_FASHION_MNIST_DIR", str(tmp_path / "fm"))
    target = tmp_path / "fm" / "t10k-images-idx3-ubyte.gz"
    whole = gzip.decompress(target.read_bytes())
    target.write_bytes(gzip.compress(whole[:-10]))  # a whole gzip of too few values
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: 2342 data bytes do not "
                                        r"fit the shape \(3, 28, 28\)"):
        load_source(SourceOptions("fashion-mnist"))
    target.write_bytes(gzip.compress(whole)[:-20])  # a cut download: the gzip stream ends
    load_source.cache_clear()
    with pytest.raises(DataError, match=r"cannot read .*t10k-images-idx3-ubyte\.gz"):
        load_source(SourceOptions("fashion-mnist"))


def test_bad_idx_magic_names_the_file(tmp_path, monkeypatch):
    write_fashion(tmp_path / "fm")
    monkeypatch.setenv("REEFL_FASHION_MNIST_DIR", str(tmp_path / "fm"))
    target = tmp_path / "fm" / "train-labels-idx1-ubyte.gz"
    target.write_bytes(gzip.compress(b"\x00\x00\x07\x01" + (5).to_bytes(4, "big") + bytes(5)))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz is not an IDX file "
                                        r"\(bad magic number\)"):
        load_source(SourceOptions("fashion-mnist"))
    target.write_bytes(b"PK\x03\x04 not gzip at all")
    load_source.cache_clear()
    with pytest.raises(DataError, match=r"cannot read .*train-labels-idx1-ubyte\.gz"):
        load_source(SourceOptions("fashion-mnist"))


def test_read_idx_plain_file_big_endian_int32(tmp_path):
    path = tmp_path / "values.idx"
    path.write_bytes(bytes([0, 0, 0x0C, 2]) + (2).to_bytes(4, "big") + (2).to_bytes(4, "big")
                     + b"".join(v.to_bytes(4, "big", signed=True) for v in (1, -2, 70000, 0)))
    values = read_idx(path)
    assert values.dtype == np.int32 and values.dtype.isnative
    assert values.tolist() == [[1, -2], [70000, 0]]


# -- save_to_disk folders in the hub's schemas ----------------------------------------------


def cifar_like(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    """uoft-cs/cifar100's schema: img, fine_label (100 names), coarse_label (20 names)."""
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(6)]
    features = datasets.Features({
        "img": datasets.Image(),
        "fine_label": datasets.ClassLabel(names=[f"fine{i}" for i in range(100)]),
        "coarse_label": datasets.ClassLabel(names=[f"coarse{i}" for i in range(20)]),
    })

    def split(rows: slice, fine: list[int], coarse: list[int]) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {"img": [{"bytes": png(a), "path": None} for a in images[rows]],
             "fine_label": fine, "coarse_label": coarse}, features=features)

    path = tmp_path / "cifar"
    datasets.DatasetDict({"train": split(slice(0, 4), [0, 57, 99, 57], [4, 1, 19, 1]),
                          "test": split(slice(4, 6), [99, 3], [19, 0])}).save_to_disk(path)
    return path, images


def test_cifar_schema_needs_label_column_and_keeps_class_label_numbering(tmp_path):
    path, images = cifar_like(tmp_path)
    with pytest.raises(DataError, match=r"cannot tell the label column \(ClassLabel columns: "
                                        r"fine_label, coarse_label\); set label-column"):
        load(path, 32)
    spec = load(path, 32, label="fine_label")
    assert spec.num_classes == 100 and spec.class_names[57] == "fine57"
    assert spec.train.labels.tolist() == [0, 57, 99, 57]
    assert spec.test is not None and spec.test.labels.tolist() == [99, 3]
    assert spec.train.inputs.shape == (4, 3, 32, 32) and spec.test.inputs.shape == (2, 3, 32, 32)
    np.testing.assert_array_equal(spec.train.inputs[2], images[2].transpose(2, 0, 1))
    np.testing.assert_array_equal(spec.test.inputs[1], images[5].transpose(2, 0, 1))
    coarse = load(path, 32, label="coarse_label")
    assert coarse.num_classes == 20 and coarse.train.labels.tolist() == [4, 1, 19, 1]


def test_save_to_disk_missing_named_columns_are_named(tmp_path):
    path, _ = cifar_like(tmp_path)
    with pytest.raises(DataError, match=r"no column 'fine' \(label-column\); columns: img, "
                                        "fine_label, coarse_label"):
        load(path, 32, label="fine")
    with pytest.raises(DataError, match=r"no column 'picture' \(image-column\)"):
        load(path, 32, image="picture", label="fine_label")
    with pytest.raises(DataError, match=r"no column 'writer_id' \(partition-by\)"):
        load(path, 32, label="fine_label", group="writer_id")


def test_save_to_disk_test_split_missing_the_label_column(tmp_path):
    path, _ = cifar_like(tmp_path)
    loaded = datasets.load_from_disk(str(path))
    broken = tmp_path / "broken"
    datasets.DatasetDict({"train": loaded["train"],
                          "test": loaded["test"].remove_columns("fine_label")}
                         ).save_to_disk(broken)
    with pytest.raises(DataError, match=r"split 'test': no column 'fine_label'"):
        load(broken, 32, label="fine_label")


def test_femnist_schema_integer_labels_and_writers(tmp_path):
    """flwrlabs/femnist: image (grey 28x28), writer_id (string), character (int 0..61)."""
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(5)]
    path = tmp_path / "femnist"
    datasets.Dataset.from_dict(
        {"image": [{"bytes": png(a), "path": None} for a in images],
         "writer_id": ["f0_12", "f3_01", "f0_12", "f1_99", "f3_01"],
         "character": [0, 61, 10, 61, 3]},
        features=datasets.Features({"image": datasets.Image(), "writer_id": datasets.Value(
            "string"), "character": datasets.Value("int64")})).save_to_disk(path)
    with pytest.raises(DataError, match="set label-column"):
        load(path)
    spec = load(path, label="character", group="writer_id")
    assert spec.train.labels.tolist() == [0, 61, 10, 61, 3]  # numbers kept, not re-coded
    assert spec.num_classes == 62 and spec.class_names[61] == "61"
    assert spec.group_names == ("f0_12", "f1_99", "f3_01")
    assert spec.train.groups.tolist() == [0, 2, 0, 1, 2]
    assert spec.natural == "sample" and spec.test is None
    assert spec.train.inputs.shape == (5, 1, 28, 28)
    np.testing.assert_array_equal(spec.train.inputs[3, 0], images[3])


def test_audio_schema_any_rate_and_length(tmp_path):
    audio = pytest.importorskip("reefl.data.audio", reason="audio features not importable")

    clips = [(8000, 8000), (30000, 44100), (4000, 8000)]  # (samples, rate)
    path = tmp_path / "speech"
    datasets.Dataset.from_dict({
        "audio": [{"bytes": wav_bytes(n, rate), "path": f"clip{i}.wav"}
                  for i, (n, rate) in enumerate(clips)],
        "speaker_id": ["s2", "s1", "s2"],
        "label": [1, 0, 1],
    }).cast_column("audio", datasets.Audio(decode=False)).cast_column(
        "label", datasets.ClassLabel(names=["yes", "no"])).save_to_disk(path)
    spec = load(path, group="speaker_id")
    assert spec.kind == "audio" and spec.class_names == ("yes", "no")
    assert spec.train.labels.tolist() == [1, 0, 1]
    assert spec.group_names == ("s1", "s2") and spec.train.groups.tolist() == [1, 0, 1]
    assert spec.train.inputs.shape == (3, 1, 128, 128)
    assert spec.train.inputs.dtype == np.float16
    # the 44.1 kHz clip is featurised at its own rate (as a direct call would)
    wave, rate = soundfile.read(io.BytesIO(wav_bytes(30000, 44100)), dtype="float32")
    expected = audio.clip_features([wave], [rate])[0].astype(np.float16)
    np.testing.assert_array_equal(spec.train.inputs[1, 0], expected)
    assert not np.array_equal(spec.train.inputs[0, 0], spec.train.inputs[2, 0])


# -- imagefolder / audiofolder ----------------------------------------------------------------


def test_imagefolder_mixed_modes_and_sizes_become_rgb_at_img_size(tmp_path):
    root = tmp_path / "pets"
    save(solid(10, 12, (100,), "L"), root / "cat" / "a.png")
    save(solid(8, 8, (0, 200, 50), "RGB"), root / "cat" / "b.jpg")
    save(solid(9, 7, (10, 20, 30, 128), "RGBA"), root / "dog" / "c.png")
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 200, 0, 0])  # index 1 is (200, 0, 0)
    save(palette, root / "dog" / "d.png")
    spec = load(root, img_size=6)
    assert spec.kind == "image" and spec.class_names == ("cat", "dog")
    assert spec.train.labels.tolist() == [0, 0, 1, 1]  # files in sorted order
    assert spec.train.inputs.shape == (4, 3, 6, 6) and spec.train.inputs.dtype == np.uint8
    colours = np.asarray(spec.train.inputs, dtype=int)
    assert (colours[0] == 100).all()  # grey repeated on 3 channels
    assert np.abs(colours[1] - np.array([0, 200, 50])[:, None, None]).max() <= 3  # JPEG
    assert (colours[2] == np.array([10, 20, 30])[:, None, None]).all()  # alpha dropped
    assert (colours[3] == np.array([200, 0, 0])[:, None, None]).all()  # palette resolved
    assert spec.test is None and spec.train.groups is None and spec.natural == ""


def test_imagefolder_same_size_is_kept_and_grey_stays_one_channel(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "rgb"
    pixels = rng.integers(0, 256, (3, 7, 5, 3), dtype=np.uint8)  # 5 wide, 7 high
    for i, name in enumerate(("x/1.png", "x/2.png", "y/3.png")):
        save(Image.fromarray(pixels[i]), root / name)
    spec = load(root, img_size=16)
    assert spec.train.inputs.shape == (3, 3, 7, 5)
    np.testing.assert_array_equal(spec.train.inputs, pixels.transpose(0, 3, 1, 2))
    grey = tmp_path / "grey"
    save(solid(4, 4, (7,), "L"), grey / "a" / "1.png")
    save(solid(6, 5, (9, 255), "LA"), grey / "b" / "2.png")
    spec = load(grey, img_size=3)
    assert spec.train.inputs.shape == (2, 1, 3, 3) and spec.channels == 1
    assert np.asarray(spec.train.inputs).reshape(2, -1)[:, 0].tolist() == [7, 9]


def test_imagefolder_train_and_test_folders(tmp_path):
    root = tmp_path / "split"
    for split, names in (("train", ("cat/1", "cat/2", "dog/3")), ("test", ("dog/4", "cat/5"))):
        for i, name in enumerate(names):
            save(solid(4, 4, (i * 40,), "L"), root / split / f"{name}.png")
    spec = load(root)
    assert spec.class_names == ("cat", "dog")
    assert spec.train.labels.tolist() == [0, 0, 1]
    assert spec.test is not None and spec.test.labels.tolist() == [0, 1]  # cat/5, dog/4
    assert spec.test.inputs.shape == (2, 1, 4, 4)
    assert spec.test.inputs[0, 0, 0, 0] == 40 and spec.test.inputs[1, 0, 0, 0] == 0


def test_imagefolder_metadata_writers_and_label_column(tmp_path):
    root = tmp_path / "chars"
    for i, name in enumerate(("a/1.png", "a/2.png", "b/3.png", "b/4.png")):
        save(solid(4, 4, (i,), "L"), root / name)
    (root / "metadata.csv").write_text("file_name,writer_id,case\n"
                                       "a/1.png,w9,upper\na/2.png,w1,lower\n"
                                       "b/3.png,w9,lower\nb/4.png,,upper\n")
    spec = load(root, group="writer_id")
    assert spec.group_names == ("w1", "w9")
    assert spec.train.groups.tolist() == [1, 0, 1, -1]  # no writer: -1
    assert spec.natural == "sample" and spec.class_names == ("a", "b")
    relabelled = load(root, label="case")
    assert relabelled.class_names == ("lower", "upper")
    assert relabelled.train.labels.tolist() == [1, 0, 0, 1]
    with pytest.raises(DataError, match=r"no column 'speaker' \(partition-by\)"):
        load(root, group="speaker")


def test_imagefolder_errors_name_what_is_wrong(tmp_path):
    empty = tmp_path / "empty"
    save(solid(4, 4, (1,), "L"), empty / "train" / "a" / "1.png")
    save(solid(4, 4, (1,), "L"), empty / "train" / "b" / "2.png")
    (empty / "test" / "a").mkdir(parents=True)
    (empty / "test" / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=re.escape(f"{empty / 'test'} holds no image or audio")):
        load(empty)
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    with pytest.raises(DataError, match=re.escape(f"{nothing} is not a data set")):
        load(nothing)

    single = tmp_path / "single"
    save(solid(4, 4, (1,), "L"), single / "only" / "1.png")
    save(solid(4, 4, (2,), "L"), single / "only" / "2.png")
    with pytest.raises(DataError, match=re.escape(f"{single} has only one class")):
        load(single)

    corrupt = tmp_path / "corrupt"
    save(solid(4, 4, (1,), "L"), corrupt / "a" / "1.png")
    (corrupt / "b").mkdir()
    (corrupt / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(DataError, match=r"cannot read image .*b/broken\.png"):
        load(corrupt)

    ghost = tmp_path / "ghost"
    save(solid(4, 4, (1,), "L"), ghost / "a" / "1.png")
    save(solid(4, 4, (2,), "L"), ghost / "b" / "2.png")
    (ghost / "metadata.csv").write_text("file_name,writer_id\na/1.png,w1\nb/ghost.png,w2\n")
    with pytest.raises(DataError, match=re.escape(f"{ghost / 'metadata.csv'} line 3: no file "
                                                  "b/ghost.png")):
        load(ghost)


def test_audiofolder_with_speakers(tmp_path):
    pytest.importorskip("reefl.data.audio", reason="audio features not importable yet")
    root = tmp_path / "words"
    for name, (n, rate) in {"yes/a.wav": (8000, 8000), "no/b.wav": (30000, 44100),
                            "yes/c.wav": (16000, 16000)}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(wav_bytes(n, rate))
    (root / "metadata.csv").write_text("file_name,speaker_id\nyes/a.wav,bob\nno/b.wav,amy\n"
                                       "yes/c.wav,amy\n")
    spec = load(root, group="speaker_id")
    assert spec.kind == "audio" and spec.class_names == ("no", "yes")
    assert spec.train.labels.tolist() == [0, 1, 1]  # no/b, yes/a, yes/c
    assert spec.group_names == ("amy", "bob") and spec.train.groups.tolist() == [0, 1, 0]
    assert spec.train.inputs.shape == (3, 1, 128, 128) and spec.train.inputs.dtype == np.float16


def test_folder_mixing_images_and_audio_is_refused(tmp_path):
    root = tmp_path / "mixed"
    save(solid(4, 4, (1,), "L"), root / "a" / "1.png")
    (root / "b").mkdir()
    (root / "b" / "2.wav").write_bytes(wav_bytes(800, 8000))
    with pytest.raises(DataError, match="mixes image and audio files"):
        load(root)


# -- the on-disk cache --------------------------------------------------------------------


def two_class_folder(root: Path) -> Path:
    save(solid(4, 4, (10,), "L"), root / "a" / "1.png")
    save(solid(4, 4, (20,), "L"), root / "b" / "2.png")
    return root


def entries(cache_root: Path) -> list[str]:
    return sorted(p.name for p in (cache_root / "data").iterdir() if not p.name.startswith("."))


def test_second_load_reads_the_cache_without_decoding(tmp_path, monkeypatch, private_cache):
    root = two_class_folder(tmp_path / "pics")
    first = load(root)
    assert isinstance(first.train.inputs, np.memmap)  # even the first load reads the cache
    assert len(entries(private_cache)) == 1
    calls = []

    def counting_decoder(*args: object) -> np.ndarray:
        calls.append(args)
        raise AssertionError("decoded again")

    monkeypatch.setattr(folder, "decode_images", counting_decoder)
    load_source.cache_clear()  # a new process: only the disk cache remains
    again = load(root)
    assert calls == [] and isinstance(again.train.inputs, np.memmap)
    np.testing.assert_array_equal(again.train.inputs, first.train.inputs)
    assert again.class_names == first.class_names and again.kind == "image"


def test_a_changed_folder_gets_a_new_entry(tmp_path, private_cache):
    root = two_class_folder(tmp_path / "pics")
    assert load(root).train.inputs[0, 0, 0, 0] == 10
    save(solid(4, 4, (99,), "L"), root / "a" / "1.png")
    stamp = time.time() + 5
    os.utime(root / "a" / "1.png", (stamp, stamp))  # newer, even on coarse clocks
    load_source.cache_clear()
    assert load(root).train.inputs[0, 0, 0, 0] == 99
    assert len(entries(private_cache)) == 2
    assert load(root, img_size=8).train.inputs.shape == (2, 1, 4, 4)  # options key it too
    assert len(entries(private_cache)) == 3


def test_a_half_written_cache_folder_is_ignored(tmp_path, private_cache):
    root = two_class_folder(tmp_path / "pics")
    load(root)
    (name,) = entries(private_cache)
    data = private_cache / "data"
    shutil.rmtree(data / name)
    leftover = data / f".{name}-abc123"  # a writer killed before its rename
    leftover.mkdir()
    (leftover / "train-inputs.npy").write_bytes(b"\x93NUMPY half")
    load_source.cache_clear()
    assert load(root).train.labels.tolist() == [0, 1]
    assert (data / name / "meta.json").is_file() and leftover.is_dir()
    # an entry folder without meta.json (an interrupted removal) is never used, but replaced
    (data / name / "meta.json").unlink()
    load_source.cache_clear()
    assert load(root).train.inputs[1, 0, 0, 0] == 20
    assert (data / name / "meta.json").is_file()


# -- the hub when offline ------------------------------------------------------------------


def test_offline_hub_fails_fast_in_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # an empty Hugging Face cache, whatever the user has downloaded
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    start = time.monotonic()
    with pytest.raises(DataError) as caught:
        load_source(SourceOptions("cifar100"))
    assert time.monotonic() - start < 5
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("uoft-cs/cifar100 is not in the Hugging Face cache")
    assert "(offline)" in message and "connect once to download it" in message
    assert "save_to_disk folder" in message
