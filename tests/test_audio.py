"""Log-mel features of speech clips (reefl.data.audio).

The fbank is pinned against kaldi-native-fbank (Kaldi mode, the same options as the official
``torchaudio.compliance.kaldi.fbank`` call) on settings it accepts, and checked physically
(tone placement, empty filters, frame counts) on the 128-bin / 25 ms setting it refuses.

Waveform scale, apples to apples: torchaudio's official usage passes floats in [-1, 1], and
kaldi-native-fbank's ``accept_waveform`` takes floats and uses them as given (its dither default
0.00003 ~ 1/32768 is Kaldi's int16-scale 1.0 expressed in that scale); Kaldi's own binaries read
int16-valued floats instead. With dither 0 the pipeline is linear up to the power spectrum, so
a gain only shifts log-mel by 2 ln(gain) away from the floor. We feed both implementations the
same [-1, 1] float samples, and check that kaldi-native-fbank does not rescale internally.
"""

from __future__ import annotations

import math

import kaldi_native_fbank as knf
import numpy as np
import pytest
import torch

from reefl.data.audio import (
    LOG_FLOOR,
    NUM_FRAMES,
    NUM_MEL_BINS,
    augment_features,
    clip_features,
    fit_length,
    kaldi_fbank,
    mel_filterbank,
    resample,
)

RATE = 16000


def knf_options(num_bins: int, frame_length_ms: float) -> knf.FbankOptions:
    """kaldi-native-fbank options equal to the official torchaudio call (Kaldi mode)."""
    frame = knf.FrameExtractionOptions(
        samp_freq=RATE, frame_shift_ms=10.0, frame_length_ms=frame_length_ms, dither=0.0,
        preemph_coeff=0.97, remove_dc_offset=True, window_type="hanning",
        round_to_power_of_two=True, snip_edges=True,
    )
    mel = knf.MelBanksOptions(num_bins=num_bins, low_freq=20.0, high_freq=0.0, is_librosa=False)
    return knf.FbankOptions(
        frame_opts=frame, mel_opts=mel, use_energy=False, htk_compat=True, use_log_fbank=True,
        use_log_floor=True, eps=float(np.finfo(np.float32).eps), use_power=True,
    )


def knf_fbank(wave: np.ndarray, num_bins: int, frame_length_ms: float) -> np.ndarray:
    """kaldi-native-fbank log-mel [T, num_bins] of a float waveform, as given (no rescaling)."""
    extractor = knf.OnlineFbank(knf_options(num_bins, frame_length_ms))
    extractor.accept_waveform(RATE, wave.tolist())
    extractor.input_finished()
    return np.stack([extractor.get_frame(i) for i in range(extractor.num_frames_ready)])


def ours(wave: np.ndarray, **kwargs: float) -> np.ndarray:
    """Our log-mel [T, M] of one waveform."""
    return kaldi_fbank(torch.from_numpy(wave.astype(np.float32))[None], **kwargs)[0].numpy()


def hz_to_mel(freq: float | np.ndarray) -> np.ndarray:
    """Kaldi's mel scale, written out here independently of the module."""
    return 1127.0 * np.log(1.0 + np.asarray(freq, dtype=np.float64) / 700.0)


def filter_edges_mel(num_bins: int) -> np.ndarray:
    """The num_bins + 2 equally spaced mel edges of Kaldi's filters between 20 Hz and 8 kHz."""
    low, high = hz_to_mel(20.0), hz_to_mel(RATE / 2)
    return low + (high - low) / (num_bins + 1) * np.arange(num_bins + 2)


@pytest.fixture(scope="module")
def signals() -> dict[str, np.ndarray]:
    """1 s of white noise, a 100 Hz -> 7.9 kHz linear chirp, and their sum."""
    rng = np.random.default_rng(0)
    t = np.arange(RATE) / RATE
    noise = 0.1 * rng.standard_normal(RATE)
    chirp = 0.5 * np.sin(2 * np.pi * (100.0 * t + 0.5 * 7800.0 * t**2))
    return {k: v.astype(np.float32) for k, v in
            {"noise": noise, "chirp": chirp, "noise+chirp": noise + chirp}.items()}


@pytest.mark.parametrize(("num_bins", "frame_ms", "fft_size"), [(80, 25.0, 512), (128, 50.0, 1024)])
def test_fbank_matches_kaldi_native_fbank(signals, num_bins, frame_ms, fft_size):
    # Tolerances. Both sides work in float32, and kaldi-native-fbank evaluates the mel scale in
    # float32 too, so its filter weights differ from ours (float64, then rounded) by ~2e-5.
    # These errors are relative to a frame's *total* energy, not to each filter's: on noise every
    # filter is well above that level and the measured max |diff| of log-mel is 1.9e-4 (80 bins)
    # and 4.4e-4 (noise+chirp), so 1e-3 is tight. (Deliberate mistakes give far more: a periodic
    # Hann window 0.15, pre-emphasis 0.96 0.89, low_freq 19 Hz 1.2.) For the pure chirp, filters
    # far from the sweep hold only window side-lobe leakage ~1e-7 of the frame energy, where
    # float32 rounding alone moves the log by up to ~1e-2; there we compare energies relative to
    # the frame's largest filter energy (measured 1.1e-5; tolerance 1e-4), plus log-mel on the
    # filters within 30 dB of that maximum (measured 1.3e-4; tolerance 1e-3).
    weights = knf.MelBanks(knf_options(num_bins, frame_ms).mel_opts,
                           knf_options(num_bins, frame_ms).frame_opts).get_matrix()
    bank = mel_filterbank(num_bins, fft_size, RATE).numpy()
    assert bank.shape == weights.shape == (num_bins, fft_size // 2 + 1)
    np.testing.assert_allclose(bank, weights, rtol=0, atol=1e-4)

    for name in ("noise", "noise+chirp"):
        ref = knf_fbank(signals[name], num_bins, frame_ms)
        got = ours(signals[name], num_mel_bins=num_bins, frame_length_ms=frame_ms)
        assert got.shape == ref.shape == (1 + (RATE - 16 * int(frame_ms)) // 160, num_bins)
        assert np.abs(got - ref).max() < 1e-3, name

    ref = knf_fbank(signals["chirp"], num_bins, frame_ms).astype(np.float64)
    got = ours(signals["chirp"], num_mel_bins=num_bins, frame_length_ms=frame_ms).astype(np.float64)
    frame_max = np.exp(ref).max(axis=1, keepdims=True)
    assert (np.abs(np.exp(got) - np.exp(ref)) / frame_max).max() < 1e-4
    strong = ref > np.log(frame_max) - math.log(1e3)
    assert strong.sum() > ref.shape[0]  # the sweep is seen in every frame
    assert np.abs(got - ref)[strong].max() < 1e-3


def test_input_scale_is_used_as_given(signals):
    # kaldi-native-fbank does not normalise its input: int16-scale samples shift log-mel by
    # exactly 2 ln 32768, as ours does; so feeding both the same floats compares like with like.
    # (Cells at the floor for the [-1, 1] input are excluded: scaling lifts them off it.)
    wave = signals["noise"]
    shift = 2 * math.log(32768.0)
    for fbank in (lambda w: knf_fbank(w, 80, 25.0), lambda w: ours(w, num_mel_bins=80)):
        base = fbank(wave)
        above = base > LOG_FLOOR + 1.0
        assert above.mean() > 0.99
        np.testing.assert_allclose((fbank(wave * 32768) - base)[above], shift, atol=1e-4)


def test_kaldi_native_fbank_refuses_128_bins_at_25ms():
    with pytest.raises(ValueError, match="num_mel_bins too large"):
        knf.OnlineFbank(knf_options(128, 25.0))
    knf.OnlineFbank(knf_options(126, 25.0))  # the largest count it accepts at 25 ms


@pytest.mark.parametrize("freq", [312.5, 1000.0, 3000.0, 6000.0])
def test_pure_tone_lands_in_nearest_filter(freq):
    # Tones sit on FFT bin centres (multiples of 31.25 Hz). Below ~1 kHz the 128 filters are
    # narrower than that spacing, so an off-bin tone (300 Hz, say) is seen through its nearest
    # FFT bins and may peak one filter away; that is a property of the 512-point FFT, not a bug.
    t = np.arange(RATE) / RATE
    features = ours(0.3 * np.sin(2 * np.pi * freq * t))
    assert features.shape == (98, NUM_MEL_BINS)
    peaks = filter_edges_mel(NUM_MEL_BINS)[1:-1]
    expected = int(np.argmin(np.abs(peaks - hz_to_mel(freq))))
    assert int(features.mean(axis=0).argmax()) == expected


def test_empty_filters_are_those_without_fft_bins_and_give_the_floor(signals):
    edges = filter_edges_mel(NUM_MEL_BINS)
    fft_mel = hz_to_mel(np.arange(256) * RATE / 512)  # bins below Nyquist
    has_bin = ((fft_mel[None, :] > edges[:-2, None]) & (fft_mel[None, :] < edges[2:, None])).any(1)
    expected_empty = np.flatnonzero(~has_bin)
    assert len(expected_empty) > 0

    bank = mel_filterbank(NUM_MEL_BINS, 512, RATE)
    assert bank.shape == (NUM_MEL_BINS, 257)
    assert torch.all(bank[:, -1] == 0)  # Nyquist column padded with zeros
    assert torch.all(bank <= 1) and torch.all(bank >= 0)
    np.testing.assert_array_equal(np.flatnonzero(bank.sum(dim=1).numpy() == 0), expected_empty)

    # On white noise, exactly the empty filters sit at the floor in every frame. (Filter 0,
    # 20-41 Hz, catches only the 31.25 Hz FFT bin, which DC removal and pre-emphasis nearly
    # cancel, so it touches the floor in some frames, but not in all.)
    features = ours(signals["noise"])
    always_floor = np.flatnonzero(np.all(features == np.float32(LOG_FLOOR), axis=0))
    np.testing.assert_array_equal(always_floor, expected_empty)
    assert np.all(np.delete(features, expected_empty, axis=1).mean(axis=0) > LOG_FLOOR + 1.0)


def test_frame_counts_and_gain():
    for samples, frames in [(16000, 98), (399, 0), (400, 1), (559, 1), (560, 2)]:
        assert kaldi_fbank(torch.zeros(2, samples)).shape == (2, frames, NUM_MEL_BINS)
    assert torch.all(kaldi_fbank(torch.zeros(1, 800)) == np.float32(LOG_FLOOR))
    wave = np.random.default_rng(1).standard_normal(4000).astype(np.float32) * 0.05
    base = ours(wave)
    above = base > LOG_FLOOR + 1.0  # a gain of 2 lifts floored cells by less than 2 ln 2
    assert above.mean() > 0.95
    np.testing.assert_allclose((ours(2 * wave) - base)[above], 2 * math.log(2.0), atol=1e-4)


def test_clip_features_pads_cuts_and_batches():
    rng = np.random.default_rng(2)
    waves = [rng.uniform(-0.5, 0.5, n).astype(np.float32) for n in (16000, 48000, 12000, 300)]
    out = clip_features(waves, RATE, batch=3)
    assert out.shape == (4, NUM_FRAMES, NUM_MEL_BINS) and out.dtype == np.float32
    one_s = ours(waves[0])
    np.testing.assert_allclose(out[0, :98], one_s, atol=1e-4)
    assert np.all(out[0, 98:] == 0)
    np.testing.assert_allclose(out[1], ours(waves[1])[:NUM_FRAMES], atol=1e-4)  # cut
    assert np.all(out[3] == 0)  # shorter than one frame
    # Padding within a batch changes nothing: clip 2 was padded to 16000 samples next to clip 0.
    alone = clip_features([waves[2]], RATE)[0]
    np.testing.assert_allclose(out[2], alone, atol=1e-4)
    assert np.all(alone[73:] == 0) and np.all(alone[:73, 4:] > LOG_FLOOR)

    stereo = np.stack([waves[0], 0.2 * waves[0] + 0.1], axis=1)
    np.testing.assert_allclose(clip_features([stereo], RATE)[0, :98], ours(stereo.mean(1)),
                               atol=1e-4)
    low_rate = waves[2][:8000]
    mixed = clip_features([waves[0], low_rate], [RATE, 8000])
    np.testing.assert_allclose(mixed[1, :98], ours(resample(low_rate, 8000)), atol=1e-4)
    with pytest.raises(TypeError):
        clip_features([np.zeros(16000, dtype=np.int16)], RATE)


@pytest.mark.parametrize("rate", [8000, 44100])
def test_resample_keeps_frequency_and_duration(rate):
    t = np.arange(rate // 2) / rate  # 0.5 s
    out = resample(np.sin(2 * np.pi * 1000.0 * t), rate)
    assert len(out) == RATE // 2
    spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out))))
    assert abs(np.argmax(spectrum) * RATE / len(out) - 1000.0) <= RATE / len(out)
    assert np.sqrt(np.mean(out[1000:-1000] ** 2)) == pytest.approx(math.sqrt(0.5), rel=1e-2)


def test_resample_identity_and_fit_length():
    wave = np.arange(10, dtype=np.float32)
    assert resample(wave, RATE) is wave
    np.testing.assert_array_equal(fit_length(wave, 4), wave[:4])
    np.testing.assert_array_equal(fit_length(wave, 13), np.r_[wave, 0, 0, 0])


def _features(batch: int, frames: int = 20, bins: int = 3, seed: int = 0) -> torch.Tensor:
    """Random raw log-mel values in [-2, 0] (all below the marker used in the shift test)."""
    g = torch.Generator().manual_seed(seed)
    return -2 * torch.rand(batch, 1, frames, bins, generator=g, dtype=torch.float64)


def test_augment_shift_moves_frames_and_fills_with_floor():
    x = _features(64)
    x[:, :, 10] = 7.0  # a marker frame
    out = augment_features(x, None, torch.Generator().manual_seed(3), max_shift_frames=3,
                           noise_prob=0.0)
    shifts = []
    for b in range(len(x)):
        landed = torch.nonzero(out[b, 0, :, 0] == 7.0).flatten().tolist()
        assert len(landed) == 1
        s = landed[0] - 10
        assert -3 <= s <= 3
        expected = torch.full_like(x[b], LOG_FLOOR)
        if s >= 0:
            expected[:, s:] = x[b, :, : 20 - s]
        else:
            expected[:, :s] = x[b, :, -s:]
        assert torch.equal(out[b], expected)
        shifts.append(s)
    assert min(shifts) < 0 < max(shifts)

    untouched = augment_features(x, None, torch.Generator(), max_shift_frames=0, noise_prob=0.0)
    assert torch.equal(untouched, x)


def test_augment_volume_zero_is_the_shift_only():
    x, noise = _features(32), _features(4, seed=1)[:, 0] + 3
    shift_only = augment_features(x, noise, torch.Generator().manual_seed(5), noise_prob=0.0)
    silent = augment_features(x, noise, torch.Generator().manual_seed(5), noise_prob=1.0,
                              max_volume=0.0)
    assert torch.equal(silent, shift_only)
    assert not torch.equal(shift_only, x)  # the shifts themselves did something


def test_augment_noise_is_power_mixed_with_uniform_amplitude():
    x = _features(400)
    noise = 2 + 2 * torch.rand(3, 20, 3, generator=torch.Generator().manual_seed(1),
                               dtype=torch.float64)
    out = augment_features(x, noise, torch.Generator().manual_seed(7), max_shift_frames=0,
                           noise_prob=1.0, max_volume=0.1)
    assert torch.all(out >= x)
    upper = torch.logaddexp(x[:, 0, None], math.log(0.1**2) + noise[None])  # [B, K, T, M]
    # Recover each example's noise clip k and power gain v^2 from the output: for the right k,
    # (exp(out) - exp(x)) / exp(noise_k) is one constant over all T x M cells.
    implied = (out.exp() - x.exp())[:, 0, None] / noise.exp()[None]
    spread = implied.std(dim=(2, 3)) / implied.mean(dim=(2, 3))
    picks = spread.argmin(dim=1)
    rows = torch.arange(len(x))
    power = implied[rows, picks].median(dim=2).values.median(dim=1).values
    assert torch.all(power > 0) and torch.all(power <= 0.1**2 + 1e-12)
    assert torch.all(out[:, 0] <= upper[rows, picks] + 1e-12)
    rebuilt = torch.logaddexp(x[:, 0], power.log()[:, None, None] + noise[picks])
    assert (out[:, 0] - rebuilt).abs().max().item() < 1e-9
    assert set(picks.tolist()) == {0, 1, 2}
    # v is uniform in amplitude: E[v] = 0.05 (a uniform power would give E[v] = 0.067).
    assert power.sqrt().mean().item() == pytest.approx(0.05, abs=0.01)

    half = augment_features(x, noise, torch.Generator().manual_seed(7), max_shift_frames=0,
                            noise_prob=0.5)
    assert 0.4 < (half != x).flatten(1).any(dim=1).double().mean().item() < 0.6


def test_augment_is_reproducible_and_respects_valid_frames():
    x, noise = _features(16), _features(2, seed=1)[:, 0]
    first = augment_features(x, noise, torch.Generator().manual_seed(11))
    again = augment_features(x, noise, torch.Generator().manual_seed(11))
    other = augment_features(x, noise, torch.Generator().manual_seed(12))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)

    limited = augment_features(x, noise, torch.Generator().manual_seed(11), valid_frames=12)
    assert torch.equal(limited[:, :, 12:], x[:, :, 12:])
    cut = augment_features(x[:, :, :12], noise[:, :12], torch.Generator().manual_seed(11))
    assert torch.equal(limited[:, :, :12], cut)
