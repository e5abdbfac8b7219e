"""Log-mel "images" of 1-s speech clips, as the official ReeFL code computes them, in plain torch.

The official code featurises a clip with ``torchaudio.compliance.kaldi.fbank(waveform,
htk_compat=True, sample_frequency=16000, use_energy=False, window_type='hanning',
num_mel_bins=128, dither=0.0, frame_shift=10)`` and then zero-pads (or cuts) the frame axis to
128 frames. torchaudio is not available here, so :func:`kaldi_fbank` re-implements exactly that
recipe: 25 ms frames every 10 ms that must fit wholly in the clip (``snip_edges``), per-frame DC
removal, pre-emphasis 0.97, a symmetric Hann window, a 512-point FFT (400 samples rounded up to a
power of two), the power spectrum, Kaldi's triangular mel filters between 20 Hz and Nyquist, and
``log(max(energy, float32 eps))``. No energy term is appended (``use_energy=False`` makes
``htk_compat`` and ``raw_energy`` irrelevant) and there is no dither, so the features are a
deterministic function of the samples.

Why not just call kaldi-native-fbank? Because it refuses this configuration. Measured with
kaldi-native-fbank 1.23.0 (Kaldi mode, the options above): building ``OnlineFbank`` or
``MelBanks`` with 128 bins and a 25 ms window raises ``ValueError: You may have set num_mel_bins
too large.`` (as it does for 127 bins, and at 32 ms, which also means a 512-point FFT), while
every count up to 126 bins at 25 ms, and 128 bins at 50 ms (1024-point FFT), is accepted. The
reason: at 16 kHz a 512-point FFT has bins 31.25 Hz apart, and the lowest of 128 mel filters are
about that narrow, so one of them (filter 3, spanning 63.0-92.6 Hz, between the FFT bins at
62.5 and 93.75 Hz) contains no FFT bin. Kaldi treats that as a configuration error; torchaudio
keeps the filter as an all-zero row, so its output is always the log floor. We follow
torchaudio, because the official features (and any checkpoint trained on them) come from it, and
we pin our implementation against kaldi-native-fbank on settings it accepts (see
``tests/test_audio.py``): on white noise, and on noise plus a chirp, the largest log-mel
difference we measured is 4.4e-4 (80 bins at 25 ms, 128 bins at 50 ms). Agreement is close but
not bit-exact, because both work in float32 and we build the filter weights in float64 (they
differ from kaldi-native-fbank's float32 weights by up to 2e-5). torchaudio computes in float32
too, so we expect the same level of agreement with it.

Waveform scale: torchaudio's usage (``torchaudio.load``) gives floats in [-1, 1], and that is
what these functions expect. Apart from the log floor the features are scale-equivariant (a gain
``a`` adds ``2 ln a`` to every log-mel value), so the scale matters only for where the floor
bites; it does matter for consistency with cached features and with the zero-waveform value
:data:`LOG_FLOOR`.

:func:`augment_features` moves the official training augmentation (random time shift, mixed-in
background noise) from the waveform to the feature domain, so features are computed once and
cached.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy.signal import resample_poly

SAMPLE_RATE = 16000
NUM_MEL_BINS = 128
NUM_FRAMES = 128
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
EPSILON = torch.finfo(torch.float32).eps
LOG_FLOOR = math.log(torch.finfo(torch.float32).eps)
"""Log-mel value of a silent frame (and of an empty filter): ``log(float32 eps)`` ~ -15.94."""


def _mel(freq: np.ndarray | float) -> np.ndarray:
    """Hz to mel on Kaldi's (HTK) scale, ``1127 ln(1 + f / 700)``."""
    return 1127.0 * np.log1p(np.asarray(freq, dtype=np.float64) / 700.0)


def frame_sizes(
    frame_length_ms: float, frame_shift_ms: float, sample_rate: int
) -> tuple[int, int, int]:
    """Return (frame length, frame shift, FFT size) in samples, as Kaldi/torchaudio derive them.

    The lengths are truncated to whole samples and the FFT size is the frame length rounded up to
    a power of two (``round_to_power_of_two=True``), e.g. (400, 160, 512) at 16 kHz.
    """
    length = int(sample_rate * frame_length_ms * 0.001)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    if length < 2 or shift < 1:
        raise ValueError(f"frame of {length} samples every {shift} samples is too small")
    return length, shift, 1 << (length - 1).bit_length()


def num_frames(num_samples: int, frame_length: int, frame_shift: int) -> int:
    """Number of frames that fit wholly in ``num_samples`` (``snip_edges=True``); 0 if none."""
    if num_samples < frame_length:
        return 0
    return 1 + (num_samples - frame_length) // frame_shift


def mel_filterbank(
    num_bins: int,
    fft_size: int,
    sample_rate: int,
    low_freq: float = LOW_FREQ,
    high_freq: float = 0.0,
) -> torch.Tensor:
    """Kaldi's triangular mel filters as a float32 [num_bins, fft_size // 2 + 1] matrix.

    Filter ``i`` rises linearly in mel from ``mel_low + i * delta`` to its peak at
    ``mel_low + (i + 1) * delta`` and falls back to zero at ``mel_low + (i + 2) * delta``, where
    ``delta`` splits [low_freq, high_freq] into ``num_bins + 1`` equal mel steps; each FFT bin
    ``k`` (at ``k * sample_rate / fft_size`` Hz) gets the triangle's height at its own mel value.
    ``high_freq <= 0`` is an offset from Nyquist (0 means Nyquist). Like Kaldi, only bins below
    Nyquist are weighted; like torchaudio, the Nyquist column is then appended as zeros so the
    matrix multiplies a full ``rfft`` power spectrum. Unlike Kaldi, filters that catch no FFT
    bin are kept as all-zero rows rather than rejected (see the module docstring).
    """
    if num_bins < 4 or fft_size % 2:
        raise ValueError("need at least 4 mel bins and an even FFT size")
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not 0.0 <= low_freq < high_freq <= nyquist:
        raise ValueError(f"bad band [{low_freq}, {high_freq}] Hz for rate {sample_rate}")
    mel_low, mel_high = _mel(low_freq), _mel(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    edges = mel_low + delta * np.arange(num_bins + 2)
    left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    fft_mel = _mel(np.arange(fft_size // 2) * (sample_rate / fft_size))[None, :]
    up = (fft_mel - left) / (center - left)
    down = (right - fft_mel) / (right - center)
    weights = np.maximum(0.0, np.minimum(up, down))
    weights = np.pad(weights, ((0, 0), (0, 1)))
    return torch.from_numpy(weights.astype(np.float32))


def _window(frame_length: int) -> torch.Tensor:
    """Symmetric Hann window ``0.5 - 0.5 cos(2 pi n / (N - 1))`` (Kaldi's "hanning")."""
    return torch.hann_window(frame_length, periodic=False, dtype=torch.float32)


def _windowed_frames(
    waveforms: torch.Tensor, length: int, shift: int, fft_size: int
) -> torch.Tensor:
    """Kaldi's per-frame pre-processing, into a zero-padded FFT buffer [B, T, fft_size].

    Per frame, Kaldi removes the frame mean ``mu``, pre-emphasises (``y[n] = z[n] - p z[n-1]``,
    the first sample against itself: ``y[0] = (1 - p) z[0]``) and applies the window. As the
    operations are linear, this equals pre-emphasising the whole waveform once,
    ``d[n] = x[n] - p x[n-1]``, and subtracting ``(1 - p) mu`` from each frame's view of ``d``;
    only ``y[0] = (1 - p)(x[0] - mu)`` needs its own value. That avoids two large temporaries
    and writes straight into an FFT-sized zero buffer, which ``rfft`` transforms about twice as
    fast as it pads internally.
    """
    batch = waveforms.shape[0]
    frames = waveforms.unfold(1, length, shift)  # [B, T, L], a strided view
    means = frames.mean(dim=2)
    emphasised = torch.empty_like(waveforms)
    emphasised[:, 0] = waveforms[:, 0]
    torch.sub(waveforms[:, 1:], waveforms[:, :-1], alpha=PREEMPHASIS, out=emphasised[:, 1:])
    buffer = waveforms.new_zeros((batch, frames.shape[1], fft_size))
    head = buffer[..., :length]
    head.copy_(emphasised.unfold(1, length, shift))
    head.sub_((1.0 - PREEMPHASIS) * means[..., None])
    head[..., 0] = (1.0 - PREEMPHASIS) * (frames[..., 0] - means)
    head.mul_(_window(length).to(buffer.device))
    return buffer


def kaldi_fbank(
    waveforms: torch.Tensor,
    num_mel_bins: int = NUM_MEL_BINS,
    frame_length_ms: float = FRAME_LENGTH_MS,
    frame_shift_ms: float = FRAME_SHIFT_MS,
    sample_rate: int = SAMPLE_RATE,
) -> torch.Tensor:
    """Log-mel filterbank features [B, T, num_mel_bins] of waveforms [B, S] in [-1, 1].

    The same computation as ``torchaudio.compliance.kaldi.fbank`` with the official options
    (module docstring), batched and in float32 (inputs are converted): strided frames
    (``unfold``), each DC-removed, pre-emphasised, Hann-windowed and zero-padded to the FFT size
    (:func:`_windowed_frames`), then ``rfft``, power spectrum, mel filters and ``log(max(e, eps))``.
    ``T = 1 + (S - frame_len) // shift`` (0 when the clip is shorter than a frame). Each frame
    depends only on its own samples, so zero-padding a waveform at the end leaves its first T
    frames unchanged.
    """
    if waveforms.dim() != 2:
        raise ValueError(f"expected waveforms [B, S], got shape {tuple(waveforms.shape)}")
    length, shift, fft_size = frame_sizes(frame_length_ms, frame_shift_ms, sample_rate)
    batch, samples = waveforms.shape
    if num_frames(samples, length, shift) == 0:
        return waveforms.new_zeros((batch, 0, num_mel_bins), dtype=torch.float32)
    buffer = _windowed_frames(waveforms.to(torch.float32), length, shift, fft_size)
    spectrum = torch.fft.rfft(buffer, dim=2)
    power = spectrum.real.square() + spectrum.imag.square()
    bank = mel_filterbank(num_mel_bins, fft_size, sample_rate).to(power.device)
    return (power @ bank.T).clamp_min_(EPSILON).log_()


def resample(wave: np.ndarray, orig_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase-resample a 1-D waveform from ``orig_rate`` to ``target_rate`` Hz.

    Uses ``scipy.signal.resample_poly`` with up/down factors reduced by their gcd (e.g. 160/441
    for 44.1 kHz to 16 kHz); its anti-aliasing FIR keeps the passband. The output has
    ``ceil(len * up / down)`` samples. Equal rates return the input unchanged (no copy).
    """
    if orig_rate <= 0 or target_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} and {target_rate}")
    if orig_rate == target_rate:
        return wave
    divisor = math.gcd(int(orig_rate), int(target_rate))
    return resample_poly(wave, target_rate // divisor, orig_rate // divisor)


def fit_length(wave: np.ndarray, num_samples: int) -> np.ndarray:
    """Cut ``wave`` to ``num_samples`` or zero-pad it at the end up to that length."""
    if len(wave) >= num_samples:
        return wave[:num_samples]
    return np.pad(wave, (0, num_samples - len(wave)))


def _to_mono(wave: np.ndarray) -> np.ndarray:
    """Float32 mono version of a 1-D waveform or of a [samples, channels] array (channel mean).

    Integer arrays are refused: their scale (e.g. int16 full scale 32768) is not the [-1, 1] the
    features expect, and guessing it silently would shift every log-mel value.
    """
    wave = np.asarray(wave)
    if not np.issubdtype(wave.dtype, np.floating):
        raise TypeError(f"expected float samples in [-1, 1], got dtype {wave.dtype}")
    if wave.ndim == 2:
        wave = wave.mean(axis=1)
    elif wave.ndim != 1:
        raise ValueError(f"expected [samples] or [samples, channels], got shape {wave.shape}")
    return wave.astype(np.float32, copy=False)


def clip_features(
    waves: Sequence[np.ndarray], sample_rates: Sequence[int] | int, batch: int = 256
) -> np.ndarray:
    """Official log-mel "images" float32 [N, NUM_FRAMES, NUM_MEL_BINS] of arbitrary clips.

    Each clip is made mono (channel mean), resampled to 16 kHz and cut to the samples that
    NUM_FRAMES frames need (20720); then clips are featurised ``batch`` at a time with
    :func:`kaldi_fbank`. To batch unequal lengths, clips are sorted by length and each is
    zero-padded to its batch's longest; this is exact because a frame sees only its own samples,
    and only the clip's own ``T`` frames are kept. Finally the frame axis is zero-padded (value
    0, as the official code pads the fbank) up to NUM_FRAMES.
    """
    rates = [sample_rates] * len(waves) if isinstance(sample_rates, int) else list(sample_rates)
    if len(rates) != len(waves):
        raise ValueError(f"{len(waves)} waveforms but {len(rates)} sample rates")
    length, shift, _ = frame_sizes(FRAME_LENGTH_MS, FRAME_SHIFT_MS, SAMPLE_RATE)
    max_samples = length + (NUM_FRAMES - 1) * shift
    clips = [resample(_to_mono(w), r)[:max_samples] for w, r in zip(waves, rates, strict=True)]
    out = np.zeros((len(clips), NUM_FRAMES, NUM_MEL_BINS), dtype=np.float32)
    order = sorted(range(len(clips)), key=lambda i: len(clips[i]))
    for start in range(0, len(order), batch):
        chunk = order[start : start + batch]
        longest = len(clips[chunk[-1]])
        if num_frames(longest, length, shift) == 0:
            continue
        padded = np.stack([fit_length(clips[i], longest) for i in chunk])
        with torch.no_grad():
            feats = kaldi_fbank(torch.from_numpy(padded.astype(np.float32, copy=False))).numpy()
        for row, i in enumerate(chunk):
            count = num_frames(len(clips[i]), length, shift)
            out[i, :count] = feats[row, :count]
    return out


def shift_frames(features: torch.Tensor, shifts: torch.Tensor, fill: float) -> torch.Tensor:
    """Move each example's frames [B, C, T, M] by its own integer ``shifts[b]`` along T.

    Frame ``t`` goes to ``t + shifts[b]``; frames moved past either end are dropped, and the
    vacated ones are set to ``fill``.
    """
    frames = features.shape[2]
    source = torch.arange(frames, device=features.device)[None, :] - shifts[:, None]  # [B, T]
    valid = (source >= 0) & (source < frames)
    index = source.clamp(0, frames - 1)[:, None, :, None].expand_as(features)
    moved = torch.gather(features, 2, index)
    return torch.where(valid[:, None, :, None], moved, torch.full_like(moved, fill))


def augment_features(
    features: torch.Tensor,
    noise: torch.Tensor | None,
    generator: torch.Generator,
    max_shift_frames: int = 10,
    noise_prob: float = 0.8,
    max_volume: float = 0.1,
    *,
    valid_frames: int | None = None,
) -> torch.Tensor:
    """The official training augmentation, applied to raw log-mel features [B, 1, T, M].

    The official code shifts each waveform by up to +-100 ms (zero-filled) and, with probability
    0.8, adds a background-noise clip scaled by an amplitude ``v ~ U(0, 0.1)``. Here the same
    happens to cached features (before normalisation): an integer shift ``s`` uniform in
    ``[-max_shift_frames, max_shift_frames]`` (10 ms frames, so 10 frames = 100 ms) moves the
    frames along T, vacated frames becoming LOG_FLOOR (what a zero waveform gives); then, with
    probability ``noise_prob``, a uniformly drawn ``noise[k]`` (raw log-mel [T, M]) is mixed in
    the power domain, ``log(exp(x) + v^2 exp(noise_k))``, computed as ``logaddexp(x, 2 ln v +
    noise_k)``. The power spectrum of a sum of independent signals is, in expectation, the sum of
    their power spectra (cross terms average out), and an amplitude ``v`` scales power by
    ``v^2``. This is an approximation: shifts are whole 10 ms frames (the waveform shift is any
    whole number of samples), frames straddling a waveform shift's edge are not reproduced, a
    single clip's cross terms are not zero, and floored energies stay floored.

    ``valid_frames`` (default: all T) limits both steps to the first frames, leaving the rest
    untouched: with :func:`clip_features` output of 1-s clips, ``valid_frames=98`` keeps the 30
    zero-padded frames at 0, as in the official pipeline, which pads after augmenting.

    Every draw comes from ``generator`` (per example: shift, noise yes/no, noise index, volume,
    always all four), so results are reproducible; it must be a CPU generator.
    """
    if features.dim() != 4:
        raise ValueError(f"expected features [B, C, T, M], got shape {tuple(features.shape)}")
    if noise is not None and (len(noise) == 0 or noise.shape[1:] != features.shape[2:]):
        raise ValueError(f"noise {tuple(noise.shape)} must be [K>0, T, M] for {features.shape}")
    frames = features.shape[2] if valid_frames is None else valid_frames
    if not 0 < frames <= features.shape[2]:
        raise ValueError(f"valid_frames={valid_frames} outside 1..{features.shape[2]}")
    batch, device = features.shape[0], features.device
    shifts = torch.randint(-max_shift_frames, max_shift_frames + 1, (batch,), generator=generator)
    apply = torch.rand(batch, generator=generator) < noise_prob
    num_noise = 1 if noise is None else len(noise)
    picks = torch.randint(0, num_noise, (batch,), generator=generator)
    volumes = torch.rand(batch, generator=generator, dtype=torch.float64) * max_volume
    head = shift_frames(features[:, :, :frames], shifts.to(device), LOG_FLOOR)
    rows = (apply & (volumes > 0)).nonzero().squeeze(1)
    if noise is not None and len(rows) > 0:
        log_power = (2.0 * torch.log(volumes[rows])).to(device=device, dtype=head.dtype)
        noisy = noise.to(head)[picks[rows].to(device), :frames] + log_power[:, None, None]
        rows = rows.to(device)
        head[rows] = torch.logaddexp(head[rows], noisy[:, None])
    return torch.cat([head, features[:, :, frames:]], dim=2)
