"""spectra: how low-rank weights emerge from low-rank gradients (WeLore), measured and used.

The Python API works on objects in memory (a model, a tokenizer, token batches) as well as on paths, returns
xarray Datasets, rank maps and models, and prints nothing:

    import spectra
    ds = spectra.spectrum(model)                                   # singular values + heavy-tail metrics
    gaps = spectra.hessian_gaps(model, batches, k=8)               # Lanczos top-k and the k/k+1 gap
    cal = spectra.calibrate(model, batches)                        # layer-input moments, output-gradient energy
    rmap = spectra.rank_map(model, err=0.5, method="loss", calibration=cal)
    small = spectra.compress(model, rmap, calibration=cal)         # whitened truncation when cal is given

`import spectra` is light: each name below is imported on first use (README "Python API").
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> "module:attribute"; the one list of what the API is
_API = {
    # inputs and stores
    "resolve": "spectra.io.sources:resolve",
    "Source": "spectra.io.sources:Source",
    "load_model": "spectra.models.loading:load_model",
    "validate_checkpoint": "spectra.models.validate:validate_checkpoint",
    "dcp_to_pretrained": "spectra.models.dcp:dcp_to_pretrained",
    "load_tokenizer": "spectra.data:load_tokenizer",
    "train_wordpiece": "spectra.data.wordpiece:train_wordpiece",
    "text_windows": "spectra.data:text_windows",
    "open_run": "spectra.io.snapshots:open_run",
    "read_analysis": "spectra.io.analysis_store:read_analysis",
    "write_analysis": "spectra.io.analysis_store:write_analysis",
    # analyses
    "spectrum": "spectra.analysis.spectrum:spectrum",
    "grad_subspace": "spectra.analysis.subspace:grad_subspace",
    "hessian_gaps": "spectra.analysis.hessian:hessian_gaps",
    "hessian_density": "spectra.analysis.hessian:hessian_density",
    "hessian_steps": "spectra.analysis.hessian_dynamics:hessian_steps",
    "hessian_drift": "spectra.analysis.hessian_dynamics:hessian_drift",
    "shard_model": "spectra.models.sharding:shard_model",
    "claims": "spectra.analysis.claims:claims",
    # compression
    "calibrate": "spectra.compression.calibration:calibrate",
    "rank_map": "spectra.compression.ranks:rank_map",
    "compress": "spectra.compression.lowrank:compress",
    "merge": "spectra.compression.lowrank:merge",
    "save_compressed": "spectra.models.compressed:save_compressed",
    "load_compressed": "spectra.models.compressed:load_compressed",
    "sweep": "spectra.compression.sweep:sweep",
    # language-model objectives
    "perplexity": "spectra.lm.evaluate:perplexity",
    "mlm_masks": "spectra.lm.mlm:fixed_masks",
    "finetune": "spectra.lm.finetune:finetune",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    target = _API.get(name)
    if target is None:
        raise AttributeError(f"module 'spectra' has no attribute {name!r}")
    module, attr = target.split(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
