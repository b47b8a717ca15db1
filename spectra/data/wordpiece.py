"""A BERT-style WordPiece tokenizer trained on local text (the `tokenizers` library), saved as a real HF folder.

What an encoder pretrained here (`spectra pretrain --objective mlm`) reads: BERT's pipeline (NFD, lowercase,
accents stripped, whitespace/punctuation pre-split, `##` continuation pieces), the special tokens [PAD] [UNK]
[CLS] [SEP] [MASK] (ids 0-4), `[CLS] text [SEP]` around one sequence and `[CLS] a [SEP] b [SEP]` around a
pair. [SEP] is also its EOS: spectra packs training and evaluation text as documents joined by EOS
(spectra.data.packing), and [SEP] is what separates segments in BERT.

    tok = spectra.train_wordpiece("data/wikipedia/train", vocab_size=8192, out="tok-8k")
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertTokenizerFast

from spectra.data.files import expand_files, file_digest, load_local_docs
from spectra.errors import SpectraError

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
DEFAULT_VOCAB = 8192


def train_wordpiece(data, vocab_size: int = DEFAULT_VOCAB, out: str | Path | None = None, *,
                    max_chars: int | None = None) -> BertTokenizerFast:
    """A WordPiece `BertTokenizerFast` of `vocab_size` ids (specials included) trained on `data`: local files
    (anything `load_local_docs` takes) or a list of strings, read in order up to `max_chars` characters.
    Deterministic for the same text. Saved to `out` (tokenizer.json, tokenizer_config.json, vocab.txt) when
    given, loadable there by `spectra.load_tokenizer` / AutoTokenizer."""
    if vocab_size < len(SPECIALS) + 1:
        raise SpectraError(f"--vocab-size {vocab_size} leaves no room beside the {len(SPECIALS)} special tokens")
    texts = data if isinstance(data, (list, tuple)) else load_local_docs(data)["text"]

    def chunks():
        seen = 0
        for t in texts:
            if max_chars is not None and seen >= max_chars:
                return
            seen += len(t)
            yield t

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=True,
                                                lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), min_frequency=2,
                                        show_progress=False, continuing_subword_prefix="##")
    tok.train_from_iterator(chunks(), trainer=trainer)
    if tok.get_vocab_size() <= len(SPECIALS):
        raise SpectraError("the WordPiece training text is empty: pass files with text")
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                             cls_token="[CLS]", mask_token="[MASK]", eos_token="[SEP]", do_lower_case=True)
    if out is not None:
        fast.save_pretrained(str(out))
    return fast


def cached_wordpiece(data: str, vocab_size: int = DEFAULT_VOCAB, cache_dir: str | Path = ".cache/spectra",
                     max_chars: int | None = None) -> Path:
    """The folder of `train_wordpiece(data, vocab_size)`, trained once per content of the data files and kept
    under `cache_dir` (a run records this path as its tokenizer, and its checkpoints carry a copy)."""
    files = expand_files(data)
    key = hashlib.sha256(f"{'|'.join(file_digest(f) for f in files)}|{vocab_size}|{max_chars}".encode()).hexdigest()
    folder = Path(cache_dir) / f"wordpiece-{vocab_size}-{key[:16]}"
    if not (folder / "tokenizer.json").is_file():
        tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        train_wordpiece(data, vocab_size, tmp, max_chars=max_chars)
        shutil.rmtree(folder, ignore_errors=True)  # a half-written copy from a killed attempt
        os.replace(tmp, folder)
    return folder
