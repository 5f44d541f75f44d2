"""Text side of CTC fine-tuning: output vocabularies and n-gram language models."""

from speechvq.text.ngram import ArpaLM, KenLMScorer, LanguageModel, load_language_model, train_ngram
from speechvq.text.vocab import SPECIAL_TOKENS, WORD_DELIMITER, Vocabulary
