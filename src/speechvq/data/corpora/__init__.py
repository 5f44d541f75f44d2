"""Importers: other toolkits' corpus layouts -> fairseq manifests, labels and speaker lists.

Each reader turns a corpus description into :class:`~speechvq.data.corpora.common.CorpusUtterance`
records; :func:`~speechvq.data.corpora.common.write_corpus` writes them (``speechvq import``).
"""

from speechvq.data.corpora.common import CorpusUtterance, write_corpus
from speechvq.data.corpora.kaldi import read_kaldi_dir
from speechvq.data.corpora.lhotse import read_lhotse
from speechvq.data.corpora.tables import read_commonvoice, read_ljspeech, read_speechbrain

READERS = {
    "kaldi": read_kaldi_dir,
    "lhotse": read_lhotse,
    "ljspeech": read_ljspeech,
    "speechbrain": read_speechbrain,
    "commonvoice": read_commonvoice,
}
"""Format name (``speechvq import FORMAT``) -> reader."""

__all__ = [
    "READERS",
    "CorpusUtterance",
    "read_commonvoice",
    "read_kaldi_dir",
    "read_lhotse",
    "read_ljspeech",
    "read_speechbrain",
    "write_corpus",
]
