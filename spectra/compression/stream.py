"""Streaming WeLore-COMP of a checkpoint on disk: one decomposition per matrix, one layer at a time.

`spectra compress` on a safetensors checkpoint (one file, or shards with model.safetensors.index.json)
never loads the model: it reads tensors with `safe_open`, one module or one decoder layer at a time,
and writes the compressed Hugging Face folder incrementally, one safetensors shard per decoder layer
plus one for everything else (embeddings, final norm, lm_head, copied through), with the same
tensor names, config.json, rank map, modeling_spectra.py and tokenizer as
`spectra.models.compressed.save_compressed`, so `load_compressed` and
`AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)` load it unchanged.

The "no decomposition twice" contract:
    compress --err E [--method welore|uniform|energy]   derives the map in the SAME pass. Each matrix
        is decomposed once (pass 1); its σ feed the global threshold (spectra.compression.ranks.build_rank_map,
        ERR by rank, params LRC rule: the `spectra ranks` defaults), its eigenvectors are spilled
        to <out>/.spectra-staging, and pass 2 slices them into factors once the map is known. All of
        them are spilled, not only the r_max = ⌊mn/(m+n)⌋ an LRC can use: by rank ERR an N-LRC is
        truncated to its rank too (W_r = W·V_r·V_rᵀ, or W − W·V_t·V_tᵀ with the n − r tail).
    compress --rank-map F   one decomposition per matrix the map cuts (LRC, or N-LRC below full
        rank); full-rank N-LRCs are copied through.
    ranks, then compress --rank-map   `spectra ranks` computes σ only (svdvals), which cannot give
        factors, so the cut matrices are decomposed a second time. Use `compress --err` for one
        pass; the map it used is stored in the output (spectra_rank_map.json) for later tools.
    compress --compensate sequential|refit   streamed too, for LLaMA-family decoders: each decoder layer is
        built alone from its shards and calibrated on the calibration windows' dense and compressed hidden
        states (spectra.compression.sequential.streamed_layers); no eigenvectors are spilled.
    --whiten, --method diagnostic/loss, compensation of other architectures and checkpoints that are not
        safetensors under their modules' names stay on the in-memory path (spectra.compression.lowrank.compress):
        they need the loaded model.

Decomposition (`decompose`; measured against a float64 SVD in bench/compress_scale.py --decompositions):
the float64 Gram matrix of the smaller side, G = WᵀW (or WWᵀ for a wide W), built from 1024-row
float64 blocks, and its eigendecomposition: σ_i = √λ_i, V (or U) the eigenvectors. The other side
is computed only for the kept directions, U_r = W·V_r/σ_r, so A = √σ_r·V_rᵀ and B = U_r·√σ_r = W·V_r/√σ_r
(`factors`) -- the same √σ split as spectra.compression.lowrank.factorize. float64 because the map needs every
σ down to σ_min (WeLore's min-max normalization): in float32, λ = σ² loses σ below √ε·σ_1 ≈ 3e-4·σ_1.
On this CPU it costs less than a float32 SVD (gesdd) and is more accurate.

Resident at most: pass 1, two modules' weights and their two decompositions in flight (one per core,
spectra.analysis.heavytail.map_matrices); pass 2, one layer's output and one module's source tensors. Every
file goes to <out>/.spectra-staging first and is moved into <out> only when the folder is complete.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from spectra.analysis.heavytail import map_matrices, normalized_singular_values
from spectra.compression.allocation import MatrixSpectrum, build_rank_map
from spectra.compression.rankmap import by_module, compress_module, entries_for, layer_prefixes, plan
from spectra.compression.sequential import check_streamed, compensation_metadata, streamed_layers, token_batches
from spectra.compression.whiten import DEFAULT_DAMPING
from spectra.errors import SpectraError
from spectra.io.sources import Source, resolve
from spectra.models.components import COMPONENTS, is_conv1d
from spectra.models.compressed import write_metadata
from spectra.models.loading import check_finite
from spectra.models.parts import model_class
from spectra.progress import progress_bar

STAGING = ".spectra-staging"
ROWS = 1024  # rows per float64 block of the Gram product: never a float64 copy of a whole matrix


class NotStreamable(Exception):
    """The checkpoint cannot be read tensor by tensor under its modules' names (no safetensors, or a
    legacy key layout that transformers renames on load): the caller loads the model instead."""


# --------------------------------------------------------------------------- one matrix
@dataclass
class Eig:
    """W = U·diag(σ)·Vᵀ through the Gram matrix of W's smaller side."""

    sigma: torch.Tensor  # float64, descending, min(m, n) values
    vecs: torch.Tensor  # float32 (k, k): column i goes with sigma[i]; V (W tall or square) or U (W wide)
    wide: bool


def decompose(W: torch.Tensor, device: str | torch.device | None = None) -> Eig:
    """The one exact decomposition of an (out, in) weight (see module docstring)."""
    X = W.detach().to(device or W.device)
    wide = X.shape[0] < X.shape[1]
    X = X.mT if wide else X  # G = XᵀX over the long side
    G = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float64, device=X.device)
    for i in range(0, X.shape[0], ROWS):
        block = X[i:i + ROWS].double()
        G.addmm_(block.mT, block)
    lam, vec = torch.linalg.eigh(G)
    del G
    return Eig(lam.flip(0).clamp(min=0).sqrt().cpu(), vec.flip(1).float().cpu().contiguous(), wide)


def factors(W: torch.Tensor, e: Eig, rank: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (√σ_r·V_rᵀ, U_r·√σ_r) in float32, the unkept side from W itself. A direction with σ
    below 1e-7·σ_1 (float32 noise) gets zero in the computed factor instead of noise / √σ."""
    dev = device or W.device
    W32, Q = W.to(dev, torch.float32), e.vecs[:, :rank].to(dev)
    sig = e.sigma[:rank].to(dev)
    root = sig.sqrt().float()
    inv = torch.where(sig > 1e-7 * e.sigma[0].item(), 1 / root, torch.zeros_like(root))
    if e.wide:  # Q = U_r
        return ((Q.mT @ W32) * inv[:, None]).cpu(), (Q * root).cpu()
    return (root[:, None] * Q.mT).cpu(), ((W32 @ Q) * inv).cpu()


def truncated(W: torch.Tensor, e: Eig, rank: int, device=None) -> torch.Tensor:
    """The best rank-`rank` approximation of W (float32), projecting on the kept directions, or
    removing the tail when that is the smaller side (n − r < r)."""
    dev = device or W.device
    W32, k = W.to(dev, torch.float32), e.vecs.shape[0]
    if rank >= k:
        return W32.cpu()
    keep = rank <= k - rank
    Q = (e.vecs[:, :rank] if keep else e.vecs[:, rank:]).to(dev)
    part = Q @ (Q.mT @ W32) if e.wide else (W32 @ Q) @ Q.mT
    return (part if keep else W32 - part).cpu()


# --------------------------------------------------------------------------- the checkpoint
def config_dtype(cfg) -> torch.dtype:
    """The dtype a checkpoint was saved in (its config's), float32 when it does not say."""
    stored = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or torch.float32
    return getattr(torch, stored) if isinstance(stored, str) else stored


def skeleton(path: str | Path) -> nn.Module:
    """The model a dense checkpoint folder holds, built on the meta device from its config (no weights read)."""
    return _meta_model(*model_class(Path(path)))


def _meta_model(cls, cfg) -> nn.Module:
    with init_empty_weights(include_buffers=False):
        return cls.from_config(cfg) if cls.__name__.startswith("Auto") else cls._from_config(cfg)


_FLOATING = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


class Checkpoint:
    """A dense safetensors checkpoint, read tensor by tensor, and its meta-device skeleton."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.path = path
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                files = {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise SpectraError(f"{index} is not a safetensors index ({e})") from None
            missing = sorted({f.name for f in files.values() if not f.is_file()})
            if missing:
                raise SpectraError(f"{path}: shard {missing[0]} named in {index.name} does not exist")
            self.where = files
        else:
            self.where = {}
            for f in sorted(path.glob("*.safetensors")):
                self.where.update(dict.fromkeys(self._dtypes(f), f))
        if not self.where:
            raise NotStreamable(f"{path} has no safetensors")
        cls, cfg = model_class(path)
        self.skeleton = _meta_model(cls, cfg)
        self.modules = by_module(self.skeleton)  # also: one clear error for an unknown architecture
        names = set(self.skeleton.state_dict())
        if set(self.where) - names or any(f"{m}.weight" not in self.where for m in self.modules):
            raise NotStreamable(f"{path}: tensor names differ from the model's module names")
        for f in sorted(set(self.where[f"{m}.weight"] for m in self.modules)):
            for key, dt in self._dtypes(f).items():
                if key.removesuffix(".weight") in self.modules and dt not in _FLOATING:
                    raise SpectraError(f"{f}: tensor {key} is stored as {dt}; compress needs floating-point weights "
                                       "(dequantize the checkpoint first)")
        self.dtype = config_dtype(cfg)

    @staticmethod
    def _dtypes(f: Path) -> dict[str, str]:
        """{tensor name: safetensors dtype} from a file's header (no tensor read)."""
        try:
            with safe_open(f, "pt") as st:
                return {k: st.get_slice(k).get_dtype() for k in st.keys()}
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt file is one line naming it
            raise SpectraError(f"cannot read {f}: {' '.join(str(e).split())[:200]}") from None

    def read(self, keys: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.where[k], []).append(k)
        out = {}
        try:
            for f, ks in by_file.items():
                with safe_open(f, "pt") as st:
                    for k in ks:
                        t = st.get_tensor(k)
                        check_finite([(k, t)], f)  # embeddings and norms are copied through: never a NaN
                        out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        except SpectraError:
            raise
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt shard is one line
            raise SpectraError(f"cannot read {keys[0]} from {self.path}: {e}") from None
        return out

    def module(self, name: str, dtype: torch.dtype) -> nn.Module:
        """A real copy of one component module of the skeleton, holding its weights from disk."""
        mod = copy.deepcopy(self.skeleton.get_submodule(name)).to_empty(device="cpu").to(dtype)
        state = self.read([f"{name}.{k}" for k in mod.state_dict()], dtype)
        mod.load_state_dict({k[len(name) + 1:]: v for k, v in state.items()})
        return mod

    def layers(self) -> dict[int, tuple[str, list[str]]]:
        """{layer: (its tensor-name prefix, its component modules)}: the prefix is the modules'
        longest common dotted path (model.layers.3), so the layer's norms travel with it."""
        return layer_prefixes(self.modules)


# --------------------------------------------------------------------------- the two passes
def _spill_name(layer: int, component: str) -> str:
    return f"{layer}.{component}.safetensors"


def spectra_pass(ckpt: Checkpoint, spill: Path | None, dtype: torch.dtype, device=None, progress: bool = True) -> list:
    """Pass 1: decompose every component once (two modules in flight), spill the eigenvectors (unless `spill`
    is None: the compensated factors do not use them), return the spectra
    (spectra.compression.allocation.MatrixSpectrum) for the rank map."""
    if spill is not None:
        spill.mkdir(parents=True, exist_ok=True)
    bar = progress_bar(total=len(ckpt.modules), desc="decompose", unit="module", disable=not progress)

    def one(name: str) -> list:
        stored = ckpt.read([f"{name}.weight"], dtype)[f"{name}.weight"]
        out = []
        for p in ckpt.modules[name]:
            W = p.of_tensor(stored, is_conv1d(ckpt.skeleton.get_submodule(name)))
            if not bool(torch.isfinite(W).all()):
                raise SpectraError(f"non-finite weights (NaN/Inf) in layer {p.layer} {p.component} ({name})")
            e = decompose(W, device)
            if spill is not None:
                save_file({"sigma": e.sigma, "vecs": e.vecs}, spill / _spill_name(p.layer, p.component),
                          metadata={"wide": str(int(e.wide))})
            out.append(MatrixSpectrum(p.layer, p.component, tuple(W.shape),
                                      normalized_singular_values(e.sigma).numpy(), e.sigma.numpy()))
        bar.update(1)
        return out

    try:
        found = [s for group in map_matrices(one, list(ckpt.modules)) for s in group]
    finally:
        bar.close()
    return sorted(found, key=lambda s: (s.layer, COMPONENTS.index(s.component)))


def load_spilled(spill: Path, layer: int, component: str) -> Eig:
    with safe_open(spill / _spill_name(layer, component), "pt") as st:
        return Eig(st.get_tensor("sigma"), st.get_tensor("vecs"), st.metadata()["wide"] == "1")


def stream_compress(src: str | Path | Source | Checkpoint, dst: str | Path, *, rank_map: dict | None = None,
                    method: str = "welore", err: float = 0.5, dtype: torch.dtype | None = None, device=None,
                    progress: bool = True, compensation: str | None = None, batches=None,
                    damping: float = DEFAULT_DAMPING, batch_size: int = 8) -> tuple[dict, dict[str, int]]:
    """Compress the checkpoint `src` (a folder, or anything `spectra.resolve` names) into the Hugging Face
    folder `dst` (see module docstring): with `rank_map`, or deriving a `method` map for `err` in the same
    pass. Returns (the rank map, parameter counts {linear_before, linear_after, total_before, total_after}).
    `compensation` ("sequential" or "refit") with calibration token `batches` ([n, seq_len] ids, run
    `batch_size` rows at a time): compensated factors, layer by layer on the compressed layers' own
    activations (spectra.compression.sequential.streamed_layers: what it holds in memory, which
    architectures it streams), equal to `spectra.compress(model, rank_map, compensation=..., batches=...)`.
    Raises NotStreamable when the checkpoint is not safetensors under its modules' names."""
    if not isinstance(src, Checkpoint):
        source = src if isinstance(src, Source) else resolve(src)
        if source.compressed:
            raise SpectraError(f"{source.model_dir} is already compressed; merge it first (spectra compress --merge)")
        src = Checkpoint(source.need_model("compress"))
    ckpt, dst = src, Path(dst)
    src = ckpt.path
    dtype = dtype or ckpt.dtype
    if rank_map is not None:
        entries_for(ckpt.skeleton, rank_map)  # a map of another model fails before any work
    if compensation is not None:  # a bad name, architecture or batches fail before any work
        check_streamed(ckpt.skeleton, compensation)
        if batches is None:
            raise SpectraError(f"compensation {compensation!r} needs calibration token batches (batches=...)")
        batches = token_batches(batches, batch_size)
    staging, created = dst / STAGING, not dst.exists()
    shutil.rmtree(staging, ignore_errors=True)  # ours by name: a crashed run's leftovers
    staging.mkdir(parents=True)
    done = False
    try:
        spill = staging / "spill"
        if rank_map is None:
            spectra = spectra_pass(ckpt, spill if compensation is None else None, dtype, device, progress)
            rank_map = build_rank_map(spectra, method, err)

            def eig_of(p, W):
                return load_spilled(spill, p.layer, p.component)
        else:
            def eig_of(p, W):
                return decompose(W, device)
        entries, structure = entries_for(ckpt.skeleton, rank_map), plan(ckpt.skeleton, rank_map)
        layers = ckpt.layers()
        n_shards = len(layers) + 1
        shard = "model-{:05d}-of-{:05d}.safetensors".format
        weight_map: dict[str, str] = {}
        counts = dict.fromkeys(("linear_before", "linear_after", "total_before", "total_after"), 0)
        placed: set[str] = set()
        compensated = None if compensation is None else streamed_layers(
            ckpt, layers, batches, how=compensation, entries=entries, structure=structure, dtype=dtype,
            damping=damping, device=device)
        for i, (layer, (prefix, names)) in enumerate(progress_bar(
                layers.items(), desc="compress" + (f" ({compensation})" if compensation else ""), unit="layer",
                disable=not progress)):
            # compensated: the whole layer, built from the shards; plain: module by module, from pass 1's eigenvectors
            out = {} if compensated is None else _layer_tensors(ckpt, prefix, names, next(compensated), counts, placed)
            for name in names if compensated is None else ():
                mod = ckpt.module(name, dtype)
                new = compress_module(mod, ckpt.modules[name], entries, structure.get(name),
                                      lambda p, W, r: factors(W, eig_of(p, W), r, device),
                                      lambda p, W, r: truncated(W, eig_of(p, W), r, device))
                before, after = mod.state_dict(), new.state_dict()
                out.update({f"{name}.{k}": v.contiguous() for k, v in after.items()})
                placed.update(f"{name}.{k}" for k in before)
                counts["linear_before"] += sum(v.numel() for v in before.values())
                counts["linear_after"] += sum(v.numel() for v in after.values())
                del mod, new, before, after
            rest = [k for k in ckpt.where if k.startswith(prefix + ".") and k not in placed]
            out.update(ckpt.read(rest, dtype))
            placed.update(rest)
            save_file(out, staging / shard(i + 1, n_shards), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(out, shard(i + 1, n_shards)))
            counts["total_after"] += sum(v.numel() for v in out.values())
            del out
        rest = [k for k in ckpt.where if k not in placed]
        out = ckpt.read(rest, dtype)
        save_file(out, staging / shard(n_shards, n_shards), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, shard(n_shards, n_shards)))
        counts["total_after"] += sum(v.numel() for v in out.values())
        size = sum((staging / f).stat().st_size for f in set(weight_map.values()))
        (staging / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        counts["total_before"] = counts["total_after"] - counts["linear_after"] + counts["linear_before"]
        _write_config(ckpt, structure, dtype, staging)
        saved = rank_map if compensation is None else {
            **rank_map, "whiten": compensation_metadata(compensation, damping, batches)}
        write_metadata(staging, ckpt.skeleton, saved, tokenizer=src)
        shutil.rmtree(spill, ignore_errors=True)
        for stale in [*dst.glob("model*.safetensors"), dst / "model.safetensors.index.json"]:
            stale.unlink(missing_ok=True)  # --overwrite: an old single-file model would shadow the index
        for f in staging.iterdir():
            f.replace(dst / f.name)
        done = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not done and created and not any(dst.iterdir()):
            dst.rmdir()  # a failed run leaves no folder it made
    return rank_map, counts


def _layer_tensors(ckpt: Checkpoint, prefix: str, names: list[str], layer: nn.Module, counts: dict,
                   placed: set[str]) -> dict[str, torch.Tensor]:
    """The tensors of a compressed decoder `layer` (at `prefix`) under their full names, on the CPU; its
    dense tensors' names go to `placed` and its linears' parameter counts to `counts`."""
    state = layer.state_dict()
    placed.update(f"{prefix}.{k}" for k in ckpt.skeleton.get_submodule(prefix).state_dict())
    for name in names:
        rel = name[len(prefix) + 1:] + "."
        counts["linear_before"] += sum(p.numel() for p in ckpt.skeleton.get_submodule(name).parameters())
        counts["linear_after"] += sum(v.numel() for k, v in state.items() if k.startswith(rel))
    return {f"{prefix}.{k}": v.contiguous().cpu() for k, v in state.items()}


def _write_config(ckpt: Checkpoint, structure: dict, dtype: torch.dtype, out: Path) -> None:
    """config.json (and generation_config.json) as `save_pretrained` of the compressed model writes them."""
    cfg = copy.deepcopy(ckpt.skeleton.config)
    cfg.spectra_structure = structure
    cfg.dtype = dtype
    cfg.save_pretrained(out)
    if (ckpt.path / "generation_config.json").is_file():
        shutil.copy2(ckpt.path / "generation_config.json", out / "generation_config.json")
