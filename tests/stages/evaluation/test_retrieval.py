"""Retrieval ranks and recall against a hand-made similarity matrix; the streaming RetrievalRecall."""

import numpy as np
import pytest

from stages.evaluation import retrieval

# rows are queries, columns gallery items, the diagonal the true matches
SIMILARITY = np.array([
    [0.9, 0.1, 0.0],  # diagonal highest: rank 1
    [0.8, 0.5, 0.7],  # 0.8 and 0.7 above 0.5: rank 3
    [0.2, 0.6, 0.4],  # 0.6 above 0.4: rank 2
])


def test_match_ranks_of_a_hand_made_similarity_matrix():
    assert retrieval.match_ranks(SIMILARITY).tolist() == [1, 3, 2]
    # a tie with the true match counts against it
    assert retrieval.match_ranks(np.array([[0.5, 0.5], [0.0, 1.0]])).tolist() == [2, 1]


def test_retrieval_metrics_of_a_hand_made_similarity_matrix():
    # query = identity, gallery = S^T: query @ gallery.T = S
    metrics = retrieval.retrieval_metrics(np.eye(3), SIMILARITY.T, ks=(1, 2, 5))
    assert metrics == pytest.approx({"R@1": 100 / 3, "R@2": 200 / 3, "R@5": 100.0, "mean_rank": 2.0, "median_rank": 2.0, "n": 3})
    with pytest.raises(ValueError, match="as many queries"):
        retrieval.retrieval_metrics(np.eye(3), np.eye(2))


def test_retrieval_recall_object_equals_the_function_after_several_updates():
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(12, 4))
    query = gallery + 0.8 * rng.normal(size=gallery.shape)
    metric = retrieval.RetrievalRecall(ks=(1, 5))
    for rows in (slice(0, 5), slice(5, 6), slice(6, 12)):
        metric.update(query[rows], gallery[rows])
    expected = retrieval.retrieval_metrics(query, gallery, ks=(1, 5))
    assert metric.compute() == expected
    assert 0 < expected["R@1"] < 100  # not a trivial case

    normalised = retrieval.RetrievalRecall(ks=(1, 5), normalize=True)
    normalised.update(query, gallery)
    assert normalised.compute() == retrieval.retrieval_metrics(retrieval.normalize(query), retrieval.normalize(gallery), ks=(1, 5))

    metric.reset()
    metric.update(np.eye(3), SIMILARITY.T)
    assert metric.compute()["R@1"] == pytest.approx(100 / 3) and metric.updates == 1
    with pytest.raises(ValueError, match="per update"):
        metric.update(np.eye(3), np.eye(3)[:2])
