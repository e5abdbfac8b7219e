"""Speech Commands v0.02 (Warden 2018), read straight from Google's original archive.

The Hugging Face copy (``google/speech_commands``) is a script-based data set that
``datasets>=4`` no longer runs, so this module reads the archive itself: one folder per
spoken word holding 16-kHz mono 16-bit WAV clips named ``<speaker>_nohash_<n>.wav``, plus a
``_background_noise_`` folder of long noise recordings and the two list files that fix the
official validation and test splits.

Two label sets are offered, as in the literature: 12 classes (ten core words, "unknown" for
every other word, and "silence" cut from the noise recordings) and 35 classes (every word its
own class, no silence).
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from reefl.data.spec import DataError
from reefl.outputs.files import atomic_write

URL = "http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz"

CORE_WORDS: tuple[str, ...] = (
    "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go",
)
ALL_WORDS: tuple[str, ...] = tuple(sorted((
    "backward", "bed", "bird", "cat", "dog", "down", "eight", "five", "follow", "forward",
    "four", "go", "happy", "house", "learn", "left", "marvin", "nine", "no", "off", "on", "one",
    "right", "seven", "sheila", "six", "stop", "three", "tree", "two", "up", "visual", "wow",
    "yes", "zero",
)))
UNKNOWN = "unknown"
SILENCE = "silence"
# 12-class task: core words 0..9, then "unknown" (10) and "silence" (11).
CLASS_NAMES_12: tuple[str, ...] = (*CORE_WORDS, UNKNOWN, SILENCE)
# 35-class task: every word its own class, sorted; the task has no silence class.
CLASS_NAMES_35: tuple[str, ...] = ALL_WORDS
NUM_CLASSES: tuple[int, ...] = (12, 35)

NOISE_DIR = "_background_noise_"
VALIDATION_LIST = "validation_list.txt"
TESTING_LIST = "testing_list.txt"
_SPEAKER_SEP = "_nohash_"
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_PARTIAL = ".partial-"  # marks temp folders/files that are not complete yet
_DOWNLOAD_TIMEOUT_S = 60.0


class SpeechCommandsError(DataError):
    """Bad input for the Speech Commands reader: a missing, corrupt or unexpected path."""


@dataclass(frozen=True)
class SpeechClips:
    """Every clip of one Speech Commands folder, held in memory.

    ``waves[i]`` is float32 mono in [-1, 1] at ``sample_rates[i]`` Hz; clips keep their own
    length (most are 1 s, some shorter), so padding or cropping is left to the caller.
    ``speakers[i]`` is the speaker hash ("" for silence, which has no speaker), the natural
    key for partitioning clients. ``paths[i]`` is the clip's path relative to the root with
    "/" separators (as in the list files), or ``_background_noise_/<file>#<segment>`` for a
    silence segment. ``noise`` holds the background recordings whole (for augmentation),
    at ``noise_rates``; silence waves are views into them, so do not mutate either.
    """

    waves: list[np.ndarray]
    sample_rates: list[int]
    labels: np.ndarray
    speakers: np.ndarray
    class_names: tuple[str, ...]
    noise: list[np.ndarray]
    noise_rates: list[int]
    paths: list[str]


def class_names(num_classes: int = 12) -> tuple[str, ...]:
    """The class names of the 12- or 35-class task, in label order."""
    if num_classes == 12:
        return CLASS_NAMES_12
    if num_classes == 35:
        return CLASS_NAMES_35
    raise SpeechCommandsError(f"num_classes must be 12 or 35, not {num_classes!r}")


def _one_line(error: BaseException) -> str:
    """An exception's text squeezed onto one line, so our messages stay one line."""
    return " ".join(str(error).split()) or type(error).__name__


# --------------------------------------------------------------------------- locating


def is_speech_commands_root(path: Path) -> bool:
    """Whether ``path`` is an extracted Speech Commands folder.

    Such a folder has ``_background_noise_/`` and at least one folder named after one of
    the 35 words; a subset of the words is enough (small local copies, tests).
    """
    path = Path(path)
    if not (path / NOISE_DIR).is_dir():
        return False
    return any((path / word).is_dir() for word in ALL_WORDS)


def _archive_stem(archive: Path) -> str | None:
    """The archive's name without its tar suffix, or None if it is not a tar archive."""
    for suffix in _ARCHIVE_SUFFIXES:
        if archive.name.endswith(suffix) and len(archive.name) > len(suffix):
            return archive.name[: -len(suffix)]
    return None


def _root_inside(folder: Path) -> Path | None:
    """``folder`` if it is a root, else its only sub-folder that is a root, else None.

    The real archive has the words at its top level, but repacked copies often wrap them in
    one folder; both are accepted. Hidden and partial folders never count.
    """
    if is_speech_commands_root(folder):
        return folder
    found = [
        child for child in sorted(folder.iterdir())
        if child.is_dir() and not child.name.startswith(".") and is_speech_commands_root(child)
    ]
    return found[0] if len(found) == 1 else None


def _extract_members(archive: Path, into: Path) -> None:
    """Unpack ``archive`` into ``into``, refusing members that would land outside it."""
    with tarfile.open(archive, "r:*") as tar:
        tar.extractall(into, filter="data")


def extract_archive(archive: Path, cache_dir: Path | None = None) -> Path:
    """Extract ``archive`` once into ``cache_dir`` (default: next to it) and return the root.

    The target is ``<cache_dir>/<archive name without .tar.gz>``. Extraction goes to a
    hidden temp folder that is renamed into place only when complete, so a killed extraction
    never looks finished and the next call starts over; a target already in place is reused.
    Temp folders left by killed runs are not removed (another process may still own one).
    """
    archive = Path(archive)
    stem = _archive_stem(archive)
    if stem is None or not archive.is_file():
        raise SpeechCommandsError(f"not a .tar.gz archive: {archive}")
    parent = Path(cache_dir) if cache_dir is not None else archive.parent
    dest = parent / stem
    if dest.exists():
        if is_speech_commands_root(dest):
            return dest
        raise SpeechCommandsError(
            f"{dest} exists but is not an extracted Speech Commands folder; remove it"
        )
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{stem}{_PARTIAL}", dir=parent))
    try:
        try:
            _extract_members(archive, tmp)
        except (tarfile.TarError, OSError, EOFError) as error:
            raise SpeechCommandsError(f"cannot extract {archive}: {_one_line(error)}") from error
        inner = _root_inside(tmp)
        if inner is None:
            raise SpeechCommandsError(f"archive holds no Speech Commands folder: {archive}")
        try:
            os.rename(inner, dest)
        except OSError:
            # Another process finished first: use its copy if it is complete.
            if not is_speech_commands_root(dest):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def find_root(path: Path, cache_dir: Path | None = None) -> Path:
    """The extracted Speech Commands folder that ``path`` names or holds.

    ``path`` may be the extracted folder itself, a folder holding exactly one such folder, or
    the ``.tar.gz`` archive (extracted once, see ``extract_archive``).
    """
    path = Path(path)
    if path.is_file():
        return extract_archive(path, cache_dir)
    if not path.is_dir():
        raise SpeechCommandsError(f"no such file or folder: {path}")
    root = _root_inside(path)
    if root is None:
        raise SpeechCommandsError(
            f"not a Speech Commands folder (needs {NOISE_DIR}/ and word folders), "
            f"nor a folder holding exactly one: {path}"
        )
    return root


def download_archive(cache_dir: Path, url: str = URL) -> Path:
    """Download the archive at ``url`` into ``cache_dir`` unless it is already there.

    The bytes go to a hidden temp file renamed into place when complete, so a broken download
    is never mistaken for the archive. Without network this raises a one-line
    SpeechCommandsError telling the user to pass a local copy instead.
    """
    cache_dir = Path(cache_dir)
    name = url.rstrip("/").rsplit("/", 1)[-1] or "speech_commands.tar.gz"
    dest = cache_dir / name
    if dest.is_file():
        return dest
    with atomic_write(dest) as tmp:
        with tmp.open("wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
                    expected = response.headers.get("Content-Length")
                    shutil.copyfileobj(response, out, length=1 << 20)
            except urllib.error.HTTPError as error:
                raise SpeechCommandsError(
                    f"cannot download {url}: the server answered HTTP {error.code}; "
                    "pass the path of a local copy of the archive or of its extracted folder"
                ) from error
            except (urllib.error.URLError, OSError) as error:
                raise SpeechCommandsError(
                    f"cannot download {url} ({_one_line(error)}): this machine looks offline; "
                    "pass the path of a local copy of the archive or of its extracted folder"
                ) from error
        if expected is not None and tmp.stat().st_size != int(expected):
            raise SpeechCommandsError(
                f"download of {url} stopped early ({tmp.stat().st_size} of {expected} bytes); "
                "try again or pass the path of a local copy of the archive"
            )
    return dest


# --------------------------------------------------------------------------- reading


def _read_wav(path: Path, used_only: bool = False) -> tuple[np.ndarray, int]:
    """One WAV file as float32 mono in [-1, 1] and its sample rate; multi-channel is averaged.
    ``used_only``: only the frames a clip's features can depend on (``frames_used``), so a
    long recording among the word clips costs no more memory than a 1-s one."""
    from reefl.data.decode import frames_used

    try:
        with sf.SoundFile(path) as sound:
            rate = sound.samplerate
            frames = min(sound.frames, frames_used(rate)) if used_only else -1
            wave = sound.read(frames=frames, dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, OSError) as error:
        raise SpeechCommandsError(f"cannot read {path}: {_one_line(error)}") from error
    if wave.ndim > 1:
        wave = wave.mean(axis=1, dtype=np.float32)
    return wave, int(rate)


def _speaker_of(path: Path) -> str:
    """The speaker hash of a clip: its file name up to ``_nohash_``."""
    speaker, sep, _ = path.name.partition(_SPEAKER_SEP)
    if not sep or not speaker:
        raise SpeechCommandsError(f"clip name lacks '<speaker>{_SPEAKER_SEP}<n>.wav': {path}")
    return speaker


def _word_folders(root: Path) -> list[Path]:
    """The root's word folders, sorted; hidden or ``_``-prefixed extras are skipped.

    Any other folder means the layout is not what we think, so it is an error, not skipped.
    """
    words = []
    for child in sorted(root.iterdir()):
        if not child.is_dir() or child.name == NOISE_DIR:
            continue
        if child.name in ALL_WORDS:
            words.append(child)
        elif not child.name.startswith(("_", ".")):
            raise SpeechCommandsError(f"folder is not a Speech Commands word: {child}")
    return words


def _read_noise(root: Path) -> tuple[list[np.ndarray], list[int], list[str]]:
    """The background-noise recordings (sorted by name), their rates and file names."""
    folder = root / NOISE_DIR
    if not folder.is_dir():
        return [], [], []
    noise, rates, names = [], [], []
    for path in sorted(folder.glob("*.wav")):
        wave, rate = _read_wav(path)
        noise.append(wave)
        rates.append(rate)
        names.append(path.name)
    return noise, rates, names


def _silence_segments(
    noise: list[np.ndarray], rates: list[int], names: list[str]
) -> tuple[list[np.ndarray], list[int], list[str]]:
    """Cut each noise recording into as many non-overlapping 1-s segments as fit.

    Each segment is one "silence" example, as the 12-class task needs; they are views into
    the recordings, so they cost no extra memory.
    """
    waves, seg_rates, paths = [], [], []
    for wave, rate, name in zip(noise, rates, names, strict=True):
        for index in range(len(wave) // rate):
            waves.append(wave[index * rate:(index + 1) * rate])
            seg_rates.append(rate)
            paths.append(f"{NOISE_DIR}/{name}#{index}")
    return waves, seg_rates, paths


def read_speech_commands(root: Path, num_classes: int = 12) -> SpeechClips:
    """Read every clip under an extracted Speech Commands folder, labelled for one task.

    12 classes: core words 0..9, any other word "unknown" (10), and "silence" (11) cut from
    the noise recordings (see ``_silence_segments``). 35 classes: each word its label in
    ``ALL_WORDS`` order, no silence. A root may hold only some words; labels still follow
    the fixed class lists. Clips come word folder by word folder (sorted), silence last.
    """
    names = class_names(num_classes)
    root = Path(root)
    if not root.is_dir():
        raise SpeechCommandsError(f"no such folder: {root}")
    label_of = {
        word: names.index(word) if word in names else names.index(UNKNOWN) for word in ALL_WORDS
    }
    waves: list[np.ndarray] = []
    rates: list[int] = []
    labels: list[int] = []
    speakers: list[str] = []
    paths: list[str] = []
    for folder in _word_folders(root):
        for path in sorted(folder.glob("*.wav")):
            speaker = _speaker_of(path)
            wave, rate = _read_wav(path, used_only=True)
            waves.append(wave)
            rates.append(rate)
            labels.append(label_of[folder.name])
            speakers.append(speaker)
            paths.append(f"{folder.name}/{path.name}")
    if not waves:
        raise SpeechCommandsError(f"no word clips found under {root}")
    noise, noise_rates, noise_names = _read_noise(root)
    if SILENCE in names:
        seg_waves, seg_rates, seg_paths = _silence_segments(noise, noise_rates, noise_names)
        waves += seg_waves
        rates += seg_rates
        labels += [names.index(SILENCE)] * len(seg_waves)
        speakers += [""] * len(seg_waves)
        paths += seg_paths
    return SpeechClips(
        waves=waves,
        sample_rates=rates,
        labels=np.asarray(labels, dtype=np.int64),
        speakers=np.asarray(speakers, dtype=str),
        class_names=names,
        noise=noise,
        noise_rates=noise_rates,
        paths=paths,
    )


def official_splits(root: Path, paths: list[str]) -> np.ndarray:
    """The official split of each clip path: "validation", "testing" or "train".

    The split follows ``validation_list.txt`` and ``testing_list.txt`` (paths relative to the
    root); clips in neither, silence segments included, are "train". Missing list files are
    treated as empty.
    """
    root = Path(root)
    listed: dict[str, str] = {}
    for split, file_name in (("validation", VALIDATION_LIST), ("testing", TESTING_LIST)):
        list_path = root / file_name
        if list_path.is_file():
            for line in list_path.read_text().splitlines():
                if line.strip():
                    listed[line.strip()] = split
    return np.asarray([listed.get(path, "train") for path in paths], dtype=str)
