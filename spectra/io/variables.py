"""What every stored analysis variable means: long_name, units, description (CF-style attrs).

`spectra.io.analysis_store.write_analysis` puts these on each data variable it writes, so `xr.open_zarr` users
(and the report's hovers) see what a number is without reading the code. One table for all analyses;
tests/test_store.py checks that every variable a command writes is described here.
"""

from __future__ import annotations

# name -> (long_name, units, description)
VARIABLES: dict[str, tuple[str, str, str]] = {
    # spectrum (spectra/analysis/spectrum.py, spectra/analysis/heavytail.py)
    "sigma": ("singular values", "weight units", "singular values of W, descending (NaN past the matrix's rank)"),
    "sigma_norm": ("min-max normalized singular values", "1", "WeLore's (σ - σ_min) / (σ_max - σ_min), in [0, 1]"),
    "full_rank": ("full rank", "count", "min(out, in): the number of singular values"),
    "stable_rank": ("stable rank", "count", "‖W‖_F² / σ_1²"),
    "effective_rank": ("effective rank", "count", "exp of the entropy of σ / Σσ (Roy & Vetterli)"),
    "entropy": ("spectral entropy", "1", "entropy of σ² / Σσ², divided by log(rank)"),
    "energy_top_r": ("energy in the top-r directions", "1", "Σ_{i≤r} σ_i² / ‖W‖_F²"),
    "log_norm": ("log10 Frobenius norm", "log10(weight units)", "log10 ‖W‖_F"),
    "alpha": ("power-law exponent", "1", "MLE exponent of the ESD tail (weightwatcher's alpha)"),
    "alpha_weighted": ("weighted alpha", "1", "alpha · log10 λ_max (weightwatcher)"),
    "xmin": ("power-law x_min", "weight units²", "start of the fitted ESD tail (KS-distance choice)"),
    "ks_distance": ("KS distance of the power-law fit", "1", "Kolmogorov-Smirnov distance, fit vs empirical tail"),
    # grad-subspace (spectra/analysis/subspace.py)
    "overlap_prev": ("overlap with the previous snapshot", "1",
                     "‖P_tᵀ P_{t-1}‖_F² / r of the top-r gradient singular subspaces (1: identical)"),
    "overlap_final": ("overlap with the final snapshot", "1", "‖P_tᵀ P_T‖_F² / r of the top-r gradient subspaces"),
    "principal_angles": ("principal angles to the previous subspace", "rad", "ascending angles, top-r subspaces"),
    "grassmann_prev": ("Grassmann distance to the previous subspace", "rad", "‖principal angles‖_2"),
    "grassmann_final": ("Grassmann distance to the final subspace", "rad", "‖principal angles‖_2 to the last step"),
    "energy_in_weight_subspace": ("gradient energy in the weight's top-r subspace", "1",
                                  "‖P_Wᵀ G‖_F² / ‖G‖_F², P_W the weight's top-r singular vectors"),
    # hessian-gap (spectra/analysis/hessian.py)
    "eigenvalues": ("top Hessian eigenvalues", "loss / weight units²", "λ_1 ≥ … ≥ λ_{k+1}, mean over batches"),
    "eigenvalues_se": ("standard error of the eigenvalues", "loss / weight units²", "over the data batches"),
    "eigenvalues_batch": ("top Hessian eigenvalues per batch", "loss / weight units²", "Lanczos Ritz values"),
    "gap": ("eigengap λ_k - λ_{k+1}", "loss / weight units²", "mean over batches"),
    "gap_se": ("standard error of the gap", "loss / weight units²", "over the data batches"),
    "rel_gap": ("relative eigengap", "1", "(λ_k - λ_{k+1}) / |λ_1|, mean over batches"),
    "residuals": ("Ritz residuals", "loss / weight units²", "max over batches of ‖H y - θ y‖"),
    "certified": ("certified", "bool", "every residual ≤ tol·|λ_1| and ≤ gap_frac × the gap to its neighbours"),
    "hvps": ("Hessian-vector products", "count", "HVPs spent per batch"),
    "hvp_error": ("finite-difference HVP error estimate", "loss / weight units²",
                  "max over batches of ‖D(2ε) − D(ε)‖ for the HVP that checks each Ritz pair (hvp = fd only)"),
    "fd_limited": ("not certified because of the fd error", "bool",
                   "1 = the pair passes without the HVP error but not with twice it added (hvp = fd only)"),
    # hessian dynamics (spectra/analysis/hessian_block.py, spectra/analysis/hessian_dynamics.py)
    "alignment": ("gradient alignment with the top-k Hessian eigenspace", "1",
                  "‖U_kᵀ g‖ / ‖g‖: g = ∂L/∂W of the Hessian's own token batch, U_k its top-k Ritz vectors "
                  "(QR-orthonormalized); 1 = the gradient lies in the top-k eigenspace"),
    "alignment_baseline": ("alignment of a random k-dim subspace", "1", "√(k/n), n = W.numel(): E‖P g‖² = k/n"),
    "alignment_snapshot": ("snapshot gradient's alignment with the top-k Hessian eigenspace", "1",
                           "‖U_kᵀ g‖ / ‖g‖ for the training gradient the run's snapshot store holds at that step "
                           "(sketched: its rank-r part), U_k from each batch; NaN where none is stored"),
    "vectors": ("top Hessian Ritz vectors", "1", "the top k+1 unit Ritz vectors of H_W per batch, W flattened "
                "row-major (out, in), float32"),
    "sin_theta": ("top-k eigenspace drift sin θ", "1", "sine of the largest principal angle between the top-k "
                  "Ritz subspaces of this and the previous stored step (same batch); NaN at the first step"),
    "eig_change": ("relative top-k eigenvalue change", "1", "‖λ_t − λ_{t−1}‖ / ‖λ_{t−1}‖ over the top-k "
                   "eigenvalues per batch, consecutive stored steps; NaN at the first step"),
    # hessian density (spectra/analysis/density.py)
    "nodes": ("quadrature nodes", "loss / weight units²", "Gauss nodes of stochastic Lanczos quadrature"),
    "weights": ("quadrature weights", "1", "per start vector; they sum to 1"),
    "t": ("eigenvalue grid", "loss / weight units²", "where the smoothed density is evaluated"),
    "density": ("Hessian spectral density", "1 / (loss / weight units²)", "Gaussian-smoothed SLQ density"),
    # rank maps (spectra/compression/rankmap.py, spectra/compression/ranks.py)
    "rank": ("kept rank", "count", "rank the map keeps for this matrix"),
    "lrc": ("low-rank component", "bool", "factorized into two linears (else kept dense, possibly truncated)"),
    # calibration (spectra/compression/calibration.py)
    "xtx": ("input second moment XᵀX", "activation units²", "Σ_t x_t x_tᵀ over the calibration tokens (float64)"),
    "grad_sq": ("output-gradient energy", "loss² / activation units²", "Σ_t ‖∂ℓ_t/∂y_t‖² over calibration tokens"),
    # sweep (spectra/compression/sweep.py)
    "ppl": ("perplexity", "1", "exp of the token-weighted mean next-token loss"),
    "loss": ("mean next-token loss", "nats / token", "token-weighted mean cross-entropy"),
    "dense_ppl": ("perplexity of the dense model", "1", "the uncompressed reference"),
    "dense_loss": ("loss of the dense model", "nats / token", "the uncompressed reference"),
    "linear_params": ("decoder-linear parameters", "count", "parameters of the compressed linears (attention and "
                      "MLP matrices) after compression; embeddings, norms and the LM head not included"),
    "params_kept": ("decoder-linear parameters kept", "1", "linear_params / the dense model's (1 − the fraction of "
                    "parameters removed, the field's unit)"),
    "total_params": ("model parameters", "count", "every parameter of the compressed model, embeddings included"),
    "total_params_kept": ("model parameters kept", "1", "total_params / the dense model's"),
    "ppl_recovered": ("perplexity after recovery", "1", "ppl after --recover-steps of WeLore-PEFT (NaN: not run)"),
    "loss_recovered": ("loss after recovery", "nats / token", "loss after --recover-steps of WeLore-PEFT"),
    "dense_linear_params": ("dense decoder-linear parameters", "count", "the compressed linears' parameters before"),
    "dense_total_params": ("dense model parameters", "count", "every parameter of the dense model"),
    "windows": ("eval windows", "count", "fixed token windows of the eval set (the bootstrap's units)"),
    "window_loss": ("mean next-token loss per window", "nats / token", "each eval window's mean cross-entropy "
                    "(NaN past the eval set's windows); what the bootstrap resamples"),
    "dense_window_loss": ("dense loss per window", "nats / token", "the dense model's mean loss per eval window"),
    "ppl_ci_low": ("perplexity CI low", "1", "percentile bootstrap over eval windows (attrs bootstrap, ci_level)"),
    "ppl_ci_high": ("perplexity CI high", "1", "percentile bootstrap over eval windows (attrs bootstrap, ci_level)"),
    "dense_ppl_ci_low": ("dense perplexity CI low", "1", "percentile bootstrap over eval windows"),
    "dense_ppl_ci_high": ("dense perplexity CI high", "1", "percentile bootstrap over eval windows"),
    "ppl_diff": ("perplexity minus the best baseline's", "1", "ppl − ppl of the lowest-perplexity baseline "
                 "configuration (WeLore, uniform, energy; any variant; itself excluded) at the same err_by, ERR, "
                 "eval set; < 0: better"),
    "ppl_diff_ci_low": ("difference CI low", "1", "paired percentile bootstrap over the same eval windows"),
    "ppl_diff_ci_high": ("difference CI high", "1", "paired percentile bootstrap over the same eval windows"),
    "baseline": ("compared baseline", "method/variant", "the baseline configuration ppl_diff is taken against"),
    "win": ("win over the best baseline", "bool", "ppl_diff's CI lies entirely below 0"),
    "err_rank": ("achieved ERR by rank", "1", "1 - Σ kept ranks / Σ full ranks"),
    "err_params": ("achieved ERR by parameters", "1", "1 - compressed / dense decoder-linear parameters"),
    "estimated_cost": ("estimated loss increase", "nats / token", "the loss map's estimate of what the dropped "
                       "whitened directions cost (NaN for other methods)"),
    # calibration bookkeeping
    "layer": ("layer", "index", "decoder layer of the matrix"),
    "component": ("component", "", "q, k, v, o, gate, up or down"),
    "input": ("shared input", "", "the matrix whose input second moment this one uses (q/k/v and gate/up share)"),
}


def attrs_for(name: str) -> dict[str, str]:
    long_name, units, description = VARIABLES.get(name, (name.replace("_", " "), "", ""))
    return {"long_name": long_name, "units": units, "description": description}
