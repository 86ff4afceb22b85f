"""Evaluation metrics: the one place for them. Plain numpy functions over arrays (no dagster), and
for the streaming case metric objects with ``update(...)`` / ``compute()`` / ``reset()``.

Shapes: N items, d feature width, B a batch; "[..., d]" means leading axes are flattened into rows
(per-second or per-frame embeddings [N, S, d] count as N * S rows). Event times are 1-D arrays of
seconds.

Feature distributions (``distribution``), generated vs reference, any tower (audio, frame, video):
    frechet_distance(mu1, S1, mu2, S2)         FD formula on two Gaussians (mu [d], S [d, d])
    gaussian_fit(x [N >= 2, d])                mean [d] and unbiased covariance [d, d]
    frechet_distance_of(gen, ref [..., d])     FD / FAD / FVD: FD of the Gaussian fits of two feature sets
    kernel_distance(gen, ref [..., d], subsets=None, subset_size=1000, seed=0)
                                               KID / KVD: unbiased MMD^2, kernel (x.y / d + 1)^3; all rows,
                                               or the mean over seeded random subsets
    kernel_distance_subsets(...)               the per-subset values [subsets] (their std is KID's +-)
    mmd2_unbiased(x [M, d], y [N, d]), polynomial_kernel(x, y)   the pieces of the above
    bootstrap_interval(metric, *samples, paired=True, resamples=1000, confidence=0.95, seed=0)
                                               seeded percentile CI (value, low, high, confidence) of any
                                               metric: paired rows resampled together, or each set alone
    objects: FrechetDistance(), KernelDistance(...)   update(generated=[B, ..., d], reference=[B, ..., d])

Class posteriors and aiSFX audio embeddings (``audio``; Table I / II's IS, KL, FD, FAD):
    softmax(logits [..., C]), kl_divergence(p, q [..., C]) -> [...]   row-wise KL(p || q)
    paired_kl(ref_logits, gen_logits [N, C])   mean KL(softmax(ref) || softmax(gen)) over paired clips
    inception_score(logits [N, C]), inception_score_from_probs(probs [N, C])   exp E[KL(p(y|x) || p(y))]
    to_aisfx_rate(audio [B, L], rate), aisfx_outputs(tower, audio [B, L], rate, seconds)
                                               waveforms -> aiSFX pooled [B, 512], per_second [B, S, 512],
                                               logits [B, 69]
    generation_metrics(gen, ref)               IS, KL, FAD, FD (aiSFX) of two aisfx_outputs dicts

Cross-modal retrieval (``retrieval``; query i's match is gallery item i):
    match_ranks(similarity [N, N])             1-based rank of the diagonal in each row (ties count against)
    retrieval_metrics(query, gallery [N, d], ks=(1, 5, 10), relevant=None)   R@k (%), mean / median rank, n
                                               (dot product); ``relevant`` [Q, G] bool: hit on any marked item
    relevant_ranks(similarity [Q, G], relevant [Q, G])   rank of the best relevant item (ties count against)
    owner_relevance(query_owner [Q], gallery_owner [G])  same clip (several captions per clip)
    normalize(x [..., d])                      L2-normalised rows (float32)
    object: RetrievalRecall(ks, normalize=False)   update(query [B, d], gallery [B, d]) of row-paired batches

Duplicates (``duplicates``; a shared caption or a byte-identical copy is not a retrieval miss):
    find_duplicates(clips, metadata=None) -> Duplicates(media groups, shared texts)   .summary(), .markdown()
    clip_texts(clip)                           all captions, else caption, else label (whitespace-normalised)
    relevance(query_owner, gallery_owner, content_hashes, query_texts, gallery_texts) -> (paired, aware)

Rhythm (``rhythm``; CMMD's beat / onset hit rate, windows CMMD_TOLERANCES = (0.1, 0.5) s):
    hit_rate(reference_times, estimated_times, tolerance)   share of reference events with an estimated
                                               event within +-tolerance s (NaN if no reference events)
    hit_counts(...), coverage(reference_times, estimated_times), mean_hit_rate(pairs, tolerance, average)
    beat_times(wave [L], rate), onset_times(wave [L], rate)   librosa event times (s)
    beat_hit_rate(gen [L], ref [L], rate, tolerance), onset_hit_rate(...)   the two chained
    object: HitRate(tolerance=0.1, average="macro")   update(reference_times, estimated_times) per clip

Audio-visual alignment (``alignment``; Diff-Foley's Acc; needs torch, so loaded on first use):
    AlignmentPairs(motion [N, T], onsets [N, T], video_per_second, audio_per_second [N, S, d]),
    AlignmentConfig, train_alignment(pairs, config) -> classifier (models.alignment),
    alignment_accuracy(model, pairs) (%), classifier_accuracy(model, pairs) (%), aligned_probability,
    negatives, motion_envelope(frames [T, H, W, C]), onset_envelope(wave, rate, fps, frames), onset_envelopes

Adding a metric:
    1. a function over numpy arrays in the module it belongs to (or a new module here), with its
       formula, input shapes and edge cases (empty / degenerate input) in the docstring;
    2. optionally a streaming object: subclass ``Metric`` (``stages.evaluation.base``), accumulate in
       ``update`` (``FeatureBuffer`` for feature rows), call the function in ``compute``, restore
       the state in ``reset`` (calling ``super().reset()``);
    3. export it here and list it above;
    4. a test in tests/stages/evaluation/ against values computed by hand on tiny arrays, and one
       that the object after several updates equals the function on the concatenated inputs.
"""

from __future__ import annotations

from stages.evaluation.audio import (
    aisfx_outputs,
    generation_metrics,
    inception_score,
    inception_score_from_probs,
    kl_divergence,
    paired_kl,
    softmax,
    to_aisfx_rate,
)
from stages.evaluation.base import FeatureBuffer, Metric
from stages.evaluation.distribution import (
    ConfidenceInterval,
    FrechetDistance,
    KernelDistance,
    bootstrap_interval,
    frechet_distance,
    frechet_distance_of,
    gaussian_fit,
    kernel_distance,
    kernel_distance_subsets,
    mmd2_unbiased,
    polynomial_kernel,
)
from stages.evaluation.duplicates import Duplicates, clip_texts, find_duplicates, relevance
from stages.evaluation.retrieval import (
    RetrievalRecall,
    match_ranks,
    normalize,
    owner_relevance,
    relevant_ranks,
    retrieval_metrics,
)
from stages.evaluation.rhythm import (
    CMMD_TOLERANCES,
    HitRate,
    beat_hit_rate,
    beat_times,
    coverage,
    hit_counts,
    hit_rate,
    mean_hit_rate,
    onset_hit_rate,
    onset_times,
)

# torch-backed: imported from stages.evaluation.alignment on first access, so that the numpy
# metrics above import without torch.
_ALIGNMENT = (
    "AlignmentConfig",
    "AlignmentPairs",
    "aligned_probability",
    "alignment_accuracy",
    "classifier_accuracy",
    "motion_envelope",
    "negatives",
    "onset_envelope",
    "onset_envelopes",
    "train_alignment",
)

__all__ = [
    # base
    "Metric", "FeatureBuffer",
    # distribution
    "gaussian_fit", "frechet_distance", "frechet_distance_of", "FrechetDistance",
    "polynomial_kernel", "mmd2_unbiased", "kernel_distance", "kernel_distance_subsets", "KernelDistance",
    "ConfidenceInterval", "bootstrap_interval",
    # audio
    "softmax", "kl_divergence", "paired_kl", "inception_score", "inception_score_from_probs",
    "to_aisfx_rate", "aisfx_outputs", "generation_metrics",
    # retrieval
    "match_ranks", "relevant_ranks", "owner_relevance", "retrieval_metrics", "normalize", "RetrievalRecall",
    # duplicates
    "Duplicates", "clip_texts", "find_duplicates", "relevance",
    # rhythm
    "CMMD_TOLERANCES", "hit_counts", "hit_rate", "coverage", "mean_hit_rate", "HitRate",
    "beat_times", "onset_times", "beat_hit_rate", "onset_hit_rate",
    # alignment (lazy, the names of _ALIGNMENT)
    "AlignmentConfig", "AlignmentPairs", "aligned_probability", "alignment_accuracy", "classifier_accuracy",
    "motion_envelope", "negatives", "onset_envelope", "onset_envelopes", "train_alignment",
]


def __getattr__(name: str):
    if name in _ALIGNMENT:
        from stages.evaluation import alignment

        return getattr(alignment, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ALIGNMENT))
