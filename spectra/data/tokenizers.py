"""Tokenizers: loading one by hub name, folder or `bytes`, and identifying one by what it does."""

from __future__ import annotations

import hashlib
import weakref
from pathlib import Path

from transformers import AutoTokenizer, ByT5Tokenizer, LlamaTokenizer, T5Tokenizer
from transformers.utils import logging as hf_logging

from spectra.errors import SpectraError

BYTES = "bytes"
DEFAULT_TOKENIZER = "t5-base"


def load_tokenizer(name_or_path: str = DEFAULT_TOKENIZER):
    """A tokenizer by hub name (`t5-base`), local folder (e.g. ../shared/data/tokenizers/t5), or
    `bytes` (byte-level, ByT5's ids; built in, for small CPU models).

    Local sentencepiece-only folders (spiece.model / tokenizer.model) load through the T5/LLaMA
    classes directly, since AutoTokenizer cannot always infer them without the hub.
    """
    p = Path(name_or_path)
    if name_or_path == BYTES and not p.exists():
        # UTF-8 bytes (ByT5's 384 ids, no files needed): all the compute goes to the decoder
        # layers WeLore studies instead of a 32k embedding, which is what a CPU-sized model needs
        tok = ByT5Tokenizer()
        tok.name_or_path = BYTES
    else:
        tok = _load_tokenizer(name_or_path, p)
    tok.model_max_length = 1 << 40  # we pack documents ourselves; silence the "sequence too long" warning
    return tok


def _skip_config_class_warning(record) -> bool:
    # Without remote code, AutoTokenizer reads a compressed folder's config (model_type spectra_lowrank)
    # through the base config class and warns, per load, that the types differ: true and harmless, since
    # only the tokenizer files are used. Every other transformers warning still shows.
    return "to instantiate a model of type" not in record.getMessage()


def _load_tokenizer(name_or_path: str, p: Path):
    log = hf_logging.get_logger("transformers.configuration_utils")
    log.addFilter(_skip_config_class_warning)
    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)  # never prompt or run code
    except Exception as first:  # noqa: BLE001
        if p.is_dir():
            for fname, cls in (("spiece.model", T5Tokenizer), ("tokenizer.model", LlamaTokenizer)):
                if (p / fname).is_file():
                    return cls.from_pretrained(str(p))
            if (p / "converted_tokenizer_json").is_dir():
                return AutoTokenizer.from_pretrained(str(p / "converted_tokenizer_json"), trust_remote_code=False)
        where = "local folder" if p.exists() else "hub name (is the hub reachable?)"
        raise SpectraError(f"cannot load tokenizer {name_or_path!r} as a {where}: {str(first).splitlines()[0]}; "
                           "pass --tokenizer PATH to a local tokenizer folder") from None
    finally:
        log.removeFilter(_skip_config_class_warning)


# digest per live tokenizer object, with the stamp it was computed under. Safe because the only public ways
# to change what a loaded HF tokenizer does are add_tokens / add_special_tokens, which only append (so
# len(tokenizer), the vocabulary plus added tokens, grows) and reassigning special tokens (pad_token = ...,
# seen in all_special_tokens): both are in the stamp, so a changed tokenizer is re-digested. Weak keys: an
# entry goes with its tokenizer, and a new tokenizer reusing a freed object's id() can never hit it.
_TOKENIZER_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_digest(tokenizer) -> str:
    """Identifies a tokenizer by what it does (its vocabulary and special tokens), not its name.
    Sorting T5's 32k vocabulary takes ~0.2 s on a 2-core CPU, so it is memoized per tokenizer object (see above)."""
    special = list(getattr(tokenizer, "all_special_tokens", []))
    stamp = (len(tokenizer) if hasattr(tokenizer, "__len__") else None, tuple(special))
    try:
        hit = _TOKENIZER_DIGESTS.get(tokenizer)
    except TypeError:  # not weak-referenceable or not hashable: digest every time
        hit = None
    if hit is not None and hit[0] == stamp and stamp[0] is not None:
        return hit[1]
    vocab = sorted(tokenizer.get_vocab().items()) if hasattr(tokenizer, "get_vocab") else []
    digest = hashlib.sha256(repr((type(tokenizer).__name__, vocab, special)).encode()).hexdigest()[:16]
    try:
        _TOKENIZER_DIGESTS[tokenizer] = (stamp, digest)
    except TypeError:
        pass
    return digest
