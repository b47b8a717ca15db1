"""The compression API on a model in memory equals what the commands write for the same model saved to disk:
rank maps (every method), compressed models (plain, streamed, whitened), merge, sweep. The API prints nothing
and refuses bad input with one SpectraError line."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import make_tiny, train_steps

import spectra
from spectra.cli import main
from spectra.errors import SpectraError

X = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
CAL = ["--calib-seqs", "4", "--calib-seq-len", "32", "--device", "cpu"]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=X).logits


def without_source(rank_map: dict) -> dict:
    return {k: v for k, v in rank_map.items() if k != "source"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(the model in memory, its save_pretrained folder with the `bytes` tokenizer, calibration text)."""
    from spectra.data import load_tokenizer

    root = tmp_path_factory.mktemp("api")
    model = train_steps(make_tiny(vocab=384), 8, vocab=256).eval()
    model.save_pretrained(root / "dense")
    load_tokenizer("bytes").save_pretrained(root / "dense")
    text = root / "calib.jsonl"
    text.write_text("\n".join(json.dumps({"text": f"Sentence {i} of the calibration text, about low-rank weights."})
                              for i in range(60)))
    return model, root / "dense", text


@pytest.mark.parametrize("method,err_by", [("welore", "rank"), ("uniform", "params"), ("energy", "rank")])
def test_rank_map_equals_the_ranks_command(saved, tmp_path, method, err_by, capsys):
    model, dense, _ = saved
    capsys.readouterr()
    api = spectra.rank_map(model, 0.4, method=method, err_by=err_by)
    assert capsys.readouterr().out == ""  # the library prints nothing
    out = tmp_path / "m.json"
    assert main(["ranks", str(dense), "--err", "0.4", "--method", method, "--err-by", err_by, "--out", str(out),
                 "--device", "cpu"]) == 0
    cli = json.loads(out.read_text())
    assert without_source(cli) == api and cli["source"] == str(dense)
    assert without_source(spectra.rank_map(dense, 0.4, method=method, err_by=err_by)) == api  # a path: the same


def test_compress_equals_the_compress_command_streamed_and_merged(saved, tmp_path):
    model, dense, _ = saved
    rmap = spectra.rank_map(model, 0.5, err_by="params")
    (tmp_path / "m.json").write_text(json.dumps(rmap))
    small = spectra.compress(copy.deepcopy(model), rmap, progress=False)
    assert main(["compress", str(dense), "--rank-map", str(tmp_path / "m.json"), "--out", str(tmp_path / "c"),
                 "--device", "cpu"]) == 0  # safetensors: the streamed path
    from_cli = spectra.load_compressed(tmp_path / "c")
    torch.testing.assert_close(logits(from_cli), logits(small), atol=1e-5, rtol=0)
    assert (logits(small) - logits(model)).abs().max() > 1e-3  # really compressed
    spectra.save_compressed(small, rmap, tmp_path / "api", tokenizer=dense)
    torch.testing.assert_close(logits(spectra.load_compressed(tmp_path / "api")), logits(small), atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "api" / "spectra_rank_map.json").read_text()) == rmap
    assert (tmp_path / "api" / "tokenizer_config.json").is_file()
    # merge: the API's dense model and the command's dense folder
    assert main(["compress", str(tmp_path / "c"), "--merge", "--out", str(tmp_path / "d")]) == 0
    merged = spectra.merge(copy.deepcopy(small))
    assert not any(type(m).__name__ == "LowRankLinear" for m in merged.modules())
    torch.testing.assert_close(logits(spectra.load_model(tmp_path / "d")), logits(merged), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(merged), logits(small), atol=1e-5, rtol=0)


def test_loss_map_and_whitened_compress_equal_the_commands(saved, tmp_path):
    from spectra.compression.calibration import calibration_windows
    from spectra.data import load_tokenizer

    model, dense, text = saved
    windows = calibration_windows(model, load_tokenizer("bytes"), str(text), 4, 32, cache_dir=None)
    assert windows.shape == (4, 32)
    cal = spectra.calibrate(model, windows, progress=False)
    assert cal.tokens == 4 * 32 and cal.has_loss
    api = spectra.rank_map(model, 0.5, method="loss", calibration=cal)
    out = tmp_path / "loss.json"
    assert main(["ranks", str(dense), "--method", "loss", "--err", "0.5", "--calib-data", str(text), "--out",
                 str(out), *CAL]) == 0
    cli = json.loads(out.read_text())
    assert cli["components"] == api["components"] and cli["loss_weight"] == api["loss_weight"] == "fisher"
    assert cli["estimated_cost"] == pytest.approx(api["estimated_cost"], rel=1e-5)  # sdpa vs eager attention
    assert cli["calibration"]["tokens"] == 128 and cli["calibration"]["windows"] == "packed"
    small = spectra.compress(copy.deepcopy(model), api, calibration=cal, progress=False)
    assert small.spectra_whiten["whitened"] and small.spectra_whiten["calibration"]["tokens"] == 128
    assert main(["compress", str(dense), "--rank-map", str(out), "--whiten", "--calib-data", str(text),
                 "--out", str(tmp_path / "w"), *CAL]) == 0
    torch.testing.assert_close(logits(spectra.load_compressed(tmp_path / "w")), logits(small), atol=1e-5, rtol=0)
    plain = spectra.compress(copy.deepcopy(model), api, progress=False)
    assert (logits(plain) - logits(small)).abs().max() > 1e-4  # whitening changed the factors
    spectra.save_compressed(small, api, tmp_path / "api")
    assert json.loads((tmp_path / "api" / "spectra_rank_map.json").read_text())["whiten"]["whitened"]


def test_sweep_equals_the_sweep_command(saved, tmp_path):
    from spectra.data import load_tokenizer, text_windows
    from spectra.io.analysis_store import read_analysis

    model, dense, text = saved
    store = tmp_path / "a.zarr"
    assert main(["sweep", str(dense), "--eval-data", f"t={text}", "--methods", "welore,uniform", "--errs", "0.3,0.6",
                 "--err-by", "rank", "--variants", "plain", "--seq-len", "32", "--eval-tokens", "256",
                 "--analysis", str(store), "--device", "cpu"]) == 0  # no calibration needed: no --calib-data
    cli = read_analysis(store, "sweep")
    windows = text_windows(str(text), load_tokenizer("bytes"), 32, 256)
    api = spectra.sweep(model, {"t": windows}, methods=["welore", "uniform"], errs=[0.3, 0.6], err_by=["rank"],
                        variants=["plain"], progress=False)
    np.testing.assert_allclose(cli["ppl"].values, api["ppl"].values, rtol=1e-6)
    np.testing.assert_allclose(cli["dense_ppl"].values, api["dense_ppl"].values, rtol=1e-6)
    assert np.isfinite(api["ppl"].values).all() and (api["ppl"].values > api["dense_ppl"].values[0] * 0.9).all()
    rm = spectra.rank_map(model, 0.6, method="uniform")  # the table's row is that map's perplexity
    from spectra.lm.evaluate import perplexity

    ppl = perplexity(spectra.compress(copy.deepcopy(model), rm, progress=False), windows)[1]
    cell = {"method": "uniform", "variant": "plain", "err_by": "rank", "err": 0.6, "dataset": "t"}
    assert float(api["ppl"].sel(cell)) == pytest.approx(ppl, rel=1e-6)


def test_bad_input_is_one_spectra_error(saved):
    model, dense, _ = saved
    cal_ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    cases = [
        (lambda: spectra.rank_map(model, 1.5), "--err"),
        (lambda: spectra.rank_map(model, 0.5, method="magic"), "magic"),
        (lambda: spectra.rank_map(model, 0.5, method="loss"), "calibration"),
        (lambda: spectra.rank_map(model, 0.5, method="diagnostic"), "analysis"),
        (lambda: spectra.compress(copy.deepcopy(model), {"components": []}), "components"),
        (lambda: spectra.compress(copy.deepcopy(model), {"components": [{"layer": 0}]}), "entry 0"),
        (lambda: spectra.calibrate(model, torch.randn(2, 16)), "integer token-id"),
        (lambda: spectra.calibrate(model, cal_ids + 1000), "[0, 384)"),
        (lambda: spectra.calibrate(model, torch.zeros(0, 16, dtype=torch.long)), "shape"),
        (lambda: spectra.sweep(model, {"a": cal_ids}, methods=["welore"], errs=[0.5, 0.5], variants=["plain"]),
         "--errs lists 0.5"),
        (lambda: spectra.sweep(model, {"a": cal_ids}, methods=["loss"], errs=[0.5], variants=["plain"]),
         "calibration"),
        (lambda: spectra.save_compressed(model, spectra.rank_map(model, 0.0), "/nonexistent/x", tokenizer=3),
         "tokenizer"),
    ]
    for fn, fragment in cases:
        with pytest.raises(SpectraError) as e:
            fn()
        assert fragment in str(e.value) and "\n" not in str(e.value), (fragment, str(e.value))
