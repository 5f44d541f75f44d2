"""The embedded synthetic corpus: espeak-ng speech in LibriSpeech layout with phone alignments.

espeak-ng runs in-process through ctypes, from the shared library and voice data that the
``espeakng-loader`` wheel ships (no system package). Synthesis is synchronous: a callback
collects the 16-bit samples and the synthesizer's events; PHONEME and WORD events carry the sample
position where each phone / word starts, which gives the alignments.

espeak-ng keeps wave-generator state between utterances in static variables that neither
``espeak_Terminate`` nor a seed resets, so one process synthesizes exactly one chapter (a fresh
process per task) and the corpus is byte-identical for a seed however the tasks are scheduled.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from speechvq import progress
from speechvq.data import synth_words as W
from speechvq.errors import UserInputError

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
BASE_VOICES = ("en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-gbclan")
# espeak-ng voice variants that sound like a (synthetic) human voice; novelty ones are left out.
VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "klatt4", "adam", "Alex", "Andrea", "Andy", "Annie", "anika",
    "antonio", "aunty", "belinda", "benjamin", "caleb", "david", "Denis", "ed", "edward", "Gene",
    "grandma", "grandpa", "Henrique", "Hugo", "ian", "iven", "iven2", "Jacky", "john", "Lee",
    "linda", "marcelo", "Mario", "max", "Michael", "michel", "Mike", "norbert", "pablo", "paul",
    "quincy", "rob", "robert", "sandro", "steph", "steph2", "Storm", "travis", "victor", "zac",
)  # fmt: skip
PAUSES = {"_", "_:", "_!", "_^_", "||", "|"}

# espeak_EVENT_TYPE values
_EV_END_OF_LIST, _EV_WORD, _EV_PHONEME = 0, 1, 7
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INIT_PHONEME_EVENTS, _INIT_DONT_EXIT = 0x0001, 0x8000
_POS_CHARACTER, _CHARS_UTF8 = 1, 1
_PARAM_RATE, _PARAM_PITCH, _PARAM_RANGE, _PARAM_WORDGAP = 1, 3, 4, 7


@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker: an espeak-ng voice, variant and prosody settings."""

    id: int
    """LibriSpeech-style numeric speaker id."""
    voice: str
    """espeak-ng language voice (accent), e.g. ``en-us``."""
    variant: str
    """espeak-ng voice variant (timbre), e.g. ``f3``."""
    pitch: int
    """Base pitch, 0-99."""
    pitch_range: int
    """Pitch range (intonation), 0-99."""
    rate_wpm: int
    """Speaking rate in words per minute."""
    word_gap: int
    """Extra pause between words, in units of 10 ms."""
    split: str = "train"
    """``train``, ``dev`` or ``test`` (speakers never cross splits)."""


@dataclass
class ChapterTask:
    """Everything one worker process needs to synthesize a chapter."""

    speaker: Speaker
    chapter: int
    texts: list[str]
    seeds: list[int]
    out_dir: str
    files: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- text
def make_sentence(rng: random.Random) -> str:
    """One grammatical sentence from the embedded word lists (upper case, no punctuation)."""
    pick = rng.choice
    nouns, adjs = W.words(W.NOUNS), W.words(W.ADJECTIVES)

    def noun_phrase() -> str:
        parts = [pick(W.words(W.DETERMINERS))]
        if rng.random() < 0.6:
            parts.append(pick(adjs))
        parts.append(pick(nouns))
        return " ".join(parts)

    def subject() -> str:
        r = rng.random()
        if r < 0.3:
            return pick(W.words(W.NAMES))
        if r < 0.4:
            return f"{pick(W.words(W.NUMBERS))} {pick(W.words(W.PLURAL_NOUNS))}"
        return noun_phrase()

    r = rng.random()
    if r < 0.45:
        clause = f"{subject()} {pick(W.words(W.VERBS_PAST))} {noun_phrase()}"
    elif r < 0.65:
        clause = f"{subject()} {pick(W.words(W.VERBS_INTRANSITIVE))}"
    elif r < 0.85:
        clause = f"{pick(W.words(W.NAMES))} {pick(W.words(W.VERBS_PRESENT))} {noun_phrase()}"
    else:
        clause = f"{noun_phrase()} WAS {pick(['VERY', 'QUITE', 'ALMOST', 'NOT', 'STILL'])} {pick(adjs)}"
    if rng.random() < 0.5:
        clause += f" {pick(W.words(W.PREPOSITIONS))} {noun_phrase()}"
    if rng.random() < 0.35:
        clause += f" {pick(W.words(W.ADVERBS))}"
    return clause


def make_utterance(rng: random.Random) -> str:
    """One to three sentences joined by conjunctions."""
    n = rng.choice((1, 1, 2, 2, 3))
    parts = [make_sentence(rng)]
    for _ in range(n - 1):
        parts.append(f"{rng.choice(W.words(W.CONJUNCTIONS))} {make_sentence(rng)}")
    return " ".join(parts)


def estimate_seconds(text: str, rate_wpm: int) -> float:
    """Rough duration of ``text`` spoken at ``rate_wpm`` (for planning only)."""
    return 0.91 * (len(text.split()) * 60.0 / rate_wpm + 0.35)  # 0.91: calibrated on 1 h of output


# ---------------------------------------------------------------------------- plan
def make_speakers(
    num_speakers: int, seed: int, dev_fraction: float = 0.1, test_fraction: float = 0.1
) -> list[Speaker]:
    """Distinct speakers with speaker-disjoint split assignment (at least one per split)."""
    if num_speakers < 3:
        raise UserInputError(f"--num-speakers must be >= 3 (one per split), but is {num_speakers} instead")
    rng = random.Random(f"speakers-{seed}")
    combos = [(v, var) for v in BASE_VOICES for var in VARIANTS]
    rng.shuffle(combos)
    n_dev = max(1, round(num_speakers * dev_fraction))
    n_test = max(1, round(num_speakers * test_fraction))
    speakers = []
    for k in range(num_speakers):
        voice, variant = combos[k % len(combos)]
        split = "dev" if k < n_dev else "test" if k < n_dev + n_test else "train"
        speakers.append(
            Speaker(
                id=100 + k,
                voice=voice,
                variant=variant,
                pitch=rng.randint(25, 75),
                pitch_range=rng.randint(30, 80),
                rate_wpm=rng.randint(140, 200),
                word_gap=rng.choice((0, 0, 0, 1, 2)),
                split=split,
            )
        )
    return speakers


def plan_corpus(
    out_dir: Path, hours: float, seed: int, num_speakers: int, utts_per_chapter: int = 25
) -> tuple[list[Speaker], list[ChapterTask]]:
    """Speakers and chapter tasks that add up to about ``hours`` of speech (split 80/10/10 by speaker)."""
    speakers = make_speakers(num_speakers, seed)
    per_speaker = hours * 3600 / num_speakers
    tasks = []
    for spk in speakers:
        rng = random.Random(f"text-{seed}-{spk.id}")
        total, chapter, texts, seeds = 0.0, 0, [], []
        while total < per_speaker:
            text = make_utterance(rng)
            texts.append(text)
            seeds.append(rng.randrange(2**31))
            total += estimate_seconds(text, spk.rate_wpm)
            if len(texts) == utts_per_chapter or total >= per_speaker:
                chapter_dir = out_dir / spk.split / str(spk.id) / str(1000 + chapter)
                tasks.append(ChapterTask(spk, 1000 + chapter, texts, seeds, str(chapter_dir)))
                chapter, texts, seeds = chapter + 1, [], []
    return speakers, tasks


# ---------------------------------------------------------------------------- espeak
class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)


class Espeak:
    """A synchronous espeak-ng synthesizer in this process (one per process)."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError:
            raise UserInputError(
                "synth-corpus needs the espeakng-loader package: pip install 'speechvq[synth]'"
            ) from None
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
            ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        data = espeakng_loader.get_data_path().encode()
        self.rate = self.lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, data, _INIT_PHONEME_EVENTS | _INIT_DONT_EXIT
        )
        if self.rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({self.rate})")
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, int, int, str]] = []
        self._callback = _CALLBACK(self._collect)  # keep a reference: C holds the pointer
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav: Any, num_samples: int, events: Any) -> int:
        if num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        i = 0
        while events[i].type != _EV_END_OF_LIST:
            ev = events[i]
            if ev.type == _EV_PHONEME:
                name = bytes(ev.id.string).split(b"\0")[0].decode("utf-8", "replace")
                self._events.append((ev.type, ev.sample, ev.text_position, ev.length, name))
            elif ev.type == _EV_WORD:
                self._events.append((ev.type, ev.sample, ev.text_position, ev.length, ""))
            i += 1
        return 0

    def set_speaker(self, spk: Speaker) -> None:
        name = f"{spk.voice}+{spk.variant}".encode()
        if self.lib.espeak_SetVoiceByName(name) != 0:
            raise RuntimeError(f"espeak-ng has no voice {name.decode()!r}")
        self.lib.espeak_SetParameter(_PARAM_RATE, spk.rate_wpm, 0)
        self.lib.espeak_SetParameter(_PARAM_PITCH, spk.pitch, 0)
        self.lib.espeak_SetParameter(_PARAM_RANGE, spk.pitch_range, 0)
        self.lib.espeak_SetParameter(_PARAM_WORDGAP, spk.word_gap, 0)

    def synthesize(self, text: str, seed: int) -> tuple[np.ndarray, list[tuple[int, int, int, int, str]]]:
        """(int16 samples at ``self.rate``, events ``(type, sample, text_pos, length, phone)``)."""
        self._chunks, self._events = [], []
        self.lib.espeak_ng_SetRandSeed(seed)
        data = text.encode("utf-8") + b"\0"
        buf = ctypes.create_string_buffer(data)
        err = self.lib.espeak_Synth(buf, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed ({err})")
        self.lib.espeak_Synchronize()
        wav = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return wav, self._events


# ---------------------------------------------------------------------------- alignments
def phone_segments(
    events: list[tuple[int, int, int, int, str]], rate: int, duration_s: float
) -> list[tuple[float, float, str]]:
    """Phone segments ``(start_s, end_s, phone)`` covering ``[0, duration]``; pauses become ``sil``.

    Stress marks (``'`` and ``,``) are stripped from espeak's phoneme mnemonics.
    """
    starts: list[tuple[float, str]] = []
    for etype, sample, _, _, name in events:
        if etype != _EV_PHONEME:
            continue
        phone = "sil" if name in PAUSES or name.startswith("_") else name.replace("'", "").replace(",", "")
        if phone:
            starts.append((min(sample / rate, duration_s), phone))
    if not starts or starts[0][0] > 0:
        starts.insert(0, (0.0, "sil"))
    segments: list[tuple[float, float, str]] = []
    for k, (start, phone) in enumerate(starts):
        end = starts[k + 1][0] if k + 1 < len(starts) else duration_s
        if end <= start:
            continue
        if segments and phone == "sil" and segments[-1][2] == "sil":
            segments[-1] = (segments[-1][0], end, "sil")
        else:
            segments.append((start, end, phone))
    if segments and segments[-1][1] < duration_s:
        s, _, p = segments[-1]
        segments[-1] = (s, duration_s, p)
    return segments


def word_segments(
    events: list[tuple[int, int, int, int, str]], text: str, rate: int, phones: list[tuple[float, float, str]]
) -> list[tuple[float, float, str]]:
    """Word segments ``(start_s, end_s, WORD)``: from a WORD event to the end of its last phone.

    A word ends no later than the next word starts (espeak reports a WORD event slightly before
    the word's first phone).
    """
    data = text.encode("utf-8")
    words = [
        (sample / rate, data[pos - 1 : pos - 1 + n].decode())
        for t, sample, pos, n, _ in events
        if t == _EV_WORD
    ]
    out = []
    for k, (start, word) in enumerate(words):
        limit = words[k + 1][0] if k + 1 < len(words) else float("inf")
        ends = [e for s, e, p in phones if p != "sil" and start <= s < limit]
        end = min(max(ends), limit) if ends else start
        out.append((start, end, word))
    return out


def _format_segments(segments: list[tuple[float, float, str]]) -> str:
    return "".join(f"{s:.4f} {e:.4f} {p}\n" for s, e, p in segments)


# ---------------------------------------------------------------------------- worker
def synthesize_chapter(task: ChapterTask) -> tuple[str, float, list[str]]:
    """Write one chapter (flac + ``.phones`` + ``.words`` per utterance, and ``trans.txt``).

    Runs in a fresh worker process (see the module docstring). Returns (chapter dir, seconds,
    the utterance ids written).
    """
    engine = Espeak()
    engine.set_speaker(task.speaker)
    out = Path(task.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spk, chap = task.speaker.id, task.chapter
    lines, seconds, ids = [], 0.0, []
    for k, (text, seed) in enumerate(zip(task.texts, task.seeds)):
        utt_id = f"{spk}-{chap}-{k:04d}"
        raw, events = engine.synthesize(text, seed)
        wav = soxr.resample(raw.astype(np.float32) / 32768.0, engine.rate, SAMPLE_RATE, quality="HQ")
        wav = np.clip(wav, -1.0, 1.0)
        duration = len(wav) / SAMPLE_RATE
        phones = phone_segments(events, engine.rate, duration)
        sf.write(out / f"{utt_id}.flac", wav, SAMPLE_RATE, subtype="PCM_16", format="FLAC")
        (out / f"{utt_id}.phones").write_text(_format_segments(phones))
        (out / f"{utt_id}.words").write_text(
            _format_segments(word_segments(events, text, engine.rate, phones))
        )
        lines.append(f"{utt_id} {text}\n")
        seconds += duration
        ids.append(utt_id)
    (out / f"{spk}-{chap}.trans.txt").write_text("".join(lines))
    return str(out), seconds, ids


def lm_sentences(count: int, seed: int) -> list[str]:
    """``count`` utterance texts for language-model training: the corpus's grammar and words, from
    a random stream of their own (the corpus's texts are drawn per speaker, so these are other
    sentences, as LibriSpeech's LM text is other books)."""
    rng = random.Random(f"lm-text-{seed}")
    return [make_utterance(rng) for _ in range(count)]


def write_corpus(
    out_dir: Path, *, hours: float, seed: int, num_speakers: int, jobs: int, lm_sentences_count: int = 0
) -> dict:
    """Synthesize the whole corpus with a process pool (one fresh process per chapter); with
    ``lm_sentences_count``, also ``lm_text.txt``: that many sentences for an n-gram LM.

    Returns:
        A summary: seconds of audio per split, utterance and speaker counts.
    """
    import multiprocessing as mp

    if hours <= 0:
        raise UserInputError(f"--hours must be positive, but is {hours} instead")
    out_dir.mkdir(parents=True, exist_ok=True)
    speakers, tasks = plan_corpus(out_dir, hours, seed, num_speakers)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    seconds: dict[str, float] = {"train": 0.0, "dev": 0.0, "test": 0.0}
    utts: dict[str, int] = {"train": 0, "dev": 0, "test": 0}
    with mp.get_context(method).Pool(processes=max(1, jobs), maxtasksperchild=1) as pool:
        chapters = progress.track(
            pool.imap(synthesize_chapter, tasks), total=len(tasks), desc="synth-corpus", unit="chapter"
        )
        for task, (_, secs, ids) in zip(tasks, chapters):
            seconds[task.speaker.split] += secs
            utts[task.speaker.split] += len(ids)
    header = "; ID | SPLIT | VOICE | VARIANT | PITCH | RANGE | RATE_WPM | WORD_GAP\n"
    rows = "".join(
        f"{s.id} | {s.split} | {s.voice} | {s.variant} | {s.pitch} | {s.pitch_range} | {s.rate_wpm} | {s.word_gap}\n"
        for s in speakers
    )
    (out_dir / "SPEAKERS.TXT").write_text(header + rows)
    (out_dir / "vocab.txt").write_text("".join(w + "\n" for w in W.vocabulary()))
    if lm_sentences_count:
        (out_dir / "lm_text.txt").write_text(
            "".join(t + "\n" for t in lm_sentences(lm_sentences_count, seed))
        )
    summary = {
        "seed": seed,
        "hours_requested": hours,
        "seconds": seconds,
        "utterances": utts,
        "speakers": {split: sorted(s.id for s in speakers if s.split == split) for split in seconds},
        "speaker_settings": [asdict(s) for s in speakers],
        "sample_rate": SAMPLE_RATE,
        "espeak_voice_count": len(VARIANTS) * len(BASE_VOICES),
    }
    return summary


def cpu_count() -> int:
    """CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
