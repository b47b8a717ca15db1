"""Damaged checkpoints, table-driven, through every command that reads a model: each case exits non-zero
with exactly one `error:` line naming the file (and the tensor, where one is at fault), no traceback,
and no file that existed before the case changed (nothing new left behind either).

The checkpoints are tiny models built from transformers config classes, damaged with safetensors'
load_file / save_file, torch.save or plain file edits; the data is a small local jsonl file."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import assert_refused, make_tiny
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from spectra.cli import main

Q = "model.layers.0.self_attn.q_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"
NORM = "model.layers.1.input_layernorm.weight"
EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
C_ATTN = "transformer.h.0.attn.c_attn.weight"


def _edit_weights(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def run(folder: Path) -> None:
        sd = load_file(folder / "model.safetensors")
        edit(sd)
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    return run


def _edit_config(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def run(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        out = edit(cfg)
        (folder / "config.json").write_text(out if isinstance(out, str) else json.dumps(cfg))
    return run


def _truncate(name: str, keep: float | int) -> Callable[[Path], None]:
    def run(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    return run


def _shard(folder: Path) -> None:  # one checkpoint saved again as shards with an index
    model = make_tiny(vocab=384)
    (folder / "model.safetensors").unlink()
    model.save_pretrained(folder, max_shard_size="100KB")


def _index_names_missing_shard(folder: Path) -> None:
    _shard(folder)
    sorted(folder.glob("model-*.safetensors"))[-1].unlink()


def _index_misplaces(folder: Path) -> None:
    _shard(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"][Q] = next(s for s in shards if s != index["weight_map"][Q])
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _pickled(edit: Callable[[dict], None] | None, truncate: bool = False) -> Callable[[Path], None]:
    def run(folder: Path) -> None:
        sd = load_file(folder / "model.safetensors")
        (folder / "model.safetensors").unlink()
        if edit:
            edit(sd)
        torch.save(sd, folder / "pytorch_model.bin")
        if truncate:
            _truncate("pytorch_model.bin", 0.5)(folder)
    return run


# name -> (damage applied to a copy of the good LLaMA checkpoint, the file named, the tensor named or None)
DAMAGE: dict[str, tuple[Callable[[Path], None], str, str | None]] = {
    "missing-q": (_edit_weights(lambda sd: sd.pop(Q)), "model.safetensors", Q),
    "missing-norm": (_edit_weights(lambda sd: sd.pop(NORM)), "model.safetensors", NORM),
    "missing-head": (_edit_weights(lambda sd: sd.pop(HEAD)), "model.safetensors", HEAD),
    "missing-embed": (_edit_weights(lambda sd: sd.pop(EMBED)), "model.safetensors", EMBED),
    "q-64x32": (_edit_weights(lambda sd: sd.__setitem__(Q, sd[Q][:, :32].contiguous())), "model.safetensors", Q),
    "down-transposed": (_edit_weights(lambda sd: sd.__setitem__(DOWN, sd[DOWN].t().contiguous())),
                        "model.safetensors", DOWN),
    "q-scalar": (_edit_weights(lambda sd: sd.__setitem__(Q, torch.tensor(1.0))), "model.safetensors", Q),
    "q-int8": (_edit_weights(lambda sd: sd.__setitem__(Q, sd[Q].to(torch.int8))), "model.safetensors", Q),
    "norm-bool": (_edit_weights(lambda sd: sd.__setitem__(NORM, sd[NORM] > 0)), "model.safetensors", NORM),
    "embed-int64": (_edit_weights(lambda sd: sd.__setitem__(EMBED, sd[EMBED].long())), "model.safetensors", EMBED),
    "truncated": (_truncate("model.safetensors", 0.5), "model.safetensors", None),
    "header-only": (_truncate("model.safetensors", 8), "model.safetensors", None),
    "empty-file": (_truncate("model.safetensors", 0), "model.safetensors", None),
    "garbage": (lambda f: (f / "model.safetensors").write_bytes(b"\x10" * 4096), "model.safetensors", None),
    "config-not-json": (_edit_config(lambda c: "{not json"), "config.json", None),
    "config-a-list": (_edit_config(lambda c: "[1, 2]"), "config.json", None),
    "config-wider": (_edit_config(lambda c: c.update(hidden_size=128, head_dim=32)), "model.safetensors", HEAD),
    "config-3-layers": (_edit_config(lambda c: c.update(num_hidden_layers=3)), "model.safetensors",
                        "model.layers.2."),
    "config-quantized": (_edit_config(lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4})),
                         "config.json", None),
    "index-missing-shard": (_index_names_missing_shard, "model-", None),
    "index-misplaces": (_index_misplaces, "model-", Q),
    "index-not-json": (lambda f: (_shard(f), (f / "model.safetensors.index.json").write_text("{")),
                       "model.safetensors.index.json", None),
    "pickled-missing": (_pickled(lambda sd: sd.pop(Q)), "pytorch_model.bin", Q),
    "pickled-64x32": (_pickled(lambda sd: sd.__setitem__(Q, sd[Q][:, :32].contiguous())), "pytorch_model.bin", Q),
    "pickled-truncated": (_pickled(None, truncate=True), "pytorch_model.bin", None),
}
GPT2_DAMAGE = {
    "gpt2-missing-c_attn": (_edit_weights(lambda sd: sd.pop(C_ATTN)), "model.safetensors", C_ATTN),
    "gpt2-c_attn-64x64": (_edit_weights(lambda sd: sd.__setitem__(C_ATTN, sd[C_ATTN][:, :64].contiguous())),
                          "model.safetensors", C_ATTN),
}
COMMANDS = ("spectrum", "eval", "finetune", "ranks", "compress", "hessian-gap", "sweep")
# every damage through the two streamed readers and one loader; the main ones through every command
EVERY = {"missing-q", "missing-norm", "q-64x32", "q-int8", "truncated"}


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("badval")
    docs = root / "docs.jsonl"
    words = "the model reads these words one after another and learns nothing much from them".split()
    docs.write_text("".join(json.dumps({"text": " ".join(words[i % 7:] + words[: i % 7])}) + "\n" for i in range(60)))
    good = root / "good"
    make_tiny(vocab=384).save_pretrained(good)  # the bytes tokenizer's 384 ids
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=384, n_positions=64)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(root / "gpt2")
    folders = {}
    for name, (how, _, _) in DAMAGE.items():
        shutil.copytree(good, root / name)
        how(root / name)
        folders[name] = root / name
    for name, (how, _, _) in GPT2_DAMAGE.items():
        shutil.copytree(root / "gpt2", root / name)
        how(root / name)
        folders[name] = root / name
    assert main(["compress", str(good), "--err", "0.5", "--out", str(root / "comp")]) == 0
    for name, edit in (("comp-factor-shape", lambda k, t: t[:-1].contiguous()), ("comp-missing-factor", None)):
        shutil.copytree(root / "comp", root / name)
        shard = next(f for f in sorted((root / name).glob("model-*.safetensors"))
                     if any(k.endswith(".A.weight") for k in load_file(f)))
        sd = load_file(shard)
        key = next(k for k in sd if k.endswith(".A.weight"))
        if edit is None:
            sd.pop(key)
        else:
            sd[key] = edit(key, sd[key])
        save_file(sd, shard, metadata={"format": "pt"})
        folders[name] = root / name
        folders[f"{name}-key"] = (shard.name, key)
    return {"root": root, "docs": str(docs), "folders": folders}


def _argv(cmd: str, ckpt: str, w: dict) -> list[str]:
    out, docs = w["root"] / "out", w["docs"]
    return {
        "spectrum": ["spectrum", ckpt, "--device", "cpu", "--out", str(out / "a.zarr")],
        "eval": ["eval", ckpt, "--device", "cpu", "--tokenizer", "bytes", "--data", docs, "--seq-len", "32",
                 "--tokens", "256", "--cache-dir", str(out / "cache"), "--out", str(out / "eval.jsonl")],
        "finetune": ["finetune", ckpt, "--device", "cpu", "--tokenizer", "bytes", "--data", docs, "--out",
                     str(out / "ft")],
        "ranks": ["ranks", ckpt, "--err", "0.5", "--out", str(out / "map.json")],
        "compress": ["compress", ckpt, "--err", "0.5", "--out", str(out / "comp")],
        "hessian-gap": ["hessian-gap", ckpt, "--tokenizer", "bytes", "--data", docs, "--seq-len", "32",
                        "--batch-size", "2", "--batches", "1", "--k", "2", "--iterations", "4", "--device", "cpu",
                        "--out", str(out / "h.zarr")],
        "sweep": ["sweep", ckpt, "--tokenizer", "bytes", "--calib-data", docs, "--eval-data", f"docs={docs}",
                  "--methods", "welore", "--errs", "0.5", "--seq-len", "32", "--eval-tokens", "256",
                  "--calib-seqs", "4", "--calib-seq-len", "32", "--device", "cpu", "--analysis", str(out / "s.zarr")],
    }[cmd]


def _cases(w) -> list[tuple[list[str], list[str]]]:
    """(argv, fragments of the one error line)."""
    f = w["folders"]
    cases = []
    for name, (_, file, tensor) in {**DAMAGE, **GPT2_DAMAGE}.items():
        named = [str(f[name] / file)] + ([tensor] if tensor else [])
        for cmd in COMMANDS if name in EVERY else ("spectrum", "compress", "eval"):
            cases.append((_argv(cmd, str(f[name]), w), named))
    for name in ("comp-factor-shape", "comp-missing-factor"):
        shard, key = f[f"{name}-key"]
        for cmd in ("eval", "finetune", "spectrum"):
            cases.append((_argv(cmd, str(f[name]), w), [str(f[name] / shard) if "shape" in name else str(f[name]),
                                                        key]))
    return cases


# the table is built from a fixture, so its length is not known at collection time: keep this in step
N_CASES = 107


def test_table_size(w):
    assert len(_cases(w)) == N_CASES


@pytest.mark.parametrize("i", range(N_CASES))
def test_damaged_checkpoint_is_one_error_line_and_touches_nothing(w, i, capsys):
    argv, fragments = _cases(w)[i]
    assert_refused(argv, w["root"], capsys, *fragments)
