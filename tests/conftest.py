"""Shared tiny, seeded fixtures (2 layers, dim 64) so every test runs in seconds on 2 CPU cores."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

# $SPECTRA_DATA points elsewhere (e.g. .devdata/ carried to a GPU machine, bench/device/README.md)
SHARED = Path(
    os.environ.get("SPECTRA_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data"
).resolve()
T5_DIR = SHARED / "tokenizers" / "t5"
WIKI_TRAIN = SHARED / "wikipedia" / "train"
WIKI_VAL = SHARED / "wikipedia" / "validation"
C4_SAMPLE = SHARED / "c4" / "c4-train.00000-of-01024.first1000.jsonl.gz"

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def pytest_configure(config):
    # Ctrl-C raises KeyboardInterrupt here and in every child (exec resets a handled signal to its default) even
    # when the suite was started as a shell's background job (nohup ... &), which inherits SIGINT ignored: then
    # Python installs no handler, and the Ctrl-C tests' signals would do nothing
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny graphs (2 shared cores: more threads only spin-wait),
    restored afterwards so the setting does not leak into other modules' tests."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared/data not present")
    return SHARED


@pytest.fixture(scope="session")
def tokenizer(shared_data):
    from spectra.data import load_tokenizer

    return load_tokenizer(str(T5_DIR))


def wiki_docs(path: Path, n: int) -> Path:
    """The first `n` real Wikipedia validation documents as a small jsonl file at `path`."""
    import gzip

    with gzip.open(WIKI_VAL / "wiki_00.jsonl.gz", "rt") as f:
        path.write_text("".join(next(f) for _ in range(n)))
    return path


def assert_one_error_line(cases: list[list[str]], capsys) -> None:
    """Each argv exits 2 with exactly one `error: ...` line on stderr (no traceback wall)."""
    from spectra.cli import main

    for argv in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, (argv, err)


def make_tiny(vocab: int = 256, seed: int = 0, attn: str = "eager"):
    """The tiny LLaMA (2 layers, hidden 64, 4 heads) with a small vocab, float32, seeded."""
    from pretrain.configs import build_model

    return build_model("tiny", vocab_size=vocab, seed=seed, attn_implementation=attn)


def train_steps(model, steps: int, seed: int = 0, vocab: int = 256, lr: float = 3e-3, on_step=None):
    """A few AdamW steps on a fixed random-token batch (structure emerges fast enough to test)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (4, 32), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if on_step is not None:
            on_step(step, loss.item())
        opt.step()
    return model


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A save_pretrained folder of a briefly trained tiny model (vocab 256)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    model = train_steps(make_tiny(), 20)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    """A snapshots.zarr with full gradients at steps 2, 4, ..., 12 of a tiny training run."""
    from spectra.io.snapshots import SnapshotWriter

    run = tmp_path_factory.mktemp("run")
    writer = SnapshotWriter(run / "snapshots.zarr", {"config": {"model": "tiny"}}, grad_mode="full", background=False)
    model = make_tiny()

    def snap(step, loss):
        if step % 2 == 0:
            writer.write(model, step=step, tokens=step * 128, lr=3e-3, loss=loss)

    train_steps(model, 12, on_step=snap)
    writer.close()
    model.save_pretrained(run / "checkpoints" / "step_12")
    (run / "checkpoints" / "latest").write_text("step_12")
    return run


def tree(root: Path) -> dict[str, str]:
    """{relative path: sha1} of every file below `root` (the run lock and caches aside)."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock" and "cache" not in p.parts}


def assert_refused(argv: list[str], root: Path, capsys, *fragments: str) -> str:
    """`spectra argv` exits non-zero with exactly one `error:` line (no traceback) holding every fragment, and no
    file below `root` changed or appeared (what a refused command leaves is removed, then reported); returns
    the line. The harness of every bad-input table."""
    import shutil

    from spectra.cli import main

    before = tree(root)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    errors = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("error: ")]
    assert code != 0 and len(errors) == 1 and "Traceback" not in err, (argv, code, err[-2000:])
    assert all(f in errors[0] for f in fragments), (argv, fragments, errors[0])
    after = tree(root)
    changed = [k for k in before if after.get(k) != before[k]]
    assert not changed, (argv, changed[:5])
    new = sorted(set(after) - set(before))
    for extra in new:
        shutil.rmtree(root / extra, ignore_errors=True)
    assert not new, (argv, new[:5])
    return errors[0]


def argv_with(base: list[str], *kv: str) -> list[str]:
    """`base` with each option of the (flag, value) pairs set: replaced where present, appended otherwise."""
    out = list(base)
    for k, v in zip(kv[::2], kv[1::2]):
        if k in out:
            out[out.index(k) + 1] = v
        else:
            out += [k, v]
    return out
