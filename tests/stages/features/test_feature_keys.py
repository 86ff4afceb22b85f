"""The demo's feature and checkpoint keys at the default config, pinned.

These keys name every cached shard and checkpoint in existing stores. A refactor that changes one
of them silently invalidates users' caches: a key may change only when the numbers change, and
then on purpose (bump the code version or change a default, say so in the change's note). The values
were computed at commit a704554 (before the house refactor); the clip floor change re-keyed some (below).
"""

from stages.core.store import feature_key

PINNED = {
    # Re-keyed on purpose (issue 13): the clip floor ClipLength.min_seconds went from 1.0 to 0.1 s, so
    # every mel- and audio-tower-dependent key moved; at min_seconds=1.0 the old keys come back (below).
    "mel_spectrograms": "1ede3762acb5f644",  # was 101adc40b7c2c901
    # Re-keyed on purpose (issue 15): the default audio image went from 64 x 64 to the mel's own
    # 80 x 352 ("mel80"); size=64 / shape="frame64" still give 001052448d0610a4 (below).
    "audio_images": "2df2a0fd0a8ff441",  # was 001052448d0610a4, before that af10ae07de3552e5
    "video_frames": "cfde3d0e85c8e5fb",
    "audio_tower": "b8649d3bb2d8df4c",  # was deb932265682b67b
    "frame_tower": "6c404cdd971fc6ae",
    "text_tower": "46bb203abb0bd5d4",
    "clap_head": "d9619db66548737a",  # was 080b3c194afd239c
    "cavp_head": "206f66d7db272f09",  # was 709410e843f43023
    "clap_embeddings": "82810d17f0fb66fb",  # was 15f268e1d785ab68
    "cavp_embeddings": "a3d446b740271772",  # was b5d949740f5830a5
    "diffgap_clap lineage": "43055a79c21d3d92",  # was d1e27e5d2a0197f5
    "diffgap_cavp lineage": "bc1f08c537508d35",  # was 98c9b9b17d348831
}
# The keys before ClipLength, which a store made with min_seconds=1.0 still holds.
PINNED_AT_ONE_SECOND_FLOOR = {"mel_spectrograms": "101adc40b7c2c901", "audio_tower": "deb932265682b67b"}
# Square audio images before named shapes (computed with stages/features/mel.py at 27a1c61, the
# commit before them): the 64 px default and the README's size 128.
SQUARE_AUDIO_IMAGES = {64: "001052448d0610a4", 128: "d913359eca34d73a"}


def demo_keys() -> dict[str, str]:
    """The keys the default run config gives, computed the way the assets compute them."""
    from stages.diffgap.train import lineage_key
    from stages.embeddings import heads
    from stages.features.frames import FrameParams
    from stages.features.mel import AudioImageParams, MelParams
    from stages.features.towers import AudioTowerParams, FrameTowerParams, TextTowerParams
    from tests.fixtures.tiny import default_config

    keys = {"mel_spectrograms": MelParams().key()}
    keys["audio_images"] = AudioImageParams().key(keys["mel_spectrograms"])
    keys["video_frames"] = FrameParams().key()
    keys["audio_tower"], keys["frame_tower"], keys["text_tower"] = (
        AudioTowerParams().key(), FrameTowerParams().key(), TextTowerParams().key())
    head = default_config("clap_head")
    revision = head.pop("revision")
    assert head.pop("source_dataset") == ""  # the default: the dataset's own space (keys as before)
    train = heads.HeadTrainConfig(**head)
    towers = {"clap_head": ("audio_tower", "text_tower"), "cavp_head": ("audio_tower", "frame_tower")}
    for kind, space, feature in (("clap_head", "clap", "clap_embeddings"), ("cavp_head", "cavp", "cavp_embeddings")):
        tower_keys = {name: keys[name] for name in towers[kind]}
        keys[kind] = feature_key(kind, {**train.params(), "revision": revision}, heads.HEAD_CODE_VERSION,
                                 sorted(tower_keys.values()))
        keys[feature] = feature_key(feature, {"head": kind, "head_key": keys[kind], "tower_keys": tower_keys},
                                    heads.EMBEDDING_CODE_VERSION, (keys[kind], *sorted(tower_keys.values())))
        from stages.diffgap.train import DiffgapTrainConfig

        keys[f"diffgap_{space} lineage"] = lineage_key(space, DiffgapTrainConfig(**default_config(f"diffgap_{space}")),
                                                       keys[feature])
    return keys


def test_the_demo_keys_are_the_ones_existing_stores_hold():
    assert demo_keys() == PINNED


def test_the_clip_length_refactor_changed_keys_only_through_the_new_floor():
    from stages.features.frames import FrameParams
    from stages.features.mel import MelParams
    from stages.features.towers import AudioTowerParams, FrameTowerParams

    assert MelParams(min_seconds=1.0).key() == PINNED_AT_ONE_SECOND_FLOOR["mel_spectrograms"]
    assert AudioTowerParams(min_seconds=1.0).key() == PINNED_AT_ONE_SECOND_FLOOR["audio_tower"]
    # crop="start" was the only behaviour before: it stays out of the key; "centre" is a new key.
    for params in (MelParams(), AudioTowerParams(), FrameParams(), FrameTowerParams()):
        assert "crop" not in params.params() and type(params)(crop="centre").key() != params.key()


def test_square_audio_images_keep_their_keys_however_they_are_named():
    from assets.features import AudioImageConfig, _image_params
    from stages.features.mel import AudioImageParams, MelParams

    mel_key = MelParams().key()
    for size, key in SQUARE_AUDIO_IMAGES.items():
        assert AudioImageParams(size=size).key(mel_key) == key
        assert AudioImageParams(height=size, width=size).key(mel_key) == key
        assert _image_params(AudioImageConfig(size=size), {}).key(mel_key) == key  # an old run config
    assert AudioImageParams(shape="frame64").key(mel_key) == SQUARE_AUDIO_IMAGES[64]
    assert AudioImageParams(shape="square128").key(mel_key) == SQUARE_AUDIO_IMAGES[128]
