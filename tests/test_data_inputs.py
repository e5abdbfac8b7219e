"""Data inputs that used to slip through (issue 24): huge images, NaN or empty labels, long
audio, data too small to measure anything, and pretraining on a run's test set.

Every test builds its data in ``tmp_path`` and caches into ``tmp_path / "cache"``.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from reefl.data import decode
from reefl.data.hub import Columns
from reefl.data.sources import SourceOptions, load_source
from reefl.data.spec import DataError
from test_sources import load, private_cache  # noqa: E402, F401 - the same cache fixture


def save_grey(path: Path, value: int, size: int = 4) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (size, size), value).save(path)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header says ``width`` x ``height`` grey pixels (the pixel data is one
    row, so the file is tiny and only a decoder would notice)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0,
                                                              0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + chunk(b"IEND", b""))


# -- 1. images too large to decode ---------------------------------------------------------


@pytest.mark.parametrize("side", [20000, 10000])  # over PIL's error limit; over its warning
def test_a_huge_image_is_one_line_naming_the_file_and_its_size(tmp_path: Path,
                                                               side: int) -> None:
    root = tmp_path / "pics"
    for i in range(2):
        save_grey(root / "a" / f"{i}.png", 10)
        save_grey(root / "b" / f"{i}.png", 200)
    (root / "b" / "huge.png").write_bytes(png_header_only(side, side))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        with pytest.raises(DataError) as caught:
            load(root)
    message = str(caught.value)
    assert "\n" not in message and "huge.png" in message
    assert f"{side}x{side} pixels" in message and "megapixels" in message


def test_the_pixel_limit_is_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    pil_limit = Image.MAX_IMAGE_PIXELS
    small = io.BytesIO()
    Image.new("RGB", (30, 20), (1, 2, 3)).save(small, "PNG")
    assert decode.decode_images([small.getvalue()], ["ok.png"], 28).shape == (1, 3, 20, 30)
    monkeypatch.setattr(decode, "MAX_PIXELS", 599)
    with pytest.raises(DataError, match=r"image big\.png is 30x20 pixels"):
        decode.decode_images([small.getvalue()], ["big.png"], 28)
    assert Image.MAX_IMAGE_PIXELS == pil_limit  # PIL's own limit is left as it was


# -- 2. NaN and empty labels ----------------------------------------------------------------


def labelled_folder(root: Path, labels: list[str]) -> Path:
    for i in range(len(labels)):
        save_grey(root / f"{i}.png", 20 * i)
    rows = "".join(f"{i}.png,{label}\n" for i, label in enumerate(labels))
    (root / "metadata.csv").write_text("file_name,kind\n" + rows)
    return root


@pytest.mark.parametrize(("label", "what"), [("NaN", "NaN"), ("nan", "NaN"), ("", "empty"),
                                             ("  ", "empty")])
def test_a_nan_or_empty_metadata_label_names_the_file_column_and_line(
        tmp_path: Path, label: str, what: str) -> None:
    root = labelled_folder(tmp_path / "pics", ["cat", "dog", label, "cat"])
    with pytest.raises(DataError) as caught:
        load(root, label="kind")
    message = str(caught.value)
    assert "\n" not in message
    assert f"{root / 'metadata.csv'} line 4: column 'kind' holds {what} label" in message
    assert "for 2.png" in message


def test_clean_metadata_labels_still_make_the_classes(tmp_path: Path) -> None:
    spec = load(labelled_folder(tmp_path / "pics", ["cat", "dog", "dog", "cat"]), label="kind")
    assert spec.class_names == ("cat", "dog") and spec.train.labels.tolist() == [0, 1, 1, 0]


def saved_dataset(path: Path, labels: list, features: object = None) -> Path:
    import datasets

    pngs = []
    for i in range(len(labels)):
        stream = io.BytesIO()
        Image.new("L", (4, 4), 30 * i).save(stream, "PNG")
        pngs.append({"bytes": stream.getvalue(), "path": None})
    data = datasets.Dataset.from_dict({"image": pngs, "label": labels})
    data = data.cast_column("image", datasets.Image())
    if features is not None:
        data = data.cast_column("label", features)
    data.save_to_disk(str(path))
    return path


@pytest.mark.parametrize("labels", [[0.0, 1.0, float("nan"), 1.0], ["a", "b", None, "a"],
                                    ["a", "b", "", "a"]])
def test_a_nan_or_empty_label_in_a_saved_dataset_names_the_split_column_and_row(
        tmp_path: Path, labels: list) -> None:
    path = saved_dataset(tmp_path / "saved", labels)
    with pytest.raises(DataError, match=r"split 'train' row 2: column 'label' holds "
                                        r"(NaN|empty) label") as caught:
        load(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_a_class_label_of_minus_one_is_a_missing_label(tmp_path: Path) -> None:
    import datasets

    path = saved_dataset(tmp_path / "saved", [0, 1, -1, 0],
                         datasets.ClassLabel(names=["a", "b"]))
    with pytest.raises(DataError, match=r"row 2: column 'label' holds class -1"):
        load(path)


# -- 3. long audio -----------------------------------------------------------------------


def write_wav(path: Path, seconds: float, rate: int, channels: int = 2, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    chirp = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)
    wave = np.stack([chirp + 0.05 * rng.standard_normal(len(t)) for _ in range(channels)], 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, wave.astype(np.float32), rate)


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000, 96000])
def test_a_long_recording_is_read_only_as_far_as_its_features_need(tmp_path: Path,
                                                                   rate: int) -> None:
    from reefl.data.audio import clip_features

    path = tmp_path / f"long-{rate}.wav"
    write_wav(path, 8.0, rate)
    wave, got_rate = decode.read_audio(str(path), path.name)
    assert got_rate == rate and len(wave) == decode.frames_used(rate) < 8 * rate
    whole, _ = soundfile.read(path, dtype="float32", always_2d=True)  # what was read before
    expected = clip_features([whole.mean(axis=1)], [rate])[:, None].astype(np.float16)
    assert np.array_equal(decode.decode_audio([str(path)], [path.name]), expected)


def test_short_clips_are_read_whole_and_keep_their_features(tmp_path: Path) -> None:
    from reefl.data.audio import clip_features

    for seconds, rate in ((1.0, 16000), (0.4, 44100), (1.3, 48000)):
        path = tmp_path / f"clip-{rate}.wav"
        write_wav(path, seconds, rate, channels=1)
        wave, _ = decode.read_audio(str(path), path.name)
        whole, _ = soundfile.read(path, dtype="float32")
        assert np.array_equal(wave, whole)
        assert np.array_equal(clip_features([wave], [rate]), clip_features([whole], [rate]))


def test_speech_commands_word_clips_are_read_only_as_far_as_used(tmp_path: Path) -> None:
    from reefl.data import speech_commands as sc

    path = tmp_path / "yes" / "abc_nohash_0.wav"
    write_wav(path, 5.0, 16000, channels=1)
    clip, _ = sc._read_wav(path, used_only=True)
    whole, _ = sc._read_wav(path)
    assert len(whole) == 5 * 16000 and len(clip) == decode.frames_used(16000)
    assert np.array_equal(clip, whole[:len(clip)])


# -- 5. pretraining never sees the run's test set -------------------------------------------


@pytest.mark.parametrize("options", [{}, {"seed": 4, "test-fraction": 0.3},
                                     {"test-examples": 700, "num-clients": 5}])
def test_pretraining_leaves_out_exactly_what_the_run_tests_on(options: dict) -> None:
    from reefl.config import RunConfig
    from reefl.data import build_federated_data
    from reefl.pretrain import central_data, run_test_indices

    cfg = RunConfig.from_flat(options)
    run = build_federated_data(cfg.data_options)
    spec = load_source(cfg.data_options.source)
    tested = np.unique(np.concatenate([run.test_indices, *run.client_test_indices]))
    held_out = run_test_indices(cfg, spec)
    assert np.array_equal(held_out, tested) and len(held_out) > 0
    for limit in (None, 500):
        trained = central_data(spec, cfg.seed, limit, exclude=held_out).client_indices[0]
        assert len(np.intersect1d(trained, run.test_indices)) == 0
    everything = central_data(spec, cfg.seed, None, exclude=held_out).client_indices[0]
    assert len(everything) + len(held_out) == len(spec.train)  # nothing else is left out


def test_pretraining_refuses_when_the_runs_test_set_cannot_be_made(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from reefl import pretrain
    from reefl.config import RunConfig

    def fails(options: object) -> None:
        raise DataError("num-clients=9999 but the data has only 5 natural ids")

    monkeypatch.setattr(pretrain, "build_federated_data", fails)
    cfg = RunConfig.from_flat({})
    with pytest.raises(pretrain.PretrainError, match=r"cannot tell which examples 'reefl run' "
                                                    r"with these data options tests on"):
        pretrain.run_test_indices(cfg, load_source(cfg.data_options.source))


# -- 4. data that cannot measure anything is said so ----------------------------------------


def writers_folder(root: Path, writers: int = 12) -> Path:
    """Per writer: 3 images of class a and 1 of class b; metadata.csv names every file, the
    first one twice."""
    lines = []
    for w in range(writers):
        for i, label in enumerate("aaab"):
            name = f"{label}/w{w}-{i}.png"
            save_grey(root / name, (7 * w + 50 * i) % 256)
            lines.append(f"{name},writer{w}\n")
    (root / "metadata.csv").write_text("file_name,writer_id\n" + lines[0] + "".join(lines))
    return root


def test_a_summary_says_what_the_data_cannot_measure(tmp_path: Path,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    from reefl.data import DataOptions, build_federated_data
    from reefl.data.summary import data_warnings, format_summary, partition_summary

    root = writers_folder(tmp_path / "chars")
    options = DataOptions(SourceOptions(str(root), Columns(group="writer_id")), num_clients=5)
    data = build_federated_data(options)
    assert capfd.readouterr().err == ""  # no flwr-datasets progress bar
    warnings_ = data_warnings(data)
    assert len(warnings_) == 5 and all("\n" not in w for w in warnings_)
    duplicated, classes, small, ids, unused = warnings_
    assert "metadata.csv: 1 lines name a file already named (e.g. line 3 repeats line 2)" \
        in duplicated
    assert classes.startswith("the global test set holds examples of 1 of the 2 classes")
    assert "too small to rank methods: 5 examples, 5 of its rarest class" in small
    assert ids == "the data has 12 natural ids (speakers, writers...); num-clients=5 uses 5 " \
                  "of them"
    assert unused.startswith("28 of the 48 training examples are in no client's data")
    text = format_summary(partition_summary(data))
    assert text.count("\nwarning         ") == 5 and "uses 5 of them" in text


def test_a_sound_partition_has_no_warnings() -> None:
    from reefl.data import DataOptions, build_federated_data
    from reefl.data.summary import data_warnings, format_summary, partition_summary

    data = build_federated_data(DataOptions())  # the embedded digits: 1,000 test examples
    assert data_warnings(data) == []
    assert "warning" not in format_summary(partition_summary(data))
