"""A pretrained space (heads fitted on another dataset) re-keys the embeddings; a dataset's own
space keeps the key it always had."""

from stages.core.store import feature_key
from stages.embeddings import heads

TOWERS = {"audio_tower": "a" * 16, "text_tower": "t" * 16}


def _key(params: dict) -> str:
    return feature_key(heads.CLAP_FEATURE, params, heads.EMBEDDING_CODE_VERSION, ("h" * 16, *sorted(TOWERS.values())))


def test_own_space_params_are_the_ones_embeddings_were_always_keyed_by():
    assert heads.embedding_params(heads.CLAP_HEAD, "h" * 16, TOWERS) == {
        "head": heads.CLAP_HEAD, "head_key": "h" * 16, "tower_keys": TOWERS}
    assert heads.embedding_params(heads.CLAP_HEAD, "h" * 16, TOWERS, "") == heads.embedding_params(heads.CLAP_HEAD, "h" * 16, TOWERS)


def test_a_space_from_another_dataset_names_that_dataset_in_the_key():
    own = _key(heads.embedding_params(heads.CLAP_HEAD, "h" * 16, TOWERS))
    from_a = _key(heads.embedding_params(heads.CLAP_HEAD, "h" * 16, TOWERS, "speech"))
    from_b = _key(heads.embedding_params(heads.CLAP_HEAD, "h" * 16, TOWERS, "demo"))
    assert len({own, from_a, from_b}) == 3
