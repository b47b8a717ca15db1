"""A checkpoint is validated before it is used, once, in the input resolver (spectra.models.validate):
every tensor the config implies is present, of its shape and a floating dtype, in readable files;
a series is one architecture with one set of shapes; transformers never fills a weight at random.

Tiny checkpoints are built from transformers config classes and damaged with safetensors' own
load_file / save_file, so each test fails on code that does not validate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

import spectra.models.validate as validate
from spectra.cli import main
from spectra.errors import SpectraError
from spectra.io.sources import resolve
from spectra.models.loading import load_model, refuse_incomplete, stream_component_weights
from spectra.models.validate import check_series, stored_tensors, validate_checkpoint

Q = "model.layers.0.self_attn.q_proj.weight"
NORM = "model.layers.1.input_layernorm.weight"  # no component: the streamed paths never read it


def damage(src: Path, dst: Path, edit) -> Path:
    """A copy of the checkpoint `src` at `dst` whose state dict `edit` changed in place."""
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def gpt2(path: Path, n_embd: int = 64) -> Path:
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=n_embd, n_layer=2, n_head=4, vocab_size=384, n_positions=64)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("validation")
    make_tiny(vocab=384).save_pretrained(root / "good")  # the bytes tokenizer's 384 ids
    good = root / "good"
    out = {"root": root, "good": good}
    out["missing"] = damage(good, root / "missing", lambda sd: sd.pop(Q))
    out["missing_norm"] = damage(good, root / "missing_norm", lambda sd: sd.pop(NORM))
    out["shape"] = damage(good, root / "shape", lambda sd: sd.__setitem__(Q, sd[Q][:, :32].contiguous()))
    out["int8"] = damage(good, root / "int8", lambda sd: sd.__setitem__(Q, sd[Q].to(torch.int8)))
    out["nan"] = damage(good, root / "nan", lambda sd: sd[Q].__setitem__((0, 0), float("nan")))
    trunc = root / "trunc"
    shutil.copytree(good, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    out["trunc"] = trunc
    return out


# --------------------------------------------------------------------------- what passes
def test_good_checkpoints_pass_with_tied_and_unstored_tensors(w, tmp_path):
    sig = validate_checkpoint(w["good"])
    assert sig.architecture == "LlamaForCausalLM"
    assert dict(sig.shapes)[Q] == (64, 64) and "model.rotary_emb.inv_freq" not in dict(sig.shapes)
    # tied lm_head: stored once (under the embedding), accepted
    tied = make_tiny(vocab=384)
    tied.config.tie_word_embeddings = True
    tied.tie_weights()
    tied.save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in stored_tensors(tmp_path / "tied")[0]
    validate_checkpoint(tmp_path / "tied")
    g = gpt2(tmp_path / "gpt2")
    assert "lm_head.weight" not in stored_tensors(g)[0]
    assert validate_checkpoint(g).architecture == "GPT2LMHeadModel"
    # shards with an index, and pickled weights: the same signature as the single file
    make_tiny(vocab=384).save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert validate_checkpoint(tmp_path / "sharded") == sig
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(w["good"] / "config.json", pickled)
    torch.save(load_file(w["good"] / "model.safetensors"), pickled / "pytorch_model.bin")
    assert validate_checkpoint(pickled) == sig
    # the model load_model returns holds exactly the stored weights
    model = load_model(resolve(str(w["good"])))
    stored = load_file(w["good"] / "model.safetensors")
    for k, v in model.state_dict().items():
        if k in stored:
            assert torch.equal(v, stored[k]), k


def test_compressed_folder_is_checked_against_its_rank_map_structure(w, tmp_path):
    comp = tmp_path / "comp"
    assert main(["compress", str(w["good"]), "--err", "0.5", "--out", str(comp)]) == 0
    assert validate_checkpoint(comp) == validate_checkpoint(w["good"])  # same base architecture and shapes
    shards = sorted(comp.glob("model-*.safetensors"))
    lrc = next(e for e in json.loads((comp / "spectra_rank_map.json").read_text())["components"] if e["lrc"])
    key = next(k for f in shards for k in load_file(f) if k.endswith(".A.weight")
               and f".layers.{lrc['layer']}." in k)
    f = next(f for f in shards if key in load_file(f))
    sd = load_file(f)
    sd[key] = sd[key][:-1].contiguous()  # one rank fewer than the map says
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(SpectraError, match=rf"^{f}: {key} has shape \(\d+, \d+\) but the config and rank map imply"):
        resolve(str(comp))


# --------------------------------------------------------------------------- the commands refuse
def _argv(cmd: str, ckpt: Path, out: Path) -> list[str]:
    return {
        "spectrum": ["spectrum", str(ckpt), "--device", "cpu", "--out", str(out / "a.zarr")],
        "eval": ["eval", str(ckpt), "--device", "cpu", "--tokenizer", "bytes", "--seq-len", "32", "--tokens", "256",
                 "--out", str(out / "eval.jsonl")],
        "finetune": ["finetune", str(ckpt), "--device", "cpu", "--tokenizer", "bytes", "--out", str(out / "ft")],
        "ranks": ["ranks", str(ckpt), "--err", "0.5", "--out", str(out / "map.json")],
        "compress": ["compress", str(ckpt), "--err", "0.5", "--out", str(out / "comp")],  # streamed (safetensors)
    }[cmd]


def _one_error(argv, capsys) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("error: ")]
    assert code != 0 and len(lines) == 1 and "Traceback" not in err, (argv, code, err[-2000:])
    return lines[0]


@pytest.mark.parametrize("cmd", ["spectrum", "eval", "finetune", "ranks", "compress"])
def test_a_missing_weight_is_refused_by_every_command(w, cmd, tmp_path, capsys):
    """transformers' "newly initialized" path used to run: spectrum/eval/finetune went on with a random
    q_proj and the streamed compress wrote a folder."""
    err = _one_error(_argv(cmd, w["missing"], tmp_path), capsys)
    assert f"{w['missing'] / 'model.safetensors'}: {Q} is missing" in err, err
    assert not any(tmp_path.iterdir()), sorted(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("cmd", ["spectrum", "ranks", "compress"])
def test_a_missing_norm_is_refused_by_the_streamed_paths(w, cmd, tmp_path, capsys):
    """The streamed paths read only component weights; a missing norm used to pass them silently."""
    err = _one_error(_argv(cmd, w["missing_norm"], tmp_path), capsys)
    assert f"{NORM} is missing" in err, err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("cmd", ["spectrum", "ranks", "compress"])
def test_wrong_shape_and_int8_are_refused(w, cmd, tmp_path, capsys):
    err = _one_error(_argv(cmd, w["shape"], tmp_path), capsys)
    assert f"{w['shape'] / 'model.safetensors'}: {Q} has shape (64, 32) but the config implies (64, 64)" in err
    err = _one_error(_argv(cmd, w["int8"], tmp_path), capsys)
    assert f"{w['int8'] / 'model.safetensors'}: {Q} is stored as I8" in err, err
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- the API refuses
@pytest.mark.parametrize("how", ["resolve", "load_model", "stream"])
@pytest.mark.parametrize(
    "case, fragment",
    [
        ("missing", f"model.safetensors: {Q} is missing, but the config implies it"),
        ("shape", f"model.safetensors: {Q} has shape (64, 32) but the config implies (64, 64)"),
        ("int8", f"model.safetensors: {Q} is stored as I8 but the model needs floating-point weights"),
        ("trunc", "model.safetensors: not a readable safetensors file (SafetensorError"),
        ("nan", f"{Q} (layer 0 q) holds NaN or Inf values"),
    ],
)
def test_the_api_refuses_naming_file_and_tensor(w, how, case, fragment):
    if case == "nan" and how == "resolve":
        resolve(str(w["nan"]))  # finite values need the data: checked where weights are read, not here
        return
    call = {"resolve": lambda p: resolve(str(p)), "load_model": load_model,
            "stream": lambda p: list(stream_component_weights(p)[1])}[how]
    if case == "nan" and how == "load_model":
        fragment = f"tensor {Q} holds NaN or Inf values"
    with pytest.raises(SpectraError) as e:
        call(w[case])
    msg = str(e.value)
    assert "\n" not in msg and fragment in msg and msg.startswith(str(w[case])), msg


def test_load_model_never_keeps_a_newly_initialized_weight(w):
    """The loader's own guard, behind validation: transformers' loading info reporting a parameter
    missing (and not tied to a stored one) is refused."""
    model = make_tiny(vocab=384)
    with pytest.raises(SpectraError, match=f"{Q} is missing from the checkpoint"):
        refuse_incomplete(w["good"], model, {"missing_keys": {Q}})
    tied = make_tiny(vocab=384)
    tied.config.tie_word_embeddings = True
    tied.tie_weights()
    refuse_incomplete(w["good"], tied, {"missing_keys": {"lm_head.weight"}})  # tied to the stored embedding
    with pytest.raises(SpectraError, match="embed_tokens.weight is missing"):
        refuse_incomplete(w["good"], tied, {"missing_keys": {"lm_head.weight", "model.embed_tokens.weight"}})
    with pytest.raises(SpectraError, match=r"q_proj.weight has shape \(64, 32\) but the config implies \(64, 64\)"):
        refuse_incomplete(w["good"], model, {"mismatched_keys": [(Q, (64, 32), (64, 64))]})


def test_pickled_weights_are_checked_without_running_or_reading_them(w, tmp_path):
    bad = tmp_path / "pickled"
    bad.mkdir()
    shutil.copy(w["good"] / "config.json", bad)
    sd = load_file(w["good"] / "model.safetensors")
    sd[Q] = sd[Q][:, :32].contiguous()
    torch.save(sd, bad / "pytorch_model.bin")
    with pytest.raises(SpectraError, match=rf"pytorch_model.bin: {Q} has shape \(64, 32\)"):
        load_model(bad)


# --------------------------------------------------------------------------- series
def _series(root: Path, *members: Path) -> list[str]:
    out = []
    for i, m in enumerate(members, 1):
        shutil.copytree(m, root / f"step_{i}")
        out.append(str(root / f"step_{i}"))
    return out


def test_a_series_is_one_architecture_and_one_set_of_shapes(w, tmp_path):
    good = w["good"]
    assert [m.step for m in resolve(_series(tmp_path / "ok", good, good)).members] == [1, 2]
    # a member whose q_proj disagrees with its own config: its file and tensor are named
    paths = _series(tmp_path / "shape", good, w["shape"])
    with pytest.raises(SpectraError, match=rf"^{paths[1]}/model.safetensors: {Q} has shape \(64, 32\)"):
        resolve(paths)
    # LLaMA with GPT-2: each is valid, together they are not one model
    paths = _series(tmp_path / "mixed", good, gpt2(tmp_path / "g2"))
    with pytest.raises(SpectraError, match=rf"^series member {paths[1]} is a GPT2LMHeadModel but {paths[0]} is a "
                                           "LlamaForCausalLM"):
        resolve(paths)
    # a valid checkpoint of another size among two of one size: the odd one is named, wherever it is
    make_tiny(vocab=448).save_pretrained(tmp_path / "wide")
    paths = _series(tmp_path / "size", tmp_path / "wide", good, good)
    with pytest.raises(SpectraError, match=rf"^series member {paths[0]}: lm_head.weight has shape \(448, 64\) but in "
                                           rf"{paths[1]} it has shape \(384, 64\)"):
        resolve(paths)
    with pytest.raises(SpectraError, match="a series is checkpoints of one model"):
        check_series([("a", good), ("b", tmp_path / "g2")])


def test_spectrum_refuses_a_series_with_a_wrong_shape_member_and_keeps_its_store(w, tmp_path, capsys):
    out = tmp_path / "a.zarr"
    assert main(["spectrum", *_series(tmp_path / "ok", w["good"], w["good"]), "--out", str(out)]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    paths = _series(tmp_path / "bad", w["good"], w["shape"])
    err = _one_error(["spectrum", *paths, "--out", str(out)], capsys)
    assert f"{paths[1]}/model.safetensors: {Q} has shape (64, 32)" in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.xfail(strict=True, reason="spectrum resolves series members one by one (spectra.analysis.spectrum."
                                       "checkpoint_series) until its command resolves the series with resolve(paths)")
def test_spectrum_refuses_a_series_of_two_architectures(w, tmp_path, capsys):
    paths = _series(tmp_path / "mixed", w["good"], gpt2(tmp_path / "g2"))
    err = _one_error(["spectrum", *paths, "--out", str(tmp_path / "a.zarr")], capsys)
    assert f"series member {paths[1]} is a GPT2LMHeadModel" in err, err


# --------------------------------------------------------------------------- once
def test_validation_is_cached_until_a_file_changes(w, tmp_path, monkeypatch):
    ckpt = tmp_path / "c"
    shutil.copytree(w["good"], ckpt)
    calls = []
    real = validate._validate
    monkeypatch.setattr(validate, "_validate", lambda folder: calls.append(folder) or real(folder))
    for _ in range(3):
        resolve(str(ckpt))
    load_model(ckpt)
    list(stream_component_weights(ckpt)[1])
    assert len(calls) == 1
    sd = load_file(ckpt / "model.safetensors")
    sd[Q] = sd[Q][:, :32].contiguous()
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SpectraError, match="has shape"):
        resolve(str(ckpt))
    assert len(calls) == 2


def test_a_run_is_validated_when_its_model_is_needed(w, tmp_path, capsys):
    """A run's snapshot analyses need no model, so resolving it does not refuse a bad checkpoint; asking
    for the model (need_model, load_model, any command that loads it) does."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(w["missing"], run / "checkpoints" / "step_2")
    (run / "checkpoints" / "latest").write_text("step_2")
    (run / "run_config.json").write_text(json.dumps({"tokenizer": "bytes"}))
    src = resolve(str(run))
    assert src.kind == "run" and src.model_dir.name == "step_2"
    with pytest.raises(SpectraError, match=f"step_2/model.safetensors: {Q} is missing"):
        src.need_model()
    with pytest.raises(SpectraError, match=f"step_2/model.safetensors: {Q} is missing"):
        load_model(src)
    err = _one_error(_argv("eval", run, tmp_path / "out"), capsys)
    assert f"step_2/model.safetensors: {Q} is missing" in err, err
    with pytest.raises(SpectraError, match="is a series of 2 checkpoints; load its members one at a time"):
        load_model(resolve(_series(tmp_path / "s", w["good"], w["good"])))


@pytest.mark.parametrize("renamer", ["transformers", "fallback"])
def test_legacy_tensor_names_are_matched_as_transformers_loads_them(w, tmp_path, monkeypatch, renamer):
    """Hub checkpoints store names transformers renames on load: GPT-2's without the `transformer.`
    prefix, old BERTs' LayerNorm gamma/beta. They are valid, and a missing tensor is still found."""
    if renamer == "fallback":  # what transformers 4 (no conversion mapping) gets
        monkeypatch.setattr(validate, "get_model_conversion_mapping", None)
    validate._CACHE.clear()
    g = gpt2(tmp_path / "gpt2")
    sd = {k.removeprefix("transformer."): v for k, v in load_file(g / "model.safetensors").items()}
    save_file(sd, g / "model.safetensors", metadata={"format": "pt"})
    assert validate_checkpoint(g).architecture == "GPT2LMHeadModel"
    sd.pop("h.1.mlp.c_fc.weight")
    save_file(sd, g / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SpectraError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight is missing"):
        validate_checkpoint(g)
    torch.manual_seed(0)
    bert = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=128, max_position_embeddings=64)).save_pretrained(bert)
    sd = load_file(bert / "model.safetensors")
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
          for k, v in sd.items()}
    save_file(sd, bert / "model.safetensors", metadata={"format": "pt"})
    assert validate_checkpoint(bert).architecture == "BertForMaskedLM"
    key = "bert.encoder.layer.1.attention.output.LayerNorm.gamma"
    sd[key] = sd[key][:32].contiguous()
    save_file(sd, bert / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SpectraError, match=rf"{key} has shape \(32,\) but the config implies \(64,\)"):
        validate_checkpoint(bert)
    validate._CACHE.clear()
