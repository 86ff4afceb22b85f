"""stages.ingest.decode on real files: good audio comes back exactly sized and in tune, every bad file
is a ClipError with a one-line reason, frames are sampled and cropped right, and a shard with good
and bad clips writes the good rows and quarantines the rest (stages.features.compute_mel_shard)."""

import json

import numpy as np
import pytest

from stages.ingest.decode import AudioSpec, ClipError, FrameSpec, decode_audio, decode_frames, load_audio, load_frames, prepare_audio, read_bytes
from tests.fixtures.media import BAD_AUDIO, CLIP_SECONDS, GOOD_AUDIO, TONE_HZ, tone


def dominant_hz(samples: np.ndarray, sample_rate: int) -> float:
    window = np.hanning(len(samples))
    spectrum = np.abs(np.fft.rfft(samples * window))
    return float(np.argmax(spectrum) * sample_rate / len(samples))


def head(samples: np.ndarray, sample_rate: int, seconds: float = 2.5) -> np.ndarray:
    """The first seconds, inside the 3 s of content (before any padding)."""
    return samples[: int(seconds * sample_rate)]


# ---------------------------------------------------------------- good audio


@pytest.mark.parametrize("name", GOOD_AUDIO)
def test_good_audio_is_exactly_spec_long_float32_and_in_tune(bad_media, name):
    spec = AudioSpec()  # 22.05 kHz, 4 s, pad
    audio = load_audio(str(bad_media[name]), spec)
    assert audio.dtype == np.float32 and audio.shape == (spec.n_samples,) == (88200,)
    assert audio.flags["C_CONTIGUOUS"] and np.all(np.isfinite(audio))
    assert abs(dominant_hz(head(audio, spec.sample_rate), spec.sample_rate) - TONE_HZ) < 5
    # Every good file holds a tone of amplitude 0.4-0.5 (AAC rings a little at the cut ends).
    assert 0.35 < float(np.sqrt(2) * np.std(head(audio, spec.sample_rate)[2048:])) < 0.55
    # Padded with zeros after the 3 s of content (AAC adds < 1024 samples of tail).
    assert not np.any(audio[int((CLIP_SECONDS + 0.05) * spec.sample_rate) :])


@pytest.mark.parametrize("rate,n_samples", [(22050, 88200), (16000, 64000)])
@pytest.mark.parametrize("name", ["good_mp4", "stereo_wav_44k", "good_wav", "good_flac"])
def test_tone_survives_resampling(bad_media, name, rate, n_samples):
    # good_mp4 and stereo_wav_44k are 44.1 kHz, good_wav 22.05 kHz, good_flac 16 kHz.
    spec = AudioSpec(sample_rate=rate)
    audio = load_audio(str(bad_media[name]), spec)
    assert audio.shape == (n_samples,)
    assert abs(dominant_hz(head(audio, rate), rate) - TONE_HZ) < 5


def test_stereo_is_downmixed_to_the_channel_mean(bad_media):
    # left 0.6*sin, right 0.2*sin: the mean is 0.4*sin; either channel alone would be 0.6 or 0.2.
    native = load_audio(str(bad_media["stereo_wav_44k"]), AudioSpec(sample_rate=44100, seconds=CLIP_SECONDS))
    np.testing.assert_allclose(native, tone(CLIP_SECONDS, 44100, amp=0.4), atol=1e-6)
    resampled = load_audio(str(bad_media["stereo_wav_44k"]), AudioSpec(sample_rate=22050))
    assert abs(float(np.max(np.abs(head(resampled, 22050)))) - 0.4) < 0.01


def test_pad_appends_zeros_and_tile_repeats_the_content(bad_media):
    original = tone(CLIP_SECONDS, 22050)
    n = len(original)
    padded = load_audio(str(bad_media["good_wav"]), AudioSpec(seconds=5.0, fit="pad"))
    tiled = load_audio(str(bad_media["good_wav"]), AudioSpec(seconds=5.0, fit="tile"))
    assert padded.shape == tiled.shape == (5 * 22050,)
    np.testing.assert_allclose(padded[:n], original, atol=1 / 32768 + 1e-6)  # 16-bit WAV
    assert not np.any(padded[n:])
    np.testing.assert_array_equal(tiled[:n], padded[:n])
    np.testing.assert_array_equal(tiled[n:], tiled[: 5 * 22050 - n])  # the first 2 s again
    assert np.max(np.abs(tiled[n:])) > 0.45


def test_crop_keeps_the_first_seconds(bad_media):
    cropped = load_audio(str(bad_media["good_wav"]), AudioSpec(seconds=1.0, min_seconds=0.5))
    assert cropped.shape == (22050,)
    np.testing.assert_allclose(cropped, tone(1.0, 22050), atol=1 / 32768 + 1e-6)


def test_unsigned_8bit_pcm_is_centred_and_scaled(bad_media):
    # pcm_u8 stores silence as 128: read raw it would be a 0..255 signal, loud but meaningless.
    audio = load_audio(str(bad_media["pcm_u8_avi"]), AudioSpec(seconds=CLIP_SECONDS))
    np.testing.assert_allclose(audio, tone(CLIP_SECONDS, 22050), atol=1 / 128 + 1e-3)


def test_non_utf8_tags_do_not_make_a_good_clip_unreadable(bad_media):
    data = bad_media["latin1_tag_mp4"].read_bytes()
    assert b"caf\xe9\xe9" in data
    samples, rate = decode_audio(data, "latin1_tag.mp4")
    assert rate == 44100 and abs(len(samples) / rate - CLIP_SECONDS) < 0.05


def test_the_extension_does_not_have_to_be_right(bad_media):
    # An mp4 named .wav: soundfile refuses it, PyAV reads it. A WAV named .mp4: PyAV reads it.
    mp4_as_wav, rate = decode_audio(bad_media["good_mp4"].read_bytes(), "clip.wav")
    assert rate == 44100 and abs(dominant_hz(head(mp4_as_wav, rate), rate) - TONE_HZ) < 5
    wav_as_mp4, rate = decode_audio(bad_media["good_wav"].read_bytes(), "clip.mp4")
    assert rate == 22050
    np.testing.assert_allclose(wav_as_mp4, tone(CLIP_SECONDS, 22050), atol=1 / 32768 + 1e-6)


# ---------------------------------------------------------------- bad audio

BAD_REASONS = {
    "corrupt_mp4": "not a readable media file",
    "corrupt_wav": "not a readable media file",
    "zero_byte_mp4": "empty file",
    "truncated_moov_mp4": "not a readable media file",
    "truncated_2pct_mp4": "not a readable media file",
    "truncated_faststart_mp4": "truncated media",
    "no_audio_mp4": "no audio stream",
    "silent_mp4": "silent",
    "quiet_80db_mp4": "silent",
    "too_short_mp4": "too short",
    "nan_wav": "NaN",
}


def assert_one_line(reason: str) -> None:
    assert reason and "\n" not in reason and "\r" not in reason and len(reason) < 300
    assert reason.isprintable(), reason


def test_every_bad_file_has_an_expected_reason():
    assert set(BAD_REASONS) == set(BAD_AUDIO)


@pytest.mark.parametrize("name", BAD_AUDIO)
def test_bad_audio_is_a_clip_error_with_a_one_line_reason(bad_media, name):
    # pytest.raises(ClipError) lets any other exception type through, which fails the test.
    with pytest.raises(ClipError) as err:
        load_audio(str(bad_media[name]), AudioSpec())
    reason = str(err.value)
    assert BAD_REASONS[name] in reason
    assert_one_line(reason)
    assert "Errno" not in reason and "<none>" not in reason  # FFmpeg's words, not its error codes


def test_bad_reasons_say_how_bad(bad_media):
    reasons = {}
    for name in ("silent_mp4", "quiet_80db_mp4", "too_short_mp4"):
        with pytest.raises(ClipError) as err:
            load_audio(str(bad_media[name]), AudioSpec())
        reasons[name] = str(err.value)
    assert reasons["silent_mp4"] == "silent audio (peak -inf dBFS < -60 dBFS)"
    assert reasons["quiet_80db_mp4"] in ("silent audio (peak -79 dBFS < -60 dBFS)", "silent audio (peak -80 dBFS < -60 dBFS)")
    assert reasons["too_short_mp4"].startswith("audio too short: 0.0") and reasons["too_short_mp4"].endswith(" s < 0.1 s")


def test_a_truncated_file_decodes_up_to_the_damage_then_says_truncated(bad_media):
    # The fast-start copy keeps its index: ~0.6 s of the 3 s decode, then the bytes run out. The
    # damage lies inside the 4 s the clip needs: "truncated", not a short clip padded with zeros.
    with pytest.raises(ClipError, match=r"^truncated media: audio breaks off after 0\.[3-9]\d s"):
        decode_audio(bad_media["truncated_faststart_mp4"].read_bytes(), "x.mp4", seconds=4.0)
    # When the clip needs less than what survived, the surviving part is used.
    samples, rate = decode_audio(bad_media["truncated_faststart_mp4"].read_bytes(), "x.mp4", seconds=0.25)
    assert len(samples) == int(0.25 * rate) and abs(dominant_hz(samples, rate) - TONE_HZ) < 10


def test_short_clips_are_padded_by_default(bad_media, tmp_path):
    import soundfile

    path = tmp_path / "blip.wav"
    soundfile.write(path, tone(0.3, 22050), 22050, subtype="PCM_16")  # a UI sound: 0.3 s
    spec = AudioSpec()
    audio = load_audio(str(path), spec)
    assert spec.min_seconds == 0.1 and audio.shape == (spec.n_samples,)
    assert np.abs(audio[: int(0.25 * 22050)]).max() > 0.4 and not np.any(audio[int(0.31 * 22050):])


def test_quiet_but_audible_is_not_silent():
    rate = 22050
    audio = prepare_audio(tone(2.0, rate, amp=10 ** (-50 / 20)), rate, AudioSpec())  # -50 dBFS
    assert audio.shape == (88200,)
    with pytest.raises(ClipError, match="silent"):
        prepare_audio(tone(2.0, rate, amp=10 ** (-50 / 20)), rate, AudioSpec(silence_dbfs=-40.0))


@pytest.mark.parametrize(
    "samples,rate,reason",
    [
        (np.zeros(0, np.float32), 22050, "too short: 0.00 s"),
        (np.full(44100, np.inf, np.float32), 22050, "NaN or Inf"),
        (tone(2.0, 22050), 0, "no sample rate"),
    ],
    ids=["empty", "inf", "rate 0"],
)
def test_prepare_audio_refuses_degenerate_input(samples, rate, reason):
    with pytest.raises(ClipError, match=reason):
        prepare_audio(samples, rate, AudioSpec())


def test_missing_and_unreadable_uris(tmp_path):
    with pytest.raises(ClipError, match="^media file not found$"):
        load_audio(str(tmp_path / "nope.wav"), AudioSpec())
    deep = tmp_path / ("d" * 200) / ("e" * 200)  # the OS error names this >400-char path
    deep.mkdir(parents=True)
    with pytest.raises(ClipError, match="^cannot read media file: .*Is a directory") as err:
        read_bytes(str(deep))
    assert_one_line(str(err.value))


# ---------------------------------------------------------------- frames


def test_frames_shape_and_dtype(bad_media):
    frames = load_frames(str(bad_media["good_mp4"]), FrameSpec())  # 8 fps, 64 px, 4 s from a 3 s clip
    assert frames.shape == (32, 64, 64, 3) and frames.dtype == np.uint8


@pytest.mark.parametrize("fps,expected_frames", [(8, list(range(24))), (4, [2 * k + 1 for k in range(12)])])
def test_fps_subsampling_picks_the_frame_shown_mid_interval(bad_media, fps, expected_frames):
    # Source frame i of ramp_video is uniformly grey at 10*i (8 fps). At 4 fps output frame k is
    # the source frame shown at (k + 0.5) / 4 s, i.e. frame 2k + 1.
    frames = load_frames(str(bad_media["ramp_video_mp4"]), FrameSpec(fps=fps, size=64, seconds=3.0))
    assert frames.shape == (len(expected_frames), 64, 64, 3)
    brightness = frames.reshape(len(frames), -1).astype(float).mean(axis=1)
    np.testing.assert_allclose(brightness, 10.0 * np.array(expected_frames), atol=3)


def test_frames_past_the_end_repeat_the_last_frame(bad_media):
    frames = load_frames(str(bad_media["ramp_video_mp4"]), FrameSpec(fps=8, size=64, seconds=4.0))  # 26 frames
    brightness = frames.reshape(len(frames), -1).astype(float).mean(axis=1)
    np.testing.assert_allclose(brightness[25:], 250.0, atol=3)


@pytest.mark.parametrize("size", [64, 32])
def test_resize_and_centre_crop_keep_the_centre(bad_media, size):
    # 96x64 source: green centre square (columns 16-79) between two red strips of 16 columns.
    frames = load_frames(str(bad_media["wide_video_mp4"]), FrameSpec(size=size))
    assert frames.shape == (32, size, size, 3)
    red, green = frames[..., 0].astype(int), frames[..., 1].astype(int)
    inner = (slice(None), slice(None), slice(1, size - 1))
    assert red[inner].max() < 10 and green[inner].min() > 180
    # The crop is centred: whatever red the resampling filter lets in is the same on both sides.
    assert abs(red[:, :, 0].mean() - red[:, :, -1].mean()) < 2 and red[:, :, 0].mean() < 40


@pytest.mark.parametrize("name", ["audio_only_m4a", "good_wav", "good_flac"])
def test_no_video_stream(bad_media, name):
    with pytest.raises(ClipError, match="^no video stream$"):
        load_frames(str(bad_media[name]), FrameSpec())


@pytest.mark.parametrize(
    "name,reason",
    [
        ("corrupt_mp4", "cannot decode video"),
        ("truncated_moov_mp4", "cannot decode video"),
        ("truncated_2pct_mp4", "cannot decode video"),
        ("truncated_faststart_mp4", "cannot decode video"),
        ("zero_byte_mp4", "empty file"),
    ],
)
def test_bad_video_is_a_clip_error(bad_media, name, reason):
    with pytest.raises(ClipError) as err:
        load_frames(str(bad_media[name]), FrameSpec())
    assert str(err.value).startswith(reason)
    assert_one_line(str(err.value))
    assert not str(err.value).startswith("cannot decode video: [")  # no decord time stamp


def test_decode_frames_of_garbage_bytes():
    with pytest.raises(ClipError, match="cannot decode video"):
        decode_frames(b"\x00" * 1000, FrameSpec())


# ---------------------------------------------------------------- end to end: one shard


def _mel_job(store, clips, shard="s000000-corpus"):
    from stages.features.mel import MEL_CODE_VERSION, MEL_FEATURE, MelParams
    from stages.features.base import ShardJob

    params = MelParams()
    return ShardJob(
        store_root=store.url_root, storage_options={}, dataset="corpus", feature=MEL_FEATURE, key=params.key(),
        shard=shard, clips=tuple(clips), params=params.params(), code_version=MEL_CODE_VERSION,
    )


def _check_good_rows(table, good_ids):
    from stages.features.spectral import get_preset

    preset = get_preset("hifigan22k")
    assert table.clip_ids == good_ids
    mel = table.arrays["mel"]
    assert mel.shape == (len(good_ids), preset.n_mels, preset.n_frames(4.0)) and mel.dtype == np.float16
    assert np.all(np.isfinite(mel))
    # Every good clip is a 440 Hz tone: the loudest mel band over the first 2.5 s is the same one.
    loudest = mel[:, :, : int(2.5 * 22050 / 256)].astype(np.float32).mean(axis=2).argmax(axis=1)
    assert len(set(loudest.tolist())) == 1


def test_a_shard_of_good_and_bad_clips_quarantines_the_bad_ones(bad_media, tmp_path):
    from stages.features.mel import MEL_FEATURE, compute_mel_shard
    from stages.core.store import FeatureStore

    store = FeatureStore(str(tmp_path / "store"))
    names = sorted(GOOD_AUDIO + BAD_AUDIO)
    job = _mel_job(store, [(name, str(bad_media[name]), f"hash-{name}") for name in names])
    result = compute_mel_shard(job)

    good = [n for n in names if n in GOOD_AUDIO]
    assert result.rows == len(good)
    manifest = store.shard_manifest("corpus", MEL_FEATURE, job.key, job.shard)
    assert manifest["rows"] == len(good) and manifest["clip_ids"] == good
    assert [c["id"] for c in manifest["clips"]] == names  # the shard's inputs, good and bad
    quarantined = {q["id"]: q["reason"] for q in manifest["quarantined"]}
    assert quarantined == {q["id"]: q["reason"] for q in result.quarantined}
    assert set(quarantined) == set(BAD_AUDIO)
    for name, reason in quarantined.items():
        assert BAD_REASONS[name] in reason
        assert_one_line(reason)
    _check_good_rows(store.read_arrays("corpus", MEL_FEATURE, job.key), good)


def test_manifest_to_shard_end_to_end(bad_media, bad_media_jsonl, tmp_path):
    """JSONL -> clip manifest (unreadable files quarantined there) -> shard jobs -> mel shard."""
    from stages.features.mel import MEL_FEATURE, MelParams, compute_mel_shard
    from stages.features.base import shard_jobs
    from stages.ingest.manifest import build_manifest
    from stages.ingest.sources import SourceConfig, read_source
    from stages.core.store import FeatureStore

    listing = read_source(SourceConfig(kind="jsonl", path=str(bad_media_jsonl)))
    assert listing.rejected == []
    assert {c.id for c in listing.clips} == set(bad_media)
    manifest, delta = build_manifest("corpus", listing, None, shard_size=100)
    # The clip manifest hashes every file: the empty one cannot even be hashed.
    assert [(q["id"], q["reason"]) for q in manifest.quarantined] == [("zero_byte_mp4", "empty file (0 bytes)")]
    assert sorted(delta.added) == sorted(set(bad_media) - {"zero_byte_mp4"})

    store = FeatureStore(str(tmp_path / "store"))
    params = MelParams()
    jobs, reused = shard_jobs(store, manifest, MEL_FEATURE, params.key(), params.params(), "1")
    assert len(jobs) == 1 and reused == []
    result = compute_mel_shard(jobs[0])
    good = sorted(GOOD_AUDIO)
    assert result.rows == len(good)
    committed = store.shard_manifest("corpus", MEL_FEATURE, params.key(), jobs[0].shard)
    quarantined = {q["id"]: q["reason"] for q in committed["quarantined"]}
    assert set(quarantined) == set(BAD_AUDIO) - {"zero_byte_mp4"}
    for name, reason in quarantined.items():
        assert BAD_REASONS[name] in reason
    json.dumps(committed)  # plain JSON all the way down
    _check_good_rows(store.read_arrays("corpus", MEL_FEATURE, params.key()), good)

    # Nothing new: the committed shard is reused, not recomputed.
    jobs, reused = shard_jobs(store, manifest, MEL_FEATURE, params.key(), params.params(), "1")
    assert jobs == [] and reused == [committed["shard"]]
