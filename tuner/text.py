"""A CLIP tokenizer over a small closed vocabulary, written from scratch (no download).

Each known word becomes exactly one token; text outside the vocabulary falls back to letters.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def write_word_tokenizer(words: list[str], folder: str | Path, max_length: int = 16) -> CLIPTokenizer:
    """Write vocab.json and merges.txt for `words` into `folder`, and return the loaded tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    letters = list(string.ascii_lowercase)
    # A byte-pair model trained on the words alone learns merges that rebuild each of them whole.
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=10_000, initial_alphabet=letters, end_of_word_suffix="</w>", show_progress=False
    )
    bpe.train_from_iterator(words, trainer)
    learned = json.loads(bpe.to_str())["model"]
    tokens = letters + [c + "</w>" for c in letters] + list(learned["vocab"])
    tokens = list(dict.fromkeys(tokens)) + [BOS, EOS]
    merges = [m if isinstance(m, str) else " ".join(m) for m in learned["merges"]]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges))
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        model_max_length=max_length,
    )
    tokenizer.save_pretrained(folder)
    return tokenizer
