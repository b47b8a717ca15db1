"""Calibration statistics: what each decoder linear sees (inputs) and how much its output matters (gradients).

One pass of calibration text (a few hundred sequences of the model's own tokenizer, streamed in
batches) through the dense model, with a forward hook on every component:

    xtx[l, c]      = Σ_t x_t x_tᵀ   (in × in, float64)  the input second moment C = XᵀX
    grad_sq[l, c]  = Σ_t ‖∂ℓ_t/∂y_t‖²                     output-gradient energy

C is all that whitened truncation (spectra.compression.whiten) and the loss allocation need: dropping whitened
direction i of W costs σ_i(W S)² summed squared output error, C = S Sᵀ. grad_sq is the trace of
the empirical Fisher of the layer's output (the per-token loss ℓ_t, summed, not averaged): with
it, a squared output error e turns into an estimated loss increase ½ · grad_sq/(N·m) · e/N per
token (N tokens, m outputs; the isotropic per-matrix Fisher). Encoders and other models without a
causal-LM head run the base model and take ℓ_t = z_t · h_t with h the final hidden state and
z_t ~ N(0, I) (seeded): E‖∂ℓ/∂y‖² = tr(JᵀJ), the Gauss–Newton curvature of the squared
distortion ‖h' − h‖² of the model's output representation, so grad_sq means the same there with
"loss" = output distortion (attrs grad_kind: lm-fisher or output-gauss-newton). With
`with_grad=False` (forward only) grad_sq is NaN and the loss method falls back to relative errors.

Linears fed the very same tensor (q/k/v, gate/up in LLaMA) share one xtx, found by comparing the
hooked inputs of the first batch (not by name, so any architecture the component registry maps
works). Stored in the run's analysis store: `calibration/meta` (per component: input group,
grad_sq; attrs: data, tokenizer, sequences, tokens) and `calibration/xtx/<layer>.<comp>`; ranks,
compress and sweep reuse them when data, tokenizer, sequence count/length and checkpoint match.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spectra.errors import SpectraError

if TYPE_CHECKING:  # whiten imports nothing of calibration, but keep the annotation lazy anyway
    from spectra.compression.whiten import Whitener
from spectra.io.sources import resolve
from spectra.models.parts import iter_components
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


def has_causal_lm_head(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForCausalLM") and model.get_output_embeddings() is not None


def collect(model: nn.Module, windows: torch.Tensor, batch_size: int = 8, device: str | torch.device | None = None,
            with_grad: bool | None = None, progress: bool = True) -> Calibration:
    """Stream [n, seq_len] token windows through `model` and accumulate the statistics (model unchanged)."""
    if windows.ndim != 2 or len(windows) == 0:
        raise SpectraError(f"need [n, seq_len] calibration windows, got shape {tuple(windows.shape)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    lm = has_causal_lm_head(model)
    with_grad = True if with_grad is None else with_grad
    gen = torch.Generator().manual_seed(0)
    comps = [(l, c, m) for l, c, _, m in iter_components(model) if isinstance(m, nn.Linear)]
    if not comps:
        raise SpectraError(f"{type(model).__name__} has no dense decoder linears to calibrate")
    xtx: dict[str, torch.Tensor] = {}
    input_of: dict[tuple[int, str], str] = {}
    grad_sq = {(l, c): 0.0 for l, c, _ in comps}
    state = {"first": True, "last": None}  # last: (layer, input tensor, its group key) of the previous hook call

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
            if key == f"{layer}.{comp}":  # the group's first user accumulates for all of them
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
    tokens = 0
    try:
        for p, _ in flags:
            p.requires_grad_(False)  # gradients flow through activations only: no weight grads kept
        for i in progress_bar(
            range(0, len(windows), batch_size), desc="calibrate", unit="batch", disable=not progress, leave=False
        ):
            ids = windows[i : i + batch_size].to(device)
            if with_grad:
                emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                with torch.enable_grad():
                    if lm:
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
            else:
                with torch.no_grad():
                    model(input_ids=ids)
            state["first"], state["last"] = False, None
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    missing = [f"{l}.{c}" for l, c, _ in comps if (l, c) not in input_of]
    if missing:
        raise SpectraError(f"calibration forward never reached {missing[:4]} (does the model run these linears?)")
    kind = ("lm-fisher" if lm else "output-gauss-newton") if with_grad else "none"
    return Calibration(
        tokens, xtx, input_of, {k: (v if with_grad else float("nan")) for k, v in grad_sq.items()}, {"grad_kind": kind}
    )


# --------------------------------------------------------------------------- store
def save(store: str | Path, cal: Calibration) -> None:
    """Replace the store's calibration group with `cal` (the new group is complete before the old one goes)."""
    import xarray as xr

    from spectra.io.analysis_store import write_analysis_tree

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
    parts["meta"] = (meta, {**cal.attrs, "tokens": cal.tokens})
    write_analysis_tree(store, GROUP, parts)


def load(store: str | Path) -> Calibration:
    from spectra.io.analysis_store import read_analysis

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


def check_options(data: str | None, seqs: int, seq_len: int, damping: float, weight: str = "auto") -> None:
    """Fail on a bad calibration option before any model loads or SVD runs."""
    from spectra.data import expand_files

    if seqs < 1 or seq_len < 2:
        raise SpectraError(f"need --calib-seqs >= 1 and --calib-seq-len >= 2 (got {seqs}, {seq_len})")
    if not (damping >= 0 and math.isfinite(damping)):
        raise SpectraError(f"--damping must be a finite number >= 0, not {damping}")
    if weight not in LOSS_WEIGHTS:
        raise SpectraError(f"--loss-weight must be one of {', '.join(LOSS_WEIGHTS)}, not {weight!r}")
    if data:
        expand_files(data)


def calibration(
    store: str | Path | None,
    src: Path,
    model: nn.Module,
    data: str | None,
    tokenizer: str | None,
    seqs: int = DEFAULT_SEQS,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    cache_dir: str | Path = ".cache/spectra",
) -> Calibration:
    """The calibration of `model` on `data`: reused from `store` when it was made the same way, else computed
    (and written there when `store` is given)."""
    from spectra.data import expand_files, load_tokenizer, text_windows

    if seqs < 1 or seq_len < 2:
        raise SpectraError(f"need --calib-seqs >= 1 and --calib-seq-len >= 2 (got {seqs}, {seq_len})")
    tok_name = resolve(src).tokenizer_name(tokenizer)
    files = "|".join(expand_files(data)) if data else "c4-en-train"  # the file list, hashed: stored attrs stay short
    attrs = {
        "data": data or "c4-en-train",
        "data_files": hashlib.sha1(files.encode()).hexdigest()[:16],
        "tokenizer": tok_name,
        "seqs": seqs,
        "seq_len": seq_len,
        "source": str(Path(src).resolve()),
    }
    if store is not None and Path(store).exists():
        try:
            cal = load(store)
            if all(str(cal.attrs.get(k)) == str(v) for k, v in attrs.items()):
                return cal
        except SpectraError:
            pass  # no (or an unreadable) stored calibration: compute it
    tok = load_tokenizer(tok_name)
    n_emb = model.get_input_embeddings().weight.shape[0]
    if len(tok) > n_emb:
        raise SpectraError(f"tokenizer {tok_name!r} has {len(tok)} ids but the model embeds {n_emb}; pass --tokenizer")
    windows = text_windows(data, tok, seq_len, seqs * seq_len, split="train", cache_dir=cache_dir)
    cal = collect(model, windows, batch_size, device)
    cal.attrs.update(attrs)
    if store is not None:
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
        fisher    ½ · grad_sq / (N · m) / N   estimated mean per-token loss (or output distortion) increase
        relative  1 / ‖W S‖_F²               share of the matrix's output energy (no loss needed)
        output    1 / N                      mean squared output error per token
        auto      fisher when the calibration has gradients, else relative
    """
    from spectra.compression.whiten import DEFAULT_DAMPING, damped_cholesky, whitened_svd

    if weight not in LOSS_WEIGHTS:
        raise SpectraError(f"--loss-weight must be one of {', '.join(LOSS_WEIGHTS)}, not {weight!r}")
    if weight == "auto":
        weight = "fisher" if cal.has_loss else "relative"
    if weight == "fisher" and not cal.has_loss:
        raise SpectraError("--loss-weight fisher needs output gradients (this calibration ran forward only)")
    mods = {(l, c): m for l, c, _, m in iter_components(model)}
    n = float(cal.tokens)
    out = []
    for key in keys:
        W = mods[key].weight
        S, _ = damped_cholesky(
            cal.covariance(*key).to(device or W.device), DEFAULT_DAMPING if damping is None else damping
        )
        sig2 = whitened_svd(W.to(S.device), S)[1].pow(2).cpu().numpy()
        if weight == "fisher":
            w = 0.5 * cal.grad_sq[key] / (n * W.shape[0]) / n
        elif weight == "relative":
            w = 1.0 / sig2.sum() if sig2.sum() > 0 else 1.0
        else:
            w = 1.0 / n
        out.append(w * sig2)
    return out, weight


def whitener_for(
    src, model: nn.Module, data: str | None, tokenizer: str | None, seqs: int, seq_len: int, damping: float, device=None
) -> Whitener:
    """A `Whitener` from the calibration of `model` (reused from / stored in its analysis store)."""
    from spectra.compression.whiten import Whitener
    from spectra.io.runs import run_dir_of
    from spectra.io.sources import analysis_store_for

    check_options(data, seqs, seq_len, damping)
    store = analysis_store_for(src) if run_dir_of(src) is not None else None
    cal = calibration(store, src, model, data, tokenizer, seqs, seq_len, device=device)
    w = Whitener(cal.covariance, damping, device)
    w.calibration = {**cal.attrs, "tokens": cal.tokens}
    return w
