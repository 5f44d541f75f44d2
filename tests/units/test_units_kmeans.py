from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from speechvq.errors import UserInputError
from speechvq.units.kmeans import (
    FeatureShardWriter,
    KMeansModel,
    fit_kmeans,
    iter_shard_utterances,
    sample_rows,
)


def _blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10.0, size=(5, 8)).astype(np.float32)
    labels = rng.integers(0, 5, size=1000)
    rows = centres[labels] + rng.normal(scale=0.3, size=(1000, 8)).astype(np.float32)
    return rows, labels, centres


def test_fit_kmeans_recovers_known_clusters() -> None:
    rows, labels, centres = _blobs()
    km = fit_kmeans(rows, 5, seed=0, n_init=3, max_iter=10)
    pred = km.predict(rows).numpy()
    # same partition up to renaming: each true cluster maps to exactly one predicted cluster
    pairs = set(zip(labels.tolist(), pred.tolist()))
    assert len(pairs) == 5
    # and the centroids match the true centres
    dist = np.linalg.norm(km.centroids[:, None, :] - centres[None], axis=-1)
    assert dist.min(axis=1).max() < 0.2


def test_kmeans_model_saves_without_pickle_and_loads_back(tmp_path: Path) -> None:
    rows, _, _ = _blobs()
    km = fit_kmeans(rows, 5, seed=0, n_init=1, max_iter=5)
    km.meta["layer"] = 3
    km.save(tmp_path / "km")
    assert sorted(p.name for p in (tmp_path / "km").iterdir()) == ["centroids.npy", "kmeans.json"]
    back = KMeansModel.load(tmp_path / "km")
    np.testing.assert_array_equal(back.centroids, km.centroids)
    assert back.meta["layer"] == 3 and back.k == 5
    assert np.array_equal(back.predict(rows).numpy(), km.predict(rows).numpy())


def test_kmeans_predict_is_the_nearest_centroid() -> None:
    km = KMeansModel(centroids=np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=np.float32), meta={})
    x = np.array([[1.0, 1.0], [9.0, -1.0], [-1.0, 8.0], [6.0, 5.0]], dtype=np.float32)
    assert km.predict(x, chunk=3).tolist() == [0, 1, 2, 1]


def test_kmeans_load_raises_for_a_missing_model(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="not a k-means model"):
        KMeansModel.load(tmp_path)


def test_fit_kmeans_raises_with_fewer_rows_than_clusters() -> None:
    with pytest.raises(UserInputError, match="at least k=10"):
        fit_kmeans(np.zeros((5, 2), dtype=np.float32), 10)


def test_shard_writer_bounds_rows_held_and_keeps_utterances(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    utts = [rng.normal(size=(n, 4)).astype(np.float32) for n in (7, 3, 12, 5, 1, 9, 4, 6)]
    writer = FeatureShardWriter(tmp_path, shard_size=10)
    for u in utts:
        writer.add(u)
    writer.close()
    total = sum(len(u) for u in utts)
    assert writer.num_rows == total > writer.shard_size
    assert writer.max_rows_held <= max(writer.shard_size, max(len(u) for u in utts))
    assert writer.num_shards >= total // 12
    back = list(iter_shard_utterances(tmp_path))
    assert len(back) == len(utts) and all(np.array_equal(a, b) for a, b in zip(back, utts))


def test_sample_rows_draws_about_percent(tmp_path: Path) -> None:
    writer = FeatureShardWriter(tmp_path, shard_size=500)
    for _ in range(20):
        writer.add(np.ones((100, 2), dtype=np.float32))
    writer.close()
    assert len(sample_rows(tmp_path, 100)) == 2000
    assert 150 <= len(sample_rows(tmp_path, 10, seed=1)) <= 250
    with pytest.raises(ValueError, match="percent"):
        sample_rows(tmp_path, 0)
