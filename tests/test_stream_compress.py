"""Streaming compress (spectra.compression.stream): equal to the in-memory path, one decomposition per
matrix, at most ~2 layers resident, sharded input, the derived map equal to `spectra ranks`' map."""

from __future__ import annotations

import json
import weakref

import numpy as np
import pytest
import torch
from conftest import assert_one_error_line
from safetensors import safe_open

from spectra.cli import main
from spectra.compression import stream as sc
from spectra.compression.lowrank import compress
from spectra.compression.rankmap import RANK_MAP_FILE
from spectra.errors import SpectraError
from spectra.models.compressed import load_compressed, save_compressed

X = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def llama(layers: int = 3, hidden: int = 32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=88, num_attention_heads=2,
                      num_key_value_heads=1, num_hidden_layers=layers, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "dense"
    llama().save_pretrained(path)
    return path


def tensors(folder) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for f in set(index.values()):
        with safe_open(folder / f, "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def logits(model):
    with torch.no_grad():
        return model(input_ids=X).logits


def in_memory(ckpt, rank_map, out):
    from spectra.models.loading import load_model

    model = load_model(ckpt)
    compress(model, rank_map, progress=False)
    save_compressed(model, rank_map, out)
    return model


def assert_same_weights(a: dict, b: dict) -> None:
    """Same tensor names; dense tensors equal, factors equal as products B·A (their signs are free)."""
    assert set(a) == set(b)
    for k in a:
        if k.endswith(".A.weight"):
            pk = k[: -len("A.weight")] + "B.weight"
            torch.testing.assert_close(a[pk].float() @ a[k].float(), b[pk].float() @ b[k].float(), atol=1e-5, rtol=0)
            # √σ on both sides, whatever the signs: A·Aᵀ = diag(σ) = Bᵀ·B
            torch.testing.assert_close(a[k] @ a[k].T, b[k] @ b[k].T, atol=1e-5, rtol=0)
        elif not k.endswith(".B.weight"):
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- equality
def test_streaming_equals_in_memory_and_loads_everywhere(ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    rank_map, counts = sc.stream_compress(ckpt, tmp_path / "s", progress=False)  # map derived in the same pass
    assert json.loads((tmp_path / "s" / RANK_MAP_FILE).read_text()) == rank_map
    lrc = [e["lrc"] for e in rank_map["components"]]
    assert any(lrc) and not all(lrc)  # both kinds, N-LRCs truncated (rank ERR)
    assert any(not e["lrc"] and e["rank"] < e["full_rank"] for e in rank_map["components"])
    ref = in_memory(ckpt, rank_map, tmp_path / "m")
    assert_same_weights(tensors(tmp_path / "s"), dict(ref.state_dict()))
    assert counts["linear_after"] == sum(
        v.numel() for k, v in ref.state_dict().items() if "layers." in k and "_proj" in k
    )
    want = logits(ref)
    torch.testing.assert_close(logits(load_compressed(tmp_path / "s")), want, atol=1e-5, rtol=0)
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "s", trust_remote_code=True).eval()
    torch.testing.assert_close(logits(remote), want, atol=1e-5, rtol=0)
    conf = json.loads((tmp_path / "s" / "config.json").read_text())
    assert conf == json.loads((tmp_path / "m" / "config.json").read_text())
    assert not (tmp_path / "s" / sc.STAGING).exists()


@pytest.mark.parametrize("method", ["welore", "uniform", "energy"])
def test_derived_map_equals_the_ranks_command(ckpt, tmp_path, method):
    assert main(["ranks", str(ckpt), "--method", method, "--err", "0.4", "--out", str(tmp_path / "r.json")]) == 0
    derived, _ = sc.stream_compress(ckpt, tmp_path / "s", method=method, err=0.4, progress=False)
    ranked = json.loads((tmp_path / "r.json").read_text())
    assert derived["components"] == ranked["components"]
    assert derived["achieved_err"] == pytest.approx(ranked["achieved_err"], abs=1e-12)


def test_sigma_and_factors_match_a_float64_svd():
    torch.manual_seed(0)
    for shape in ((40, 24), (24, 40), (32, 32)):
        W = torch.randn(*shape) @ torch.diag(torch.logspace(0, -3, shape[1]))  # small σ matter for the map
        U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        e = sc.decompose(W)
        np.testing.assert_allclose(e.sigma.numpy(), S.numpy(), rtol=0, atol=1e-12 * S[0].item())
        for r in (3, 12, 20):
            A, B = sc.factors(W, e, r)
            exact = (U[:, :r] * S[:r]) @ Vh[:r]
            torch.testing.assert_close((B @ A).double(), exact, atol=2e-6, rtol=0)
            torch.testing.assert_close(sc.truncated(W, e, r).double(), exact, atol=2e-6, rtol=0)


def test_sharded_input_and_bfloat16(ckpt, tmp_path):
    model = llama()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    rm, _ = sc.stream_compress(tmp_path / "sharded", tmp_path / "a", progress=False)
    rm1, _ = sc.stream_compress(ckpt, tmp_path / "b", progress=False)
    assert rm == rm1
    assert_same_weights(tensors(tmp_path / "a"), tensors(tmp_path / "b"))
    sc.stream_compress(tmp_path / "sharded", tmp_path / "h", rank_map=rm, dtype=torch.bfloat16, progress=False)
    out = tensors(tmp_path / "h")
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    ref = in_memory(ckpt, rm, tmp_path / "m")
    got = load_compressed(tmp_path / "h", dtype=torch.float32)
    assert (logits(got) - logits(ref)).abs().max() < 0.05  # bf16 rounding of every weight


# --------------------------------------------------------------------------- work and memory
def test_each_matrix_is_decomposed_once(ckpt, tmp_path, monkeypatch):
    calls: list[tuple] = []
    real = sc.decompose
    monkeypatch.setattr(sc, "decompose", lambda W, device=None: calls.append(tuple(W.shape)) or real(W, device))
    rm, _ = sc.stream_compress(ckpt, tmp_path / "a", progress=False)
    assert len(calls) == len(rm["components"]) == 3 * 7  # pass 1 only; pass 2 slices the spilled vectors
    assert sorted(calls) == sorted(tuple(e["shape"]) for e in rm["components"])
    calls.clear()
    sc.stream_compress(ckpt, tmp_path / "b", rank_map=rm, progress=False)  # a given map: only what it cuts
    cut = [e for e in rm["components"] if e["lrc"] or e["rank"] < e["full_rank"]]
    assert len(calls) == len(cut) < len(rm["components"]) + 1
    full = dict(rm, components=[dict(e, rank=e["full_rank"], lrc=False) for e in rm["components"]])
    calls.clear()
    sc.stream_compress(ckpt, tmp_path / "c", rank_map=full, progress=False)
    assert calls == []  # nothing cut: tensors copied through
    torch.testing.assert_close(logits(load_compressed(tmp_path / "c")), logits(llama()), atol=1e-6, rtol=0)


def test_at_most_two_layers_are_resident(tmp_path, monkeypatch):
    """Every tensor the reader hands out is tracked until it is freed (weakref.finalize): the source
    tensors alive at once never exceed one layer's, and each layer's output goes to disk as its own
    shard before the next layer is read -- together at most ~2 layers, of an 8-layer model."""
    import threading

    llama(layers=8, hidden=48).save_pretrained(tmp_path / "d")
    layer = sum(t.numel() * 4 for t in llama(layers=1, hidden=48).model.layers[0].parameters())
    live, peak, lock = [0], [0], threading.Lock()
    real = sc.Checkpoint.read

    def freed(n):
        with lock:
            live[0] -= n

    def read(self, keys, dtype=None):
        out = real(self, keys, dtype)
        with lock:
            for t in out.values():
                n = t.untyped_storage().nbytes()
                live[0] += n
                weakref.finalize(t, freed, n)
            peak[0] = max(peak[0], live[0])
        return out

    monkeypatch.setattr(sc.Checkpoint, "read", read)
    sc.stream_compress(tmp_path / "d", tmp_path / "o", progress=False)
    model_bytes = sum(f.stat().st_size for f in (tmp_path / "d").glob("*.safetensors"))
    assert model_bytes > 8 * layer
    assert 0.1 * layer < peak[0] <= layer, peak[0] / layer
    shards = sorted((tmp_path / "o").glob("model-*.safetensors"))
    assert len(shards) == 9 and all(f.stat().st_size < 1.05 * layer for f in shards[:-1])


# --------------------------------------------------------------------------- bad input
def test_bad_input_is_one_line_and_writes_nothing(ckpt, tmp_path, capsys):
    sharded = tmp_path / "sharded"
    llama().save_pretrained(sharded, max_shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    (sharded / sorted(set(index["weight_map"].values()))[-1]).unlink()
    other = tmp_path / "other"
    llama(hidden=48).save_pretrained(other)
    rm, _ = sc.stream_compress(ckpt, tmp_path / "first", progress=False)
    (tmp_path / "map.json").write_text(json.dumps(rm))
    cases = [["compress", str(sharded), "--out", str(tmp_path / "o1")],
             ["compress", str(other), "--rank-map", str(tmp_path / "map.json"), "--out", str(tmp_path / "o2")],
             ["compress", str(ckpt), "--method", "diagnostic", "--out", str(tmp_path / "o3")]]
    assert_one_error_line(cases, capsys)
    for o in ("o1", "o2", "o3"):
        assert not (tmp_path / o).exists() or not any((tmp_path / o).iterdir())
    with pytest.raises(SpectraError, match="does not fit|shape"):
        sc.stream_compress(other, tmp_path / "o4", rank_map=rm, progress=False)


def test_a_failure_midway_leaves_no_partial_folder(ckpt, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise SpectraError("disk full")

    monkeypatch.setattr(sc, "write_metadata", boom)
    with pytest.raises(SpectraError, match="disk full"):
        sc.stream_compress(ckpt, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_a_nan_in_a_copied_through_tensor_is_refused(ckpt, tmp_path):
    """Embeddings and norms are copied through unchanged, so a NaN there would be published: refused, naming it."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan"
    shutil.copytree(ckpt, bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.embed_tokens.weight"][3, 0] = float("nan")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SpectraError, match="embed_tokens"):
        sc.stream_compress(bad, tmp_path / "out", err=0.5, progress=False)
    assert not (tmp_path / "out" / "config.json").exists()


# --------------------------------------------------------------------------- compensated, streamed
CAL = torch.randint(0, 128, (12, 24), generator=torch.Generator().manual_seed(2))


def tiny_decoder(kind: str, path):
    """A seeded 3-layer decoder of the LLaMA family (GQA, untied head), saved in several shards."""
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    if kind == "llama":
        model = llama()
    else:
        torch.manual_seed(0)
        cls = {"mistral": MistralConfig, "qwen2": Qwen2Config}[kind]
        model = AutoModelForCausalLM.from_config(cls(
            vocab_size=128, hidden_size=32, intermediate_size=88, num_attention_heads=2, num_key_value_heads=1,
            num_hidden_layers=3, tie_word_embeddings=False)).eval()
    model.save_pretrained(path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


@pytest.mark.parametrize("how,kind", [("sequential", "tiny"), ("refit", "tiny"), ("sequential", "llama"),
                                      ("refit", "mistral"), ("sequential", "qwen2")])
def test_streamed_compensation_equals_in_memory(tiny_ckpt, tmp_path, how, kind, one_thread):
    from spectra.models.loading import load_model

    src = tiny_ckpt if kind == "tiny" else tiny_decoder(kind, tmp_path / "dense")
    rm, counts = sc.stream_compress(src, tmp_path / "s", err=0.5, compensation=how, batches=CAL, batch_size=4,
                                    progress=False)
    dense = load_model(src).eval()
    ref = compress(load_model(src), rm, compensation=how, batches=CAL, batch_size=4, progress=False).eval()
    got = load_compressed(tmp_path / "s")
    with torch.no_grad():
        want, have, base = (m(input_ids=CAL).logits for m in (ref, got, dense))
    assert float((have - want).norm() / want.norm()) < 1e-5
    assert float((want - base).norm() / base.norm()) > 1e-3  # it did compress: the check above can fail
    saved = json.loads((tmp_path / "s" / RANK_MAP_FILE).read_text())
    assert saved["whiten"] == ref.spectra_whiten and saved["whiten"]["calibration"]["tokens"] == CAL.numel()
    assert {k: v for k, v in saved.items() if k != "whiten"} == rm
    assert counts["linear_after"] == sum(v.numel() for k, v in ref.state_dict().items()
                                         if "layers." in k and "_proj" in k)
    assert counts["total_after"] == sum(v.numel() for v in tensors(tmp_path / "s").values())
    # not the plain (uncompensated) factors of the same map
    plain = compress(load_model(src), rm, progress=False).eval()
    with torch.no_grad():
        assert float((plain(input_ids=CAL).logits - want).norm() / want.norm()) > 1e-4
    assert not (tmp_path / "s" / sc.STAGING).exists()


def test_streamed_compensation_refusals(tmp_path, capsys, one_thread):
    from transformers import GPT2Config, GPT2LMHeadModel

    from spectra.compression.sequential import STREAMED_ARCHITECTURES

    torch.manual_seed(0)
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=384, n_embd=32, n_layer=2, n_head=2, n_positions=64)).save_pretrained(gpt2)
    line = ", ".join(STREAMED_ARCHITECTURES)
    with pytest.raises(SpectraError, match=f"streamed compensation supports {line} decoders, not 'gpt2'"):
        sc.stream_compress(gpt2, tmp_path / "o1", compensation="sequential", batches=CAL, progress=False)
    llama_dir = tiny_decoder("llama", tmp_path / "dense")
    with pytest.raises(SpectraError, match="one of sequential, refit"):
        sc.stream_compress(llama_dir, tmp_path / "o2", compensation="magic", batches=CAL, progress=False)
    with pytest.raises(SpectraError, match="needs calibration token batches"):
        sc.stream_compress(llama_dir, tmp_path / "o3", compensation="refit", progress=False)
    with pytest.raises(SpectraError, match="token ids"):
        sc.stream_compress(llama_dir, tmp_path / "o4", compensation="refit", batches=CAL.float(), progress=False)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
    # the command compresses the loaded model instead (the in-memory compensation runs any architecture)
    text = tmp_path / "calib.jsonl"
    text.write_text("\n".join(json.dumps({"text": f"The {i}th sentence of calibration text."}) for i in range(20)))
    out = tmp_path / "o5"
    assert main(["compress", str(gpt2), "--compensate", "refit", "--calib-data", str(text), "--calib-seqs", "4",
                 "--calib-seq-len", "32", "--tokenizer", "bytes", "--err", "0.5", "--out", str(out)]) == 0
    assert json.loads((out / RANK_MAP_FILE).read_text())["whiten"]["compensation"] == "refit"


def test_streamed_compensation_holds_one_layer_of_weights(tmp_path, monkeypatch, one_thread):
    """The checkpoint tensors alive at once (tracked until freed, as above) never exceed one decoder layer's,
    of a 6-layer model: the embeddings are freed once the windows reached the first layer, each layer once
    written; the output head is read only to be copied through at the end."""
    import threading

    llama(layers=6, hidden=48).save_pretrained(tmp_path / "d")
    layer = sum(t.numel() * 4 for t in llama(layers=1, hidden=48).model.layers[0].parameters())
    live, peak, lock, heads = [0], [0], threading.Lock(), []
    real = sc.Checkpoint.read

    def freed(n):
        with lock:
            live[0] -= n

    def read(self, keys, dtype=None):
        out = real(self, keys, dtype)
        with lock:
            heads.append("lm_head.weight" in out)
            for t in out.values():
                n = t.untyped_storage().nbytes()
                live[0] += n
                weakref.finalize(t, freed, n)
            peak[0] = max(peak[0], live[0])
        return out

    monkeypatch.setattr(sc.Checkpoint, "read", read)
    sc.stream_compress(tmp_path / "d", tmp_path / "o", err=0.5, compensation="sequential", batches=CAL[:4],
                       progress=False)
    assert 0.9 * layer < peak[0] <= layer, peak[0] / layer
    assert heads[-1] and not any(heads[:-1])  # copied through at the end, never materialized for the forward
