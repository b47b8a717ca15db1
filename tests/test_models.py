"""Where commands look for a run folder and write their analyses by default."""

from __future__ import annotations

import shutil

import pytest
import torch

from spectra.errors import SpectraError
from spectra.io.runs import run_dir_of
from spectra.io.sources import analysis_store_for, find_checkpoint
from spectra.models.parts import select_components


@pytest.fixture()
def run(tmp_path, tiny_ckpt):
    """The layout `spectra pretrain` leaves, under a --runs-dir that is not called runs/."""
    run = tmp_path / "elsewhere" / "r1"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(tiny_ckpt, run / "checkpoints" / "step_8")  # a real checkpoint: resolve validates it
    (run / "checkpoints" / "latest").write_text("step_8")
    (run / "snapshots.zarr").mkdir()
    (run / "compressed" / "welore-err50").mkdir(parents=True)
    return run


def test_everything_inside_a_run_resolves_to_it(run):
    for inside in (run, run / "checkpoints" / "step_8", run / "snapshots.zarr", run / "compressed" / "welore-err50"):
        assert run_dir_of(inside) == run.resolve()
        assert analysis_store_for(inside) == run.resolve() / "analysis.zarr"
    assert find_checkpoint(run) == run / "checkpoints" / "step_8"


def test_outside_a_run(tmp_path):
    bare = tmp_path / "hf-model"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    assert run_dir_of(bare) is None
    assert analysis_store_for(bare) == bare / "analysis.zarr"
    assert analysis_store_for(tmp_path / "x" / "snapshots.zarr") == tmp_path / "x" / "analysis.zarr"
    with pytest.raises(SpectraError, match="does not exist"):
        find_checkpoint(tmp_path / "missing")
    with pytest.raises(SpectraError, match="no model checkpoint"):
        find_checkpoint(tmp_path)


def test_component_filters_take_commas_or_repeats():
    from conftest import make_tiny

    from spectra.models.parts import select_components

    model = make_tiny()
    picked = select_components(model, ["1"], ["q,down"])
    assert sorted(picked) == [(1, "down"), (1, "q")]
    assert sorted(select_components(model, ["0,1"], ["v"])) == sorted(select_components(model, [0, 1], ["v"]))
    with pytest.raises(SpectraError, match="layer numbers"):
        select_components(model, ["x"], None)
    with pytest.raises(SpectraError, match="out of range"):
        select_components(model, ["2"], None)


def test_fused_parts_are_no_hessian_parameters_but_conv1d_is():
    """hessian-gap differentiates by a parameter: a fused part (rows of qkv_proj) is refused with the
    unfused alternatives; GPT-2's Conv1D weights are whole parameters (eigenvalues do not care about
    the transposed layout)."""
    import transformers as T

    from spectra.models.parts import component_weights

    torch.manual_seed(0)
    phi = T.Phi3ForCausalLM(T.Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
    with pytest.raises(SpectraError, match="--components o,down"):
        select_components(phi, None, ["q"])
    assert list(select_components(phi, ["1"], ["o,down"])) == [(1, "o"), (1, "down")]
    ws = component_weights(phi)
    W = phi.model.layers[0].self_attn.qkv_proj.weight
    assert ws[(0, "q")].shape == (32, 32) and ws[(0, "k")].shape == (16, 32) and ws[(0, "v")].shape == (16, 32)
    assert torch.equal(torch.cat([ws[(0, c)] for c in "qkv"]), W)
    assert ws[(0, "q")].data_ptr() == W.data_ptr()  # a view: no copy of the weight
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64))
    picked = select_components(gpt2, ["0"], ["o,up"])
    assert picked[(0, "o")] is gpt2.transformer.h[0].attn.c_proj.weight
    assert torch.equal(component_weights(gpt2)[(0, "up")], gpt2.transformer.h[0].mlp.c_fc.weight.t())


def test_latest_may_be_a_symlink(run):
    """`checkpoints/latest` as a symlink (what HF tools can be pointed at) resolves like the text file."""
    (run / "checkpoints" / "latest").unlink()
    (run / "checkpoints" / "latest").symlink_to("step_8")
    assert find_checkpoint(run) == (run / "checkpoints" / "step_8").resolve()
    assert run_dir_of(run / "checkpoints" / "latest") == run.resolve()
