"""`spectra spectrum` end to end on the tiny run and checkpoint, against direct SVDs."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from conftest import gpu

from spectra.analysis.heavytail import fit_power_law
from spectra.analysis.spectrum import batched_singular_values, spectrum_dataset
from spectra.cli import main
from spectra.errors import SpectraError
from spectra.io.analysis_store import read_analysis
from spectra.io.snapshots import open_run

COMPS = ["q", "k", "v", "o", "gate", "up", "down"]


def test_batched_singular_values_group_by_shape():
    g = torch.Generator().manual_seed(0)
    ws = {(0, "q"): torch.randn(16, 16, generator=g), (0, "up"): torch.randn(40, 16, generator=g),
          (1, "q"): torch.randn(16, 16, generator=g), (0, "down"): torch.randn(16, 40, generator=g)}
    out = batched_singular_values(ws, torch.device("cpu"))
    for k, w in ws.items():
        np.testing.assert_allclose(out[k].numpy(), np.linalg.svd(w.numpy(), compute_uv=False), rtol=1e-5)


def test_non_finite_weight_is_one_clear_error():
    w = torch.ones(8, 8)
    w[0, 0] = float("nan")
    with pytest.raises(SpectraError, match="non-finite weights in layer 0 q at step 3"):
        spectrum_dataset([3], iter([(3, {(0, "q"): w})]), top_r=4, device=torch.device("cpu"), progress=False)


def test_spectrum_command_on_run(tiny_store, tmp_path):
    out = tmp_path / "analysis.zarr"
    assert main(["spectrum", str(tiny_store), "--out", str(out), "--top-r", "8", "--device", "cpu"]) == 0
    ds = read_analysis(out, "spectrum")
    assert ds["step"].values.tolist() == [2, 4, 6, 8, 10, 12]
    assert ds["layer"].values.tolist() == [0, 1]
    assert ds["component"].values.tolist() == COMPS
    assert ds.attrs["top_r"] == 8
    # one matrix against a direct float64 SVD of the stored weight
    W = open_run(tiny_store).weight(1, "gate").sel(step=12).values.astype(np.float64)
    s = np.linalg.svd(W, compute_uv=False)
    cell = ds.sel(step=12, layer=1, component="gate")
    np.testing.assert_allclose(cell.sigma.values, s, rtol=1e-4)
    np.testing.assert_allclose(cell.sigma_norm.values, (s - s.min()) / (s.max() - s.min()), atol=1e-5)
    lam = s**2
    assert float(cell.full_rank) == 64
    assert float(cell.stable_rank) == pytest.approx(lam.sum() / lam.max(), rel=1e-4)
    assert float(cell.energy_top_r) == pytest.approx(lam[:8].sum() / lam.sum(), rel=1e-4)
    assert float(cell.log_norm) == pytest.approx(math.log10(lam.sum()), rel=1e-5)
    fit = fit_power_law(torch.from_numpy(lam))
    assert float(cell.alpha) == pytest.approx(fit.alpha, rel=1e-3)
    assert float(cell.alpha_weighted) == pytest.approx(float(cell.alpha) * math.log10(lam.max()), rel=1e-6)
    # every metric is filled for every (step, layer, component)
    for name in ("stable_rank", "effective_rank", "entropy", "energy_top_r", "alpha", "xmin", "ks_distance"):
        assert np.isfinite(ds[name].values).all(), name


def test_spectrum_step_filter_and_default_out(tiny_store, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_store / "snapshots.zarr", run / "snapshots.zarr")
    assert main(["spectrum", str(run / "snapshots.zarr"), "--steps", "4,12", "--device", "cpu"]) == 0
    ds = read_analysis(run / "analysis.zarr", "spectrum")
    assert ds["step"].values.tolist() == [4, 12]
    assert ds.attrs["top_r"] == 32


def test_spectrum_command_on_checkpoint(tiny_store, tmp_path):
    from spectra.models.loading import load_causal_lm
    from spectra.models.parts import component_weights

    ckpt = tiny_store / "checkpoints" / "step_12"
    out = tmp_path / "a.zarr"
    assert main(["spectrum", str(ckpt), "--out", str(out), "--device", "cpu"]) == 0
    ds = read_analysis(out, "spectrum")
    assert ds["step"].values.tolist() == [12]  # parsed from the folder name
    w = component_weights(load_causal_lm(ckpt))[(0, "v")].detach().double().numpy()
    np.testing.assert_allclose(ds.sel(step=12, layer=0, component="v").sigma.values,
                               np.linalg.svd(w, compute_uv=False), rtol=1e-4)


@pytest.mark.parametrize("args, message", [
    (["spectrum", "/nonexistent/run"], "does not exist"),
    (["spectrum", "{store}", "--steps", "5"], "step(s) [5] not in"),
    (["spectrum", "{store}", "--top-r", "0"], "--top-r"),
])
def test_spectrum_bad_input_is_one_error_line(tiny_store, tmp_path, capsys, args, message):
    args = [a.replace("{store}", str(tiny_store)) for a in args] + ["--out", str(tmp_path / "x.zarr")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


@gpu
@pytest.mark.gpu
def test_spectrum_cuda_matches_cpu(tiny_store, tmp_path):
    for dev in ("cpu", "cuda"):
        assert main(["spectrum", str(tiny_store), "--out", str(tmp_path / f"{dev}.zarr"), "--device", dev]) == 0
    a, b = (read_analysis(tmp_path / f"{d}.zarr", "spectrum") for d in ("cpu", "cuda"))
    np.testing.assert_allclose(a.sigma.values, b.sigma.values, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a.stable_rank.values, b.stable_rank.values, rtol=1e-4)


def test_streamed_checkpoint_gives_the_in_memory_sigma(tiny_ckpt):
    """The command's stream (safetensors, one matrix at a time) and the whole model in memory give the same
    σ and metrics bit for bit, and σ equals a float64 SVD of each weight."""
    from spectra.analysis.spectrum import checkpoint_weights
    from spectra.models.loading import load_causal_lm
    from spectra.models.parts import component_weights

    cpu = torch.device("cpu")
    steps, stream = checkpoint_weights([(0, tiny_ckpt)])
    streamed = spectrum_dataset(steps, stream, top_r=8, device=cpu, progress=False)
    weights = {k: w.detach().clone() for k, w in component_weights(load_causal_lm(tiny_ckpt)).items()}
    in_memory = spectrum_dataset(steps, iter([(steps[0], weights)]), top_r=8, device=cpu, progress=False)
    assert streamed.sizes == in_memory.sizes and streamed.sizes["layer"] * streamed.sizes["component"] == 14
    for name in streamed.data_vars:
        np.testing.assert_array_equal(streamed[name].values, in_memory[name].values, err_msg=name)
    for (layer, comp), w in weights.items():
        s = np.linalg.svd(w.double().numpy(), compute_uv=False)
        got = streamed.sigma.sel(step=steps[0], layer=layer, component=comp).values[: s.size]
        np.testing.assert_allclose(got, s, rtol=1e-6, atol=1e-7 * s[0])


def test_stream_holds_only_a_few_matrices():
    """σ come back in order while the source is read lazily: when result i is handed back, at most
    i + 1 + 2·workers matrices have been pulled from the source."""
    from spectra.analysis.heavytail import many_singular_values, stream_singular_values

    g = torch.Generator().manual_seed(1)
    mats = [torch.randn(24 + 8 * (i % 3), 24, generator=g) for i in range(16)]
    pulled = []

    def source():
        for i, m in enumerate(mats):
            pulled.append(i)
            yield m

    workers = torch.get_num_threads()
    out = []
    for i, s in enumerate(stream_singular_values(source())):
        assert len(pulled) <= i + 1 + (2 * workers if workers > 1 else 0), (i, len(pulled))
        out.append(s)
    assert len(out) == 16
    for s, ref in zip(out, many_singular_values(mats)):
        assert torch.equal(s, ref)
