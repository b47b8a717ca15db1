"""Masked-language-model scoring: fixed, seeded masks, so every model is scored on the same predicted tokens.

An encoder with an MLM head (BertForMaskedLM, RobertaForMaskedLM, ...) has no next-token loss; what it
predicts are masked tokens. Its perplexity here is exp(mean CE) over a FIXED set of masked positions:
`fixed_masks` picks round(15%) of the maskable tokens of every window from a generator seeded by `seed`
alone (not by the model, the batch size or the device), so a dense model and each of its compressed copies
predict exactly the same tokens from exactly the same inputs, and per-window losses pair up across models
(bootstrap CIs over windows). Masked positions read [MASK] (no 80/10/10 replacement: that is a training
device, and at evaluation it would only add noise that differs from the training run's). Special tokens
(pad, [CLS], [SEP], [MASK] and the like, as the model's config names them) are never masked, as
DataCollatorForLanguageModeling never masks them in training.

The [MASK] id and the special ids come from the model's config (`spectra pretrain --objective mlm` stores
them there); `use_tokenizer(model, tok)` copies them from a tokenizer into a config that lacks them (a hub
BERT), so a compressed copy made afterwards, and its saved folder, carry them too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spectra.errors import SpectraError
from spectra.models.loading import is_masked_lm

MLM_RATE = 0.15
MASK_SEED = 0
SPECIAL_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id", "mask_token_id",
                "unk_token_id")


def use_tokenizer(model: nn.Module, tokenizer, overwrite: bool = False) -> None:
    """Record the tokenizer's [MASK] and other special-token ids in the config of a masked LM where it names none
    (`overwrite`: every one the tokenizer has, as pretraining does for the model it builds). Any other model is
    left as it is (a causal LM's pad/eos ids steer generation)."""
    if not is_masked_lm(model):
        return
    cfg = model.config
    for key in SPECIAL_KEYS:
        tid = getattr(tokenizer, key, None)
        if tid is not None and (overwrite or getattr(cfg, key, None) is None):
            setattr(cfg, key, int(tid))


def mask_token_id(model: nn.Module) -> int:
    mid = getattr(model.config, "mask_token_id", None)
    if mid is None:
        raise SpectraError(f"{type(model).__name__}'s config names no mask_token_id, which masked-LM scoring "
                           "needs; pass the model's tokenizer (spectra.perplexity(..., tokenizer=...) or "
                           "spectra.lm.mlm.use_tokenizer(model, tokenizer))")
    return int(mid)


def special_ids(model: nn.Module) -> list[int]:
    """Token ids never masked: every special id the model's config names."""
    cfg = model.config
    return sorted({int(v) for k in SPECIAL_KEYS if isinstance(v := getattr(cfg, k, None), int)})


def fixed_masks(windows: torch.Tensor, rate: float = MLM_RATE, seed: int = MASK_SEED,
                exclude=()) -> torch.Tensor:
    """[n, L] bool: in every window, max(1, round(rate * maskable)) positions chosen uniformly among the
    tokens not in `exclude`; a function of (windows, rate, seed, exclude) only, so identical for every model."""
    if not 0 < rate < 1:
        raise SpectraError(f"the masking rate must lie in (0, 1), not {rate}")
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(windows.shape, generator=gen)
    ok = ~torch.isin(windows.cpu(), torch.tensor(list(exclude), dtype=windows.dtype))
    if not bool(ok.any(1).all()):
        raise SpectraError("a window holds only special tokens: nothing to mask and predict")
    scores[~ok] = 2.0  # after every maskable position
    k = (ok.sum(1) * rate).round().clamp(min=1)
    order = scores.argsort(1).argsort(1)  # rank of each position's score within its window
    return order < k[:, None]


def mlm_logits(model: nn.Module, input_ids: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[masked, vocab] logits at the masked positions only. BERT-style heads (`cls` / `lm_head` over the
    encoder's last hidden state) run on those rows alone: the vocabulary projection of every other position,
    most of a small encoder's FLOPs, is never computed. Other models: the full forward, then the rows."""
    head = getattr(model, "cls", None) or getattr(model, "lm_head", None)
    base = getattr(model, "base_model", None)
    if head is not None and base is not None and base is not model:
        hidden = base(input_ids=input_ids).last_hidden_state
        return head(hidden[masks])
    return model(input_ids=input_ids).logits[masks]


def masked_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`model(input_ids=x, labels=labels).loss` (mean CE over the positions whose label is not -100), through
    `mlm_logits` (tests/test_encoder_mlm.py)."""
    masks = labels != -100
    logits = mlm_logits(model, input_ids, masks)
    return F.cross_entropy(logits.float(), labels[masks])


def masked_inputs(windows: torch.Tensor, masks: torch.Tensor, mask_id: int) -> torch.Tensor:
    return windows.masked_fill(masks, mask_id)
