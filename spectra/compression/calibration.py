"""Calibration statistics: what each decoder linear sees (inputs) and how much its output matters (gradients).

One pass of calibration token windows (a few hundred sequences of the model's own tokenizer, streamed in
batches) through the dense model, with a forward hook on every component (`calibrate`):

    xtx[l, c]      = Σ_t x_t x_tᵀ   (in × in, float64)  the input second moment C = XᵀX
    grad_sq[l, c]  = Σ_t ‖∂ℓ_t/∂y_t‖²                     output-gradient energy

C is all that whitened truncation (spectra.compression.whiten) and the loss allocation need: dropping whitened
direction i of W costs σ_i(W S)² summed squared output error, C = S Sᵀ. grad_sq is the trace of
the empirical Fisher of the layer's output (the per-token loss ℓ_t, summed, not averaged): with
it, a squared output error e turns into an estimated loss increase ½ · grad_sq/(N·m) · e/N per
token (N tokens, m outputs; the isotropic per-matrix Fisher). An encoder with an MLM head takes ℓ = its MLM
loss: a seeded 15% of each window's tokens read [MASK] (spectra.lm.mlm, as evaluation masks them) and ℓ is
the cross-entropy at those positions (grad_kind mlm-fisher; the estimate is then per predicted token),
while C comes from a forward pass over the unmasked text, what an encoder reads downstream. Its config
must name the [MASK] id (`stored_calibration` copies it from the tokenizer; spectra.lm.mlm.use_tokenizer);
without one it is calibrated as an encoder without an LM head. Those run the base model and take
ℓ_t = z_t · h_t with h the final hidden state and z_t ~ N(0, I) (seeded): E‖∂ℓ/∂y‖² = tr(JᵀJ), the
Gauss–Newton curvature of the squared distortion ‖h' − h‖² of the model's output representation, so grad_sq
means the same there with "loss" = output distortion (attrs grad_kind: lm-fisher, mlm-fisher or
output-gauss-newton). With
`with_grad=False` (forward only) grad_sq is NaN and the loss method falls back to relative errors.

Windows (`calibration_windows`). A causal or masked LM whose tokenizer has an EOS token reads packed text, as
`spectra pretrain` trains it: documents joined by EOS and cut into fixed windows (spectra.data.text_windows).
Any other model (BERT-style encoders: [CLS] ... [SEP], no EOS) reads one document per window, wrapped in the
tokenizer's own special tokens (as its own encoding places them), never two documents glued together.

Linears fed the very same tensor (q/k/v, gate/up in LLaMA) share one xtx, found by comparing the
hooked inputs of the first batch (not by name, so any architecture the component registry maps
works). Stored in the run's analysis store: `calibration/meta` (per component: input group,
grad_sq; attrs: data, tokenizer, sequences, tokens) and `calibration/xtx/<layer>.<comp>`; ranks,
compress and sweep reuse them when data, tokenizer, sequence count/length and checkpoint match
(`stored_calibration`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from torch import nn

from spectra.compression.whiten import DEFAULT_DAMPING, damped_cholesky, whitened_svd
from spectra.data import expand_files, load_hub_c4, load_local_docs, text_windows, tokenizer_digest
from spectra.errors import SpectraError
from spectra.io.analysis_store import read_analysis, write_analysis_tree
from spectra.lm.evaluate import check_positions
from spectra.lm.mlm import MASK_SEED, fixed_masks, mask_token_id, masked_inputs, special_ids, use_tokenizer
from spectra.models.components import is_conv1d
from spectra.models.loading import is_masked_lm
from spectra.models.parts import component_parts, iter_components
from spectra.progress import progress_bar

GROUP = "calibration"
DEFAULT_SEQS, DEFAULT_SEQ_LEN = 256, 256
LOSS_WEIGHTS = ("auto", "fisher", "relative", "output")


@dataclass
class Calibration:
    """Per-component input second moments (shared where inputs are identical) and output-gradient energy."""

    tokens: int
    xtx: dict[str, torch.Tensor]  # input group key ("<layer>.<comp>" of its first user) -> in × in float64
    input_of: dict[tuple[int, str], str]  # component -> its input group key
    grad_sq: dict[tuple[int, str], float] = field(default_factory=dict)  # NaN when the model has no LM loss
    attrs: dict = field(default_factory=dict)

    def covariance(self, layer: int, comp: str) -> torch.Tensor:
        key = self.input_of.get((layer, comp))
        if key is None:
            raise SpectraError(f"calibration has no statistics for layer {layer} {comp}")
        return self.xtx[key]

    @property
    def has_loss(self) -> bool:
        return bool(self.grad_sq) and all(math.isfinite(v) for v in self.grad_sq.values())

    def metadata(self) -> dict:
        """Where the statistics came from, as rank maps and compressed folders record it."""
        return {**self.attrs, "tokens": self.tokens}


def has_causal_lm_head(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForCausalLM") and model.get_output_embeddings() is not None


def _batches(batches, batch_size: int) -> tuple[Iterable[torch.Tensor], int | None]:
    """Token-id batches ([b, seq_len] each) from one [n, seq_len] tensor or an iterable of tensors."""
    if isinstance(batches, torch.Tensor):
        if batches.ndim != 2 or len(batches) == 0:
            raise SpectraError(f"calibration needs [n, seq_len] token windows, got shape {tuple(batches.shape)}")
        return batches.split(batch_size), math.ceil(len(batches) / batch_size)
    try:
        n = len(batches)
    except TypeError:
        n = None
    return batches, n


def _token_ids(ids, n_emb: int) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise SpectraError(f"calibration batches must be integer token-id tensors, not {type(ids).__name__}"
                           f"{'' if not isinstance(ids, torch.Tensor) else ' of ' + str(ids.dtype)}")
    ids = ids.unsqueeze(0) if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.numel() == 0:
        raise SpectraError(f"calibration batches must be [batch, seq_len] token ids, got shape {tuple(ids.shape)}")
    if int(ids.min()) < 0 or int(ids.max()) >= n_emb:
        raise SpectraError(f"calibration token ids must lie in [0, {n_emb}) (the model's embeddings), got "
                           f"{int(ids.min())}..{int(ids.max())}: is it the model's tokenizer?")
    return ids.long()


def calibrate(model: nn.Module, batches, *, batch_size: int = 8, device: str | torch.device | None = None,
              with_grad: bool | None = None, progress: bool = True) -> Calibration:
    """The calibration statistics of `model` (module docstring) on token-id `batches`: one [n, seq_len]
    tensor (cut into `batch_size` rows at a time) or an iterable of [b, seq_len] tensors, for decoders and
    encoders alike. The model is left as it was (weights, requires_grad, train/eval mode)."""
    batches, total = _batches(batches, batch_size)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    lm = has_causal_lm_head(model)
    mlm = is_masked_lm(model) and getattr(model.config, "mask_token_id", None) is not None
    mask_id = mask_token_id(model) if mlm else None
    with_grad = True if with_grad is None else with_grad
    gen = torch.Generator().manual_seed(0)
    comps = [(l, c, m) for l, c, _, m in iter_components(model) if isinstance(m, nn.Linear) or is_conv1d(m)]
    if not comps:
        raise SpectraError(f"{type(model).__name__} has no dense decoder linears to calibrate")
    n_emb = model.get_input_embeddings().weight.shape[0]
    xtx: dict[str, torch.Tensor] = {}
    input_of: dict[tuple[int, str], str] = {}
    grad_sq = {(l, c): 0.0 for l, c, _ in comps}
    # last: (layer, input tensor, its group key) of the previous hook call; xtx: whether this pass adds to C
    state = {"first": True, "last": None, "xtx": True}

    def hook(layer, comp):
        def fn(mod, inp, out):
            x = inp[0].detach()
            if state["first"]:
                last = state["last"]
                if last is not None and last[0] == layer and last[1].shape == x.shape and torch.equal(last[1], x):
                    input_of[(layer, comp)] = last[2]
                else:
                    input_of[(layer, comp)] = f"{layer}.{comp}"
                state["last"] = (layer, x, input_of[(layer, comp)])
            key = input_of[(layer, comp)]
            if state["xtx"] and key == f"{layer}.{comp}":  # the group's first user accumulates for all of them
                x2 = x.reshape(-1, x.shape[-1]).to(torch.float64)
                acc = xtx.get(key)
                xtx[key] = x2.T @ x2 if acc is None else acc.addmm_(x2.T, x2)
            if with_grad and out.requires_grad:
                out.register_hook(lambda g: grad_sq.__setitem__((layer, comp), grad_sq[(layer, comp)]
                                                                + float(g.double().pow(2).sum())))
        return fn

    handles = [m.register_forward_hook(hook(l, c)) for l, c, m in comps]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    tokens = predicted = 0
    try:
        for p, _ in flags:
            p.requires_grad_(False)  # gradients flow through activations only: no weight grads kept
        for batch in progress_bar(batches, total=total, desc="calibrate", unit="batch", disable=not progress,
                                  leave=False):
            ids = _token_ids(batch, n_emb).to(device)
            if mlm:  # C from the unmasked text; then the loss on a fresh seeded mask per batch (seed alone fixes it)
                with torch.no_grad():
                    model(input_ids=ids)
                state["first"], state["last"], state["xtx"] = False, None, False
                masks = fixed_masks(ids.cpu(), seed=MASK_SEED + tokens, exclude=special_ids(model)).to(device)
                targets, ids = ids[masks], masked_inputs(ids, masks, mask_id)
                predicted += len(targets)
            if with_grad:
                emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                with torch.enable_grad():
                    if mlm:
                        logits = model(inputs_embeds=emb).logits[masks]
                        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
                    elif lm:
                        logits = model(inputs_embeds=emb, use_cache=False).logits
                        loss = F.cross_entropy(
                            logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"
                        )
                    else:  # Gauss–Newton of the output distortion: E_z ‖Jᵀz‖² = tr(JᵀJ) with one z ~ N(0, I) per token
                        out = model(inputs_embeds=emb, output_hidden_states=True)
                        h = getattr(out, "last_hidden_state", None)
                        h = out.hidden_states[-1] if h is None else h
                        loss = (h * torch.randn(h.shape, generator=gen, dtype=h.dtype).to(h.device)).sum()
                    loss.backward()  # summed over tokens: each hook sees ∂ℓ_t/∂y_t
            elif not mlm:
                with torch.no_grad():
                    model(input_ids=ids)
            state["first"], state["last"], state["xtx"] = False, None, True
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    if tokens == 0:
        raise SpectraError("calibration got no token batches")
    missing = [f"{l}.{c}" for l, c, _ in comps if (l, c) not in input_of]
    if missing:
        raise SpectraError(f"calibration forward never reached {missing[:4]} (does the model run these linears?)")
    kind = ("mlm-fisher" if mlm else "lm-fisher" if lm else "output-gauss-newton") if with_grad else "none"
    attrs = {"grad_kind": kind, **({"predicted_tokens": predicted} if mlm else {})}
    return Calibration(tokens, xtx, input_of, {k: (v if with_grad else float("nan")) for k, v in grad_sq.items()},
                       attrs)


# --------------------------------------------------------------------------- windows
def packs_documents(model: nn.Module, tokenizer) -> bool:
    """Whether calibration text is packed with EOS (a causal or masked LM whose tokenizer has one, as
    `spectra pretrain` trains both) rather than one document per window with the tokenizer's own special
    tokens (other encoders; tokenizers without EOS, such as BERT's)."""
    return (has_causal_lm_head(model) or is_masked_lm(model)) and getattr(tokenizer, "eos_token_id", None) is not None


def _texts(docs, batch: int = 64) -> Iterator[list]:
    if hasattr(docs, "__len__"):
        for i in range(0, len(docs), batch):
            yield docs[i:i + batch]["text"]
        return
    buf = []
    for ex in docs:
        buf.append(ex["text"])
        if len(buf) == batch:
            yield buf
            buf = []
    if buf:
        yield buf


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix) token ids the tokenizer puts around one sequence ([CLS] / [SEP] for BERT, [BOS] / none
    for LLaMA), read off its own encoding of a probe text, with and without special tokens."""
    probe = "spectra calibration"
    body = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(body) + 1):
        if full[i:i + len(body)] == body:
            return full[:i], full[i + len(body):]
    raise SpectraError(f"cannot tell where tokenizer {type(tokenizer).__name__} puts its special tokens")


def document_windows(docs, tokenizer, seq_len: int, n: int) -> torch.Tensor:
    """Up to `n` [seq_len] windows, each from one document: `seq_len − specials` consecutive tokens of it
    wrapped in the tokenizer's special tokens ([CLS] ... [SEP] for BERT). Documents are cut into as many
    whole windows as they hold, in order; a document shorter than one window is skipped (no padding, so
    every position is a real token the model attends to)."""
    prefix, suffix = special_tokens(tokenizer)
    body = seq_len - len(prefix) - len(suffix)
    if body < 1:
        raise SpectraError(f"--calib-seq-len {seq_len} leaves no room between the tokenizer's special tokens")
    rows: list[list[int]] = []
    for texts in _texts(docs):  # local text is checked for non-string rows by spectra.data.load_local_docs
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            for a in range(0, len(ids) - body + 1, body):
                rows.append(prefix + ids[a:a + body] + suffix)
                if len(rows) == n:
                    return torch.tensor(rows, dtype=torch.long)
    if not rows:
        raise SpectraError(f"no --calib-data document holds {body} tokens (one --calib-seq-len {seq_len} window "
                           "with its special tokens); lower --calib-seq-len or give longer documents")
    return torch.tensor(rows, dtype=torch.long)


def calibration_windows(model: nn.Module, tokenizer, data: str | None, seqs: int = DEFAULT_SEQS,
                        seq_len: int = DEFAULT_SEQ_LEN, *, cache_dir: str | Path | None = ".cache/spectra"
                        ) -> torch.Tensor:
    """[≤ seqs, seq_len] token windows of `data` (files; None: hub C4 train) the way `model` reads text
    (module docstring: packed with EOS for a causal LM, one document per window otherwise)."""
    if seqs < 1 or seq_len < 2:
        raise SpectraError(f"need --calib-seqs >= 1 and --calib-seq-len >= 2 (got {seqs}, {seq_len})")
    check_positions(model, seq_len, "--calib-seq-len")
    n_emb = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_emb:
        raise SpectraError(f"tokenizer {tokenizer.name_or_path!r} has {len(tokenizer)} ids but the model embeds "
                           f"{n_emb}; pass the model's --tokenizer")
    if data:
        expand_files(data, "--calib-data")
    if packs_documents(model, tokenizer):
        return text_windows(data, tokenizer, seq_len, seqs * seq_len, split="train", cache_dir=cache_dir,
                            flag="--calib-data")
    docs = load_local_docs(data, "--calib-data") if data else load_hub_c4("train", "--calib-data")
    return document_windows(docs, tokenizer, seq_len, seqs)


# --------------------------------------------------------------------------- store
def save(store: str | Path, cal: Calibration) -> None:
    """Replace the store's calibration group with `cal` (the new group is complete before the old one goes)."""
    keys = sorted(cal.input_of)
    meta = xr.Dataset(
        {
            "layer": ("matrix", [l for l, _ in keys]),
            "component": ("matrix", [c for _, c in keys]),
            "input": ("matrix", [cal.input_of[k] for k in keys]),
            "grad_sq": ("matrix", [cal.grad_sq.get(k, float("nan")) for k in keys]),
        }
    )
    parts = {f"xtx/{key}": (xr.Dataset({"xtx": (("in_row", "in_col"), C.cpu().numpy())}), None)
             for key, C in cal.xtx.items()}
    parts["meta"] = (meta, cal.metadata())
    write_analysis_tree(store, GROUP, parts)


def load(store: str | Path) -> Calibration:
    meta = read_analysis(store, f"{GROUP}/meta")
    keys = [(int(l), str(c)) for l, c in zip(meta["layer"].values, meta["component"].values)]
    input_of = {k: str(v) for k, v in zip(keys, meta["input"].values)}
    xtx = {
        g: torch.from_numpy(read_analysis(store, f"{GROUP}/xtx/{g}")["xtx"].values.astype(np.float64))
        for g in sorted(set(input_of.values()))
    }
    attrs = dict(meta.attrs)
    return Calibration(
        int(attrs.pop("tokens")), xtx, input_of, {k: float(v) for k, v in zip(keys, meta["grad_sq"].values)}, attrs
    )


def stored_calibration(model: nn.Module, tokenizer, data: str | None, seqs: int = DEFAULT_SEQS,
                       seq_len: int = DEFAULT_SEQ_LEN, *, source: str | Path | None = None,
                       store: str | Path | None = None, write: bool = False, batch_size: int = 8,
                       device: str | torch.device | None = None,
                       cache_dir: str | Path | None = ".cache/spectra") -> Calibration:
    """The calibration of `model` (loaded from `source`) on `data`: read from the analysis `store` when it was
    made the same way (data files, tokenizer, windows, checkpoint), else computed, and written to `store`
    when `write`. A masked LM gets the tokenizer's [MASK] id in its config where it names none (its MLM loss)."""
    use_tokenizer(model, tokenizer)
    files = "|".join(expand_files(data, "--calib-data")) if data else "c4-en-train"  # hashed: stored attrs stay short
    attrs = {
        "data": data or "c4-en-train",
        "data_files": hashlib.sha1(files.encode()).hexdigest()[:16],
        "tokenizer": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        "tokenizer_digest": tokenizer_digest(tokenizer),
        "windows": "packed" if packs_documents(model, tokenizer) else "documents",
        "seqs": seqs,
        "seq_len": seq_len,
        "source": str(Path(source).resolve()) if source is not None else "",
    }
    if store is not None and source is not None and Path(store).exists():
        try:
            cal = load(store)
            if all(str(cal.attrs.get(k)) == str(v) for k, v in attrs.items()):
                return cal
        except SpectraError:
            pass  # no (or an unreadable) stored calibration: compute it
    windows = calibration_windows(model, tokenizer, data, seqs, seq_len, cache_dir=cache_dir)
    cal = calibrate(model, windows, batch_size=batch_size, device=device)
    cal.attrs.update(attrs)
    if store is not None and write:
        save(store, cal)
    return cal


# --------------------------------------------------------------------------- loss estimates
def loss_direction_scores(
    model: nn.Module,
    cal: Calibration,
    keys: list[tuple[int, str]],
    weight: str = "auto",
    damping: float | None = None,
    device=None,
) -> tuple[list[np.ndarray], str]:
    """Per matrix (in `keys` order), the estimated cost of dropping each whitened direction, descending.

    cost_i = w · σ_i(W S)² with w per matrix (`weight`):
        fisher    ½ · grad_sq / (N · m) / P   estimated mean loss (or output distortion) increase per predicted
                                             token (P = N, or the masked tokens of an MLM calibration)
        relative  1 / ‖W S‖_F²               share of the matrix's output energy (no loss needed)
        output    1 / N                      mean squared output error per token
        auto      fisher when the calibration has gradients, else relative
    """
    if weight not in LOSS_WEIGHTS:
        raise SpectraError(f"--loss-weight must be one of {', '.join(LOSS_WEIGHTS)}, not {weight!r}")
    if weight == "auto":
        weight = "fisher" if cal.has_loss else "relative"
    if weight == "fisher" and not cal.has_loss:
        raise SpectraError("--loss-weight fisher needs output gradients (this calibration ran forward only)")
    weights = {(p.layer, p.component): p.weight(m) for p, m in component_parts(model)}  # a fused part: its rows
    n = float(cal.tokens)
    predicted = float(cal.attrs.get("predicted_tokens") or n)
    out = []
    for key in keys:
        W = weights[key].detach()
        S, _ = damped_cholesky(
            cal.covariance(*key).to(device or W.device), DEFAULT_DAMPING if damping is None else damping
        )
        sig2 = whitened_svd(W.to(S.device), S)[1].pow(2).cpu().numpy()
        if weight == "fisher":
            w = 0.5 * cal.grad_sq[key] / (n * W.shape[0]) / predicted
        elif weight == "relative":
            w = 1.0 / sig2.sum() if sig2.sum() > 0 else 1.0
        else:
            w = 1.0 / n
        out.append(w * sig2)
    return out, weight
