"""Discrete units: export, k-means, unit quality, and BERT over units (vq-wav2vec pipeline)."""

from speechvq.units.io import Units, UnitWriter, read_units, run_length_decode, run_length_encode
from speechvq.units.kmeans import KMeansModel, fit_kmeans
from speechvq.units.quality import JointCounts, UnitQuality, unit_quality

__all__ = [
    "JointCounts",
    "KMeansModel",
    "UnitQuality",
    "UnitWriter",
    "Units",
    "fit_kmeans",
    "read_units",
    "run_length_decode",
    "run_length_encode",
    "unit_quality",
]
