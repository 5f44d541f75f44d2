"""Audio data: manifests, decoding, the skipping dataset, bucketed batching and collation."""

from speechvq.data.audio import AudioInfo, RawFormat, audio_info, load_audio
from speechvq.data.collate import AudioBatch, collate_audio
from speechvq.data.dataset import AudioDataset
from speechvq.data.manifest import Manifest, ManifestItem, read_labels, read_manifest, write_manifest
from speechvq.data.sampler import BucketBatchSampler

__all__ = [
    "AudioBatch",
    "AudioDataset",
    "AudioInfo",
    "BucketBatchSampler",
    "Manifest",
    "ManifestItem",
    "RawFormat",
    "audio_info",
    "collate_audio",
    "load_audio",
    "read_labels",
    "read_manifest",
    "write_manifest",
]
