"""Speech Commands reader, on tiny archives built here in the real layout."""

from __future__ import annotations

import re
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from reefl.data import speech_commands as sc
from reefl.data.speech_commands import (
    ALL_WORDS,
    CORE_WORDS,
    SpeechCommandsError,
    download_archive,
    find_root,
    is_speech_commands_root,
    official_splits,
    read_speech_commands,
)

RATE = 16_000
SPEAKERS = ("0a1b2c3d", "5e6f7a8b", "c0ffee42")
WORDS = ("yes", "no", "bed")  # two core words and one that is "unknown" in the 12-class task
SHORT = "yes/0a1b2c3d_nohash_1.wav"  # the one clip shorter than 1 s
NOISE = "_background_noise_/white_noise.wav"  # 3.5 s: three whole 1-s silence segments
VALIDATION = ["no/5e6f7a8b_nohash_0.wav"]
TESTING = ["bed/c0ffee42_nohash_0.wav", "yes/c0ffee42_nohash_0.wav"]


def _write(path: Path, samples: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples, RATE, subtype="PCM_16")


def make_root(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A Speech Commands folder in the real layout; returns each wav's int16 samples by path."""
    rng = np.random.default_rng(seed)
    written: dict[str, np.ndarray] = {}
    names = [f"{w}/{s}_nohash_0.wav" for w in WORDS for s in SPEAKERS] + [SHORT]
    for name in names:
        length = RATE // 2 if name == SHORT else RATE
        written[name] = rng.integers(-20_000, 20_000, length, dtype=np.int16)
    written[NOISE] = rng.integers(-3_000, 3_000, int(3.5 * RATE), dtype=np.int16)
    for name, samples in written.items():
        _write(root / name, samples)
    (root / "_background_noise_" / "README.md").write_text("noise files\n")
    (root / "validation_list.txt").write_text("\n".join(VALIDATION) + "\n")
    (root / "testing_list.txt").write_text("\n".join(TESTING) + "\n")
    (root / "LICENSE").write_text("CC BY 4.0\n")
    (root / "README.md").write_text("tiny copy\n")
    return written


def make_archive(tmp_path: Path, wrap: bool = False) -> tuple[Path, dict[str, np.ndarray]]:
    """The layout packed like the real archive (words at the top level, ``./bed/...``),
    or with ``wrap`` inside one folder, as repacked copies often are."""
    src = tmp_path / "src"
    written = make_root(src)
    archive = tmp_path / "speech_commands_v0.02.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="speech_commands_v0.02" if wrap else ".")
    return archive, written


@pytest.fixture
def root(tmp_path: Path) -> Path:
    make_root(tmp_path / "sc")
    return tmp_path / "sc"


def _label_of(clips: sc.SpeechClips, path: str) -> int:
    return int(clips.labels[clips.paths.index(path)])


# --------------------------------------------------------------------------- class lists


def test_class_lists():
    assert len(ALL_WORDS) == 35 and list(ALL_WORDS) == sorted(set(ALL_WORDS))
    assert set(CORE_WORDS) <= set(ALL_WORDS) and len(CORE_WORDS) == 10
    names12 = sc.class_names(12)
    assert names12[:10] == CORE_WORDS and names12[10] == "unknown" and names12[11] == "silence"
    assert sc.class_names(35) == ALL_WORDS and "silence" not in sc.class_names(35)
    with pytest.raises(SpeechCommandsError, match="12 or 35"):
        sc.class_names(10)


# --------------------------------------------------------------------------- reading


def test_speakers_parsed_from_names(root: Path):
    clips = read_speech_commands(root, num_classes=35)
    assert len(clips.paths) == 10
    for path, speaker in zip(clips.paths, clips.speakers, strict=True):
        assert path.split("/")[1].startswith(f"{speaker}_nohash_")
    assert sorted(set(clips.speakers.tolist())) == sorted(SPEAKERS)
    assert list(clips.speakers).count("0a1b2c3d") == 4  # three words plus the short clip


def test_twelve_class_labels_and_silence(root: Path):
    clips = read_speech_commands(root)  # 12 classes by default
    assert clips.class_names == sc.CLASS_NAMES_12
    assert clips.labels.dtype == np.int64
    assert len(clips.waves) == len(clips.labels) == len(clips.speakers) == len(clips.paths) == 13
    for speaker in SPEAKERS:
        assert _label_of(clips, f"yes/{speaker}_nohash_0.wav") == 0
        assert _label_of(clips, f"no/{speaker}_nohash_0.wav") == 1
        assert _label_of(clips, f"bed/{speaker}_nohash_0.wav") == 10
    silence = np.flatnonzero(clips.labels == 11)
    assert [clips.paths[i] for i in silence] == [f"{NOISE}#{k}" for k in range(3)]
    assert all(clips.speakers[i] == "" for i in silence)
    assert np.all(clips.speakers[clips.labels != 11] != "")
    noise = clips.noise[0]
    assert clips.noise_rates == [RATE] and len(noise) == int(3.5 * RATE)
    for k, i in enumerate(silence):
        assert clips.sample_rates[i] == RATE
        np.testing.assert_array_equal(clips.waves[i], noise[k * RATE:(k + 1) * RATE])


def test_thirty_five_class_labels(root: Path):
    clips = read_speech_commands(root, num_classes=35)
    assert clips.class_names == ALL_WORDS
    assert len(clips.paths) == 10 and not any("#" in p for p in clips.paths)
    for path, label in zip(clips.paths, clips.labels, strict=True):
        assert ALL_WORDS[label] == path.split("/")[0]
    assert set(clips.labels.tolist()) == {ALL_WORDS.index(w) for w in WORDS}
    assert len(clips.noise) == 1  # noise is still returned, for augmentation


def test_waves_read_back_as_written(tmp_path: Path):
    written = make_root(tmp_path / "sc", seed=3)
    clips = read_speech_commands(tmp_path / "sc")
    for path, wave, rate in zip(clips.paths, clips.waves, clips.sample_rates, strict=True):
        if "#" in path:
            continue
        assert wave.dtype == np.float32 and wave.ndim == 1 and rate == RATE
        np.testing.assert_array_equal(wave, written[path].astype(np.float32) / 32768)
    assert len(clips.waves[clips.paths.index(SHORT)]) == RATE // 2
    np.testing.assert_array_equal(clips.noise[0], written[NOISE].astype(np.float32) / 32768)
    assert all(np.abs(w).max() <= 1.0 for w in clips.waves)


def test_corrupt_wav_names_the_file(root: Path):
    bad = root / "no" / "deadbeef_nohash_0.wav"
    bad.write_bytes(b"RIFF....not a wave file at all")
    with pytest.raises(SpeechCommandsError, match=re.escape(str(bad))) as info:
        read_speech_commands(root)
    assert "\n" not in str(info.value)


def test_unknown_word_folder_is_an_error_but_hidden_ones_are_skipped(root: Path):
    for extra in ("_scratch", ".cache"):
        _write(root / extra / "x_nohash_0.wav", np.zeros(100, dtype=np.int16))
    assert len(read_speech_commands(root, num_classes=35).paths) == 10
    banana = root / "banana"
    _write(banana / "x_nohash_0.wav", np.zeros(100, dtype=np.int16))
    with pytest.raises(SpeechCommandsError, match=re.escape(str(banana))):
        read_speech_commands(root)


def test_bad_num_classes_and_no_clips(tmp_path: Path, root: Path):
    with pytest.raises(SpeechCommandsError, match="12 or 35"):
        read_speech_commands(root, num_classes=10)
    empty = tmp_path / "empty"
    (empty / "_background_noise_").mkdir(parents=True)
    (empty / "yes").mkdir()
    with pytest.raises(SpeechCommandsError, match=re.escape(str(empty))):
        read_speech_commands(empty)


def test_official_splits(root: Path):
    clips = read_speech_commands(root)
    splits = official_splits(root, clips.paths)
    by_path = dict(zip(clips.paths, splits.tolist(), strict=True))
    assert [p for p, s in by_path.items() if s == "validation"] == VALIDATION
    assert sorted(p for p, s in by_path.items() if s == "testing") == sorted(TESTING)
    assert by_path[f"{NOISE}#0"] == "train" and list(splits).count("train") == 13 - 3


# --------------------------------------------------------------------------- locating


def test_layout_detection_and_find_root_on_folders(tmp_path: Path, root: Path):
    assert is_speech_commands_root(root)
    assert find_root(root) == root
    assert find_root(tmp_path) == root  # a folder holding exactly one root
    no_noise = tmp_path / "no_noise"
    (no_noise / "yes").mkdir(parents=True)
    assert not is_speech_commands_root(no_noise)
    no_words = tmp_path / "no_words"
    (no_words / "_background_noise_").mkdir(parents=True)
    (no_words / "banana").mkdir()
    assert not is_speech_commands_root(no_words)
    with pytest.raises(SpeechCommandsError, match=re.escape(str(no_words))):
        find_root(no_words)
    make_root(tmp_path / "second")
    with pytest.raises(SpeechCommandsError, match=re.escape(str(tmp_path))):
        find_root(tmp_path)  # two roots: ambiguous
    with pytest.raises(SpeechCommandsError, match="no such"):
        find_root(tmp_path / "missing")


@pytest.mark.parametrize("wrap", [False, True])
def test_archive_extracted_once_and_reused(tmp_path: Path, monkeypatch, wrap: bool):
    archive, written = make_archive(tmp_path, wrap=wrap)
    cache = tmp_path / "cache"
    dest = find_root(archive, cache_dir=cache)
    assert dest == cache / "speech_commands_v0.02" and is_speech_commands_root(dest)
    assert [p.name for p in cache.iterdir()] == [dest.name]  # no temp folder left behind
    clips = read_speech_commands(dest)
    np.testing.assert_array_equal(
        clips.waves[clips.paths.index(SHORT)], written[SHORT].astype(np.float32) / 32768
    )
    marker = dest / ".marker"
    marker.write_text("first extraction")

    def no_second_extraction(*args, **kwargs):
        raise AssertionError("the archive was extracted twice")

    monkeypatch.setattr(tarfile, "open", no_second_extraction)
    assert find_root(archive, cache_dir=cache) == dest
    assert marker.read_text() == "first extraction"


def test_archive_extracts_next_to_itself_by_default(tmp_path: Path):
    archive, _ = make_archive(tmp_path)
    assert find_root(archive) == tmp_path / "speech_commands_v0.02"


def test_interrupted_extraction_does_not_count(tmp_path: Path, monkeypatch):
    archive, _ = make_archive(tmp_path)
    cache = tmp_path / "cache"
    # A run killed mid-extraction leaves its temp folder; it even looks like a root here.
    leftover = cache / ".speech_commands_v0.02.partial-killed"
    make_root(leftover)
    (leftover / "yes" / "0a1b2c3d_nohash_0.wav").unlink()
    with pytest.raises(SpeechCommandsError):
        find_root(cache)  # the hidden temp folder is not a root
    # An extraction that fails part-way leaves nothing that looks finished.
    real = sc._extract_members

    def interrupted(src: Path, into: Path) -> None:
        real(src, into)
        (into / "yes" / "0a1b2c3d_nohash_0.wav").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(sc, "_extract_members", interrupted)
    with pytest.raises(KeyboardInterrupt):
        find_root(archive, cache_dir=cache)
    assert not (cache / "speech_commands_v0.02").exists()
    assert sorted(p.name for p in cache.iterdir()) == [leftover.name]
    monkeypatch.setattr(sc, "_extract_members", real)
    dest = find_root(archive, cache_dir=cache)
    assert dest == cache / "speech_commands_v0.02"
    assert (dest / "yes" / "0a1b2c3d_nohash_0.wav").is_file()
    assert len(read_speech_commands(dest, num_classes=35).paths) == 10


def test_bad_archive_is_an_error(tmp_path: Path):
    broken = tmp_path / "speech_commands_v0.02.tar.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(SpeechCommandsError, match=re.escape(str(broken))):
        find_root(broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == [broken.name]
    not_sc = tmp_path / "other.tar.gz"
    with tarfile.open(not_sc, "w:gz") as tar:
        tar.add(broken, arcname="just_a_file")
    with pytest.raises(SpeechCommandsError, match="no Speech Commands folder"):
        find_root(not_sc)


# --------------------------------------------------------------------------- downloading


def test_download_offline_gives_one_line_error(tmp_path: Path):
    cache = tmp_path / "cache"
    missing = tmp_path / "nowhere" / "speech_commands_v0.02.tar.gz"
    with pytest.raises(SpeechCommandsError) as info:
        download_archive(cache, url=missing.as_uri())
    message = str(info.value)
    assert "\n" not in message and missing.as_uri() in message
    advice = message.replace(missing.as_uri(), "").replace(str(missing), "")  # tmp_path varies
    assert "offline" in advice and "local copy" in advice
    assert list(cache.iterdir()) == []  # no partial file left to pass for the archive


def test_download_copies_then_skips(tmp_path: Path, monkeypatch):
    source = tmp_path / "served" / "speech_commands_v0.02.tar.gz"
    source.parent.mkdir()
    payload = bytes(range(256)) * 50
    source.write_bytes(payload)
    calls = []
    real_urlopen = urllib.request.urlopen

    def counting_urlopen(*args, **kwargs):
        calls.append(args[0])
        return real_urlopen(*args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", counting_urlopen)
    cache = tmp_path / "cache"
    got = download_archive(cache, url=source.as_uri())
    assert got == cache / source.name and got.read_bytes() == payload
    assert [p.name for p in cache.iterdir()] == [source.name]
    source.unlink()  # a second download would now fail
    assert download_archive(cache, url=source.as_uri()) == got
    assert len(calls) == 1


def test_named_source_reads_the_archive_from_the_cache_and_partitions_by_speaker(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dataset="speechcommands" takes the archive from the cache's downloads folder (where
    download_archive puts it), featurises clips and noise once, and partitions by speaker:
    the speakers with the most clips, silence dealt out to them, 80/20 per class."""
    from reefl.data import DataOptions, SourceOptions, build_federated_data, load_source

    cache = tmp_path / "cache"
    monkeypatch.setenv("REEFL_CACHE_DIR", str(cache))
    (cache / "downloads").mkdir(parents=True)
    archive, written = make_archive(tmp_path)
    archive.rename(cache / "downloads" / archive.name)
    load_source.cache_clear()
    spec = load_source(SourceOptions("speechcommands"))
    clips = len([n for n in written if not n.startswith("_")])
    assert spec.kind == "audio" and spec.num_classes == 12 and spec.natural == "largest"
    assert spec.train.inputs.shape == (clips + 3, 1, 128, 128)  # + 3 silence segments
    assert spec.train.inputs.dtype == np.float16 and isinstance(spec.train.inputs, np.memmap)
    assert (spec.train.groups == -1).sum() == 3 and set(spec.group_names) == set(SPEAKERS)
    assert spec.noise is not None and spec.noise.shape[1:] == (128, 128)
    data = build_federated_data(DataOptions(SourceOptions("speechcommands"),
                                            num_clients=2, local_test_fraction=0.2))
    counts = {s: (spec.train.groups == spec.group_names.index(s)).sum() for s in SPEAKERS}
    largest = sorted(SPEAKERS, key=lambda s: (-counts[s], s))[:2]
    assert data.partitioner == "natural" and list(data.client_groups) == sorted(largest)
    used = np.concatenate([*data.client_indices, *data.client_test_indices])
    assert len(used) == len(set(used.tolist())) == sum(counts[s] for s in largest) + 3
    assert np.array_equal(np.sort(np.concatenate(data.client_test_indices)), data.test_indices)
    load_source.cache_clear()
    build_federated_data.cache_clear()
