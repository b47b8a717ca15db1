"""Bad input to ranks / compress / sweep, table-driven like tests/test_bad_inputs.py: each case exits non-zero with
exactly one `error:` line naming the file or flag (no traceback, no wrong result), and changes no file that existed.
Plus the cases whose right answer is a result: nothing written outside --out, sweep offline without --calib-data,
peft on a compressed model (tests/test_lowrank.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from conftest import assert_refused, make_tiny, train_steps, tree

from spectra.cli import main

COMPS = ["q", "k", "v", "o", "gate", "up", "down"]


def _write_signals(store: Path, hessian_step: int | None, subspace_steps: list[int], ckpt: Path) -> None:
    from spectra.io.analysis_store import write_analysis

    layers = [0, 1]
    ov = np.random.default_rng(0).uniform(0.1, 0.9, (len(subspace_steps), 2, len(COMPS)))
    write_analysis(store, "grad_subspace", xr.Dataset({"overlap_prev": (("step", "layer", "component"), ov)},
                                                      coords={"step": subspace_steps, "layer": layers,
                                                              "component": COMPS}), {"rank": 4})
    if hessian_step is not None:
        g = np.random.default_rng(1).uniform(0.1, 0.9, (2, len(COMPS)))
        write_analysis(store, "hessian_gap", xr.Dataset(
            {"rel_gap": (("layer", "component"), g), "gap": (("layer", "component"), g),
             "residuals": (("layer", "component", "eig"), np.zeros(g.shape + (2,)))},
            coords={"layer": layers, "component": COMPS, "eig": [1, 2]}), {"k": 1, "checkpoint": str(ckpt)})


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> dict:
    """A run with checkpoints at steps 50 and 150 (latest), its analysis at step 150, calibration text,
    a compressed folder, rank-map files of every kind of wrong, an int8 checkpoint and another model."""
    import torch
    from safetensors.torch import load_file, save_file

    import spectra

    root = tmp_path_factory.mktemp("badc")
    run = root / "run"
    model = train_steps(make_tiny(vocab=384), 4, vocab=256)
    for step in (50, 150):
        model.save_pretrained(run / "checkpoints" / f"step_{step}")
    (run / "checkpoints" / "latest").write_text("step_150")
    (run / "run_config.json").write_text(json.dumps({"tokenizer": "bytes"}))
    _write_signals(run / "analysis.zarr", 150, [10, 50, 100, 150], run / "checkpoints" / "step_150")
    _write_signals(root / "late.zarr", None, [100, 150], run / "checkpoints" / "step_150")
    docs = root / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": f"Document {i}: low-rank weights emerge from low-rank gradients."})
                              for i in range(80)))
    rmap = spectra.rank_map(model, 0.5)
    assert main(["compress", str(run), "--rank-map", _map(root, "good", rmap), "--out", str(root / "comp")]) == 0
    int8 = root / "int8"
    shutil.copytree(run / "checkpoints" / "step_150", int8)
    sd = load_file(int8 / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.weight"] = (sd["model.layers.0.self_attn.q_proj.weight"] * 100).to(torch.int8)
    save_file(sd, int8 / "model.safetensors", metadata={"format": "pt"})
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=384, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4)).save_pretrained(root / "other")

    def edit(name: str, fn) -> str:
        m = json.loads(json.dumps(rmap))
        fn(m)
        return _map(root, name, m)

    def entry(**kw):
        return lambda m: m["components"][0].update(kw)

    maps = {
        "true": edit("true", entry(rank=True)),
        "float": edit("float", entry(rank=2.5)),
        "big": edit("big", entry(rank=500)),
        "huge": edit("huge", entry(rank=1e30)),
        "lrc": edit("lrc", entry(lrc="yes")),
        "layer": edit("layer", entry(layer=-1)),
        "layerstr": edit("layerstr", entry(layer="0")),
        "comp": edit("comp", entry(component="qq")),
        "shape": edit("shape", entry(shape=[64])),
        "full": edit("full", entry(full_rank=500, rank=500)),
        "dup": edit("dup", lambda m: m["components"].append({**m["components"][0], "rank": 3})),
        "nolayer": edit("nolayer", lambda m: m["components"][0].pop("rank")),
        "extra": edit("extra", lambda m: m["components"].append({**m["components"][0], "layer": 99})),
        "missing": edit("missing", lambda m: m["components"].pop()),
        "empty": edit("empty", lambda m: m.update(components=[])),
        "other": edit("other", lambda m: [e.update(shape=[e["shape"][0] * 2, e["shape"][1] * 2],
                                                   full_rank=2 * e["full_rank"]) for e in m["components"]]),
    }
    inf = root / "map-inf.json"  # JSON's 1e999 reads as infinity
    inf.write_text(Path(maps["float"]).read_text().replace('"rank": 2.5', '"rank": 1e999', 1))
    maps["inf"] = str(inf)
    (root / "map-list.json").write_text("[1, 2]")
    maps["list"] = str(root / "map-list.json")
    return {"root": root, "run": run, "docs": docs, "maps": maps, "model": model}


def _map(root: Path, name: str, m: dict) -> str:
    p = root / f"map-{name}.json"
    p.write_text(json.dumps(m))
    return str(p)


def _cases(w) -> list[tuple[list[str], str]]:
    r, run, docs, maps = w["root"], str(w["run"]), str(w["docs"]), w["maps"]
    step50 = str(w["run"] / "checkpoints" / "step_50")

    def comp(name):
        return ["compress", run, "--rank-map", maps[name], "--out", str(r / f"out-{name}")]

    sw = ["sweep", run, "--eval-data", f"d={docs}", "--methods", "welore", "--variants", "plain", "--errs", "0.5",
          "--err-by", "rank", "--seq-len", "32", "--eval-tokens", "256", "--device", "cpu"]
    loss = ["ranks", run, "--method", "loss", "--calib-data", docs, "--calib-seqs", "4", "--calib-seq-len", "32",
            "--out", str(r / "l.json")]
    return [
        # rank maps: integer ranks in [1, full rank], no duplicates, names that exist; the file and entry named
        (comp("true"), "map-true.json: entry 0 (layer 0 'q'): rank must be an integer in [1, 64]"),
        (comp("float"), "map-float.json: entry 0 (layer 0 'q'): rank must be an integer in [1, 64] (the full rank), "
                        "not 2.5"),
        (comp("big"), "map-big.json: entry 0 (layer 0 'q'): rank must be an integer in [1, 64] (the full rank), "
                      "not 500"),
        (comp("huge"), "map-huge.json: entry 0 (layer 0 'q'): rank must be an integer"),
        (comp("inf"), "map-inf.json: entry 0 (layer 0 'q'): rank must be an integer in [1, 64] (the full rank), "
                      "not inf"),
        (comp("dup"), "map-dup.json: entry 14 (layer 0 'q'): layer 0 q is listed twice"),
        (comp("comp"), "map-comp.json: entry 0 (layer 0 'qq'): unknown component 'qq'"),
        (comp("extra"), "map-extra.json names 1 matrices this model does not have, e.g. layer 99 q"),
        (comp("missing"), "map-missing.json does not fit this model: missing 1 of its matrices, e.g. layer 1 down"),
        (comp("other"), "map-other.json: layer 0 q has shape [128, 128], the model's is [64, 64]"),
        (comp("lrc"), "map-lrc.json: entry 0 (layer 0 'q'): lrc must be true or false"),
        (comp("layer"), "map-layer.json: entry 0 (layer -1 'q'): layer must be an integer >= 0"),
        (comp("layerstr"), "map-layerstr.json: entry 0 (layer '0' 'q'): layer must be an integer"),
        (comp("shape"), "map-shape.json: entry 0 (layer 0 'q'): shape must be [out, in]"),
        (comp("full"), "map-full.json: entry 0 (layer 0 'q'): full_rank must be min(shape) = 64, not 500"),
        (comp("nolayer"), "map-nolayer.json: entry 0 (layer 0 'q') needs layer, component, shape"),
        (comp("empty"), "map-empty.json is not a spectra rank map"),
        (comp("list"), "map-list.json does not hold a JSON object"),
        (["compress", str(r / "other"), "--rank-map", maps["big"], "--out", str(r / "o1")], "map-big.json"),
        # weights compress cannot use
        (["compress", str(r / "int8"), "--out", str(r / "o2")], "q_proj.weight is stored as I8"),
        (["compress", str(r / "int8"), "--whiten", "--calib-data", docs, "--out", str(r / "o3")],
         "q_proj.weight is stored as I8"),
        (["ranks", str(r / "int8"), "--out", str(r / "o4.json")], "stored as"),
        # diagnostics of another step
        (["ranks", step50, "--method", "diagnostic", "--out", str(r / "d.json")],
         "hessian_gap was computed at step 150, not at this checkpoint's step 50"),
        (["ranks", step50, "--method", "diagnostic", "--analysis", str(r / "late.zarr"), "--out", str(r / "d.json")],
         "grad_subspace starts at step 100"),
        (["ranks", run, "--method", "diagnostic", "--analysis", str(r / "nope.zarr")], "--analysis"),
        # options of ranks / compress
        ([*loss, "--calib-data", str(r / "nope.jsonl")], "--calib-data"),
        ([*loss, "--calib-seqs", "0"], "--calib-seqs"),
        ([*loss, "--calib-seq-len", "100000"], "--calib-seq-len 100000 exceeds the model's"),
        ([*loss, "--loss-weight", "magic"], "--loss-weight"),
        ([*loss, "--damping", "-1"], "--damping"),
        (["ranks", run, "--err", "1.0"], "--err must be in [0, 1)"),
        (["ranks", str(r / "comp")], "already compressed"),
        (["ranks", run, "--out", str(w["run"] / "run_config.json" / "m.json")], "which is a file, not a folder"),
        (["compress", run, "--err", "0.5"], "--out"),
        (["compress", run, "--err", "1.0", "--out", str(r / "o5")], "--err must be in [0, 1)"),
        (["compress", str(r / "comp"), "--out", str(r / "o6")], "already compressed"),
        (["compress", run, "--merge", "--out", str(r / "o7")], "not a compressed model"),
        (["compress", run, "--out", str(w["docs"] / "c")], "which is a file, not a folder"),
        (["compress", run, "--whiten", "--calib-data", docs, "--calib-seq-len", "100000", "--out", str(r / "o8")],
         "--calib-seq-len 100000 exceeds"),
        # sweep
        ([*sw, "--errs", "0.5,0.5"], "--errs lists 0.5 more than once"),
        ([*sw, "--errs", "0.5,1.0"], "--errs must each lie in (0, 1)"),
        ([*sw, "--methods", "welore,welore"], "--methods lists welore more than once"),
        ([*sw, "--variants", "plain,plain"], "--variants lists plain more than once"),
        ([*sw, "--err-by", "rank,rank"], "--err-by lists rank more than once"),
        ([*sw, "--methods", "loss"], "--methods loss needs --calib-data"),
        ([*sw, "--variants", "whitened"], "--variants whitened needs --calib-data"),
        ([*sw, "--analysis", str(docs)], "--analysis"),
    ]


N_CASES = 47


def test_table_size(w):
    assert len(_cases(w)) == N_CASES


@pytest.mark.parametrize("i", range(N_CASES))
def test_bad_input_is_one_error_line_and_touches_nothing(w, i, capsys):
    argv, fragment = _cases(w)[i]
    assert_refused(argv, w["root"], capsys, fragment)



def test_nothing_is_written_outside_out(w, tmp_path):
    """ranks with --out writes that file only: no ranks/ group and no calibration in the run's analysis store."""
    before = tree(w["run"])
    out = tmp_path / "u.json"
    assert main(["ranks", str(w["run"]), "--method", "uniform", "--err", "0.3", "--out", str(out)]) == 0
    assert main(["ranks", str(w["run"]), "--method", "loss", "--err", "0.3", "--calib-data", str(w["docs"]),
                 "--calib-seqs", "4", "--calib-seq-len", "32", "--out", str(tmp_path / "l.json")]) == 0
    assert main(["compress", str(w["run"]), "--whiten", "--calib-data", str(w["docs"]), "--calib-seqs", "4",
                 "--calib-seq-len", "32", "--out", str(tmp_path / "c")]) == 0
    assert json.loads(out.read_text())["method"] == "uniform" and (tmp_path / "c" / "config.json").is_file()
    assert tree(w["run"]) == before
    # without --out, the run's defaults: the map in <run>/ranks and its group in the run's store
    assert main(["ranks", str(w["run"]), "--method", "uniform", "--err", "0.3"]) == 0
    from spectra.io.analysis_store import read_analysis

    assert read_analysis(w["run"] / "analysis.zarr", "ranks/uniform-err30")["rank"].size == 14
    shutil.rmtree(w["run"] / "ranks")


def test_diagnostic_uses_the_checkpoints_own_step(w, tmp_path):
    """At the step the store was computed at, the map is made; on an earlier checkpoint the subspace is averaged
    over the snapshots up to its step only (here: with no Hessian group to contradict it)."""
    from spectra.compression.diagnostics import diagnostic_scores

    run = w["run"]
    assert main(["ranks", str(run / "checkpoints" / "step_150"), "--method", "diagnostic", "--out",
                 str(tmp_path / "d.json")]) == 0
    assert json.loads((tmp_path / "d.json").read_text())["method"] == "diagnostic"
    store = tmp_path / "sub.zarr"
    _write_signals(store, None, [10, 50, 100, 150], run / "checkpoints" / "step_150")
    keys = [(l, c) for l in (0, 1) for c in COMPS]
    at50, at150 = diagnostic_scores(store, keys, 50), diagnostic_scores(store, keys, 150)
    ov = xr.open_zarr(store, group="grad_subspace")["overlap_prev"]
    want = ov.sel(step=[10, 50]).mean("step").values.reshape(-1)  # layer-major like keys
    order = np.argsort(np.argsort(want))
    np.testing.assert_allclose(at50, order / (len(keys) - 1))
    assert not np.allclose(at50, at150)


def test_sweep_offline_without_calib_data(w, tmp_path, monkeypatch, capsys):
    """Maps and truncation that need no calibration run offline without --calib-data (they used to fetch hub C4
    and fail naming --data); a loss map without calibration text names --calib-data, never --data."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    store = tmp_path / "a.zarr"
    assert main(["sweep", str(w["run"]), "--eval-data", f"d={w['docs']}", "--methods", "welore", "--variants", "plain",
                 "--errs", "0.5", "--err-by", "rank", "--seq-len", "32", "--eval-tokens", "256", "--analysis",
                 str(store), "--device", "cpu"]) == 0
    from spectra.io.analysis_store import read_analysis

    ds = read_analysis(store, "sweep")
    assert np.isfinite(ds["ppl"].values).all() and ds["ppl"].shape == (1, 1, 1, 1, 1)
    assert ds.attrs["calibration"] is None  # none was needed, none computed
    capsys.readouterr()
    assert main(["ranks", str(w["run"]), "--method", "loss", "--out", str(tmp_path / "l.json")]) == 2
    err = capsys.readouterr().err
    assert "--calib-data" in err and " --data" not in err, err
