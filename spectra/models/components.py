"""The component registry: where the paper's components q, k, v, o, gate, up, down live in each
Hugging Face architecture.

Every analysis and command finds its weights here. A `Part` is one logical component of one layer:
the module that holds it, and — for fused projections — the exact rows of that module's weight
(in the standard (out, in) orientation) that belong to it. GPT-2's `Conv1D` stores its weight
transposed (in, out); `Part.weight` hides that, so callers always see (out, in).

Fused layouts (rows of the fused (out, in) weight; hd = head dim, H = heads, K = key/value heads):
    Phi-3 qkv_proj           [q: H·hd | k: K·hd | v: K·hd]                 (GQA-aware)
    Phi-3 gate_up_proj       [gate: I | up: I]
    GPT-2 c_attn             [q: d | k: d | v: d]                          (Conv1D: columns of the stored weight)
    GPT-NeoX query_key_value per head h: [q_h | k_h | v_h]               (interleaved, H row ranges per part)
    Falcon query_key_value   new_decoder_architecture: per KV group g: [H/K query heads | k_g | v_g];
                             multi_query: [q: H·hd | k: hd | v: hd]; otherwise per head [q_h | k_h | v_h]
Models without a gate (GPT-2, NeoX, OPT, Falcon, encoders) have up (in -> hidden) and down only.

An unsupported model, or a user who wants other modules, passes `--components q=REGEX,k=REGEX,...`
(`set_override`): each regex is searched in module names, the layer is its first group (else the
first `.N.` in the name), and each match is one whole, unfused component.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from spectra.errors import SpectraError

COMPONENTS = ("q", "k", "v", "o", "gate", "up", "down")
ATTENTION = ("q", "k", "v", "o")
MLP = ("gate", "up", "down")

Rows = tuple[tuple[int, int], ...]


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 `Conv1D` (weight stored (in, out)), recognised without importing it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def module_dims(module: nn.Module) -> tuple[int, int]:
    """(out, in) features of a linear-like module (nn.Linear and spectra's subclasses, Conv1D)."""
    if is_conv1d(module):
        return int(module.nf), int(module.nx)
    return int(module.out_features), int(module.in_features)


@dataclass(frozen=True)
class Part:
    """One logical component: `rows` of `module_name`'s (out, in) weight (None: all of them)."""

    layer: int
    component: str
    module_name: str
    rows: Rows | None = None

    @property
    def fused(self) -> bool:
        return self.rows is not None

    @property
    def n_rows(self) -> int | None:
        return None if self.rows is None else sum(b - a for a, b in self.rows)

    def shape(self, module: nn.Module) -> tuple[int, int]:
        """(out, in) of this component, without touching the weight (works on meta models)."""
        out, n_in = module_dims(module)
        return (out if self.rows is None else self.n_rows, n_in)

    def _child(self, module: nn.Module) -> nn.Module | None:
        """A compressed fused module (spectra's FusedLinear) holds each part as its own child."""
        return module.get_submodule(self.component) if self.fused and hasattr(module, "spectra_parts") else None

    def _full(self, module: nn.Module) -> torch.Tensor:
        return module.weight.t() if is_conv1d(module) else module.weight

    def _rows(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or self.rows is None:
            return t
        if len(self.rows) == 1:  # a view: writes and gradients reach the parameter
            a, b = self.rows[0]
            return t[a:b]
        return torch.cat([t[a:b] for a, b in self.rows])

    def weight(self, module: nn.Module) -> torch.Tensor:
        """This component's weight, (out, in); a view of the parameter unless rows are interleaved."""
        child = self._child(module)
        return child.weight if child is not None else self.of_tensor(module.weight, is_conv1d(module))

    def of_tensor(self, stored: torch.Tensor, conv1d: bool = False) -> torch.Tensor:
        """This component's (out, in) weight from the module's full weight as stored (Conv1D: (in, out))."""
        return self._rows(stored.t() if conv1d else stored)

    def bias(self, module: nn.Module) -> torch.Tensor | None:
        child = self._child(module)
        return getattr(child, "bias", None) if child is not None else self._rows(getattr(module, "bias", None))

    def grad(self, module: nn.Module) -> torch.Tensor | None:
        """Gradient of this component's weight, (out, in), if the module's parameter has one."""
        if self._child(module) is not None:
            return None
        g = getattr(getattr(module, "weight", None), "grad", None)
        if g is None:
            return None
        return self._rows(g.t() if is_conv1d(module) else g)

    def set_weight(self, module: nn.Module, W: torch.Tensor) -> None:
        """Write an (out, in) weight for this component into the module, in place."""
        child = self._child(module)
        target = child.weight if child is not None else self._full(module)
        with torch.no_grad():
            if child is not None or self.rows is None:
                target.copy_(W)
                return
            i = 0
            for a, b in self.rows:
                target[a:b].copy_(W[i:i + b - a])
                i += b - a


# --------------------------------------------------------------------------- fused splits
def _head_dim(cfg) -> int:
    hd = getattr(cfg, "head_dim", None)
    return int(hd) if hd else cfg.hidden_size // cfg.num_attention_heads


def _contiguous(*sizes: tuple[str, int]) -> dict[str, Rows]:
    out, i = {}, 0
    for name, n in sizes:
        out[name] = ((i, i + n),)
        i += n
    return out


def _per_head(n_heads: int, hd: int) -> dict[str, Rows]:
    """[q_h | k_h | v_h] for every head h (NeoX, old Falcon)."""
    return {c: tuple((3 * hd * h + j * hd, 3 * hd * h + (j + 1) * hd) for h in range(n_heads))
            for j, c in enumerate(("q", "k", "v"))}


def phi3_qkv(cfg) -> dict[str, Rows]:
    hd, h = _head_dim(cfg), cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or h
    return _contiguous(("q", h * hd), ("k", kv * hd), ("v", kv * hd))


def phi3_gate_up(cfg) -> dict[str, Rows]:
    return _contiguous(("gate", cfg.intermediate_size), ("up", cfg.intermediate_size))


def gpt2_qkv(cfg) -> dict[str, Rows]:
    return _contiguous(("q", cfg.hidden_size), ("k", cfg.hidden_size), ("v", cfg.hidden_size))


def neox_qkv(cfg) -> dict[str, Rows]:
    return _per_head(cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads)


def falcon_qkv(cfg) -> dict[str, Rows]:
    h, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    if getattr(cfg, "new_decoder_architecture", False):
        kv = cfg.num_kv_heads
        g = h // kv  # query heads per KV group; each group is [g query heads | k | v]
        q, k, v = [], [], []
        for j in range(kv):
            base = j * (g + 2) * hd
            q.append((base, base + g * hd))
            k.append((base + g * hd, base + (g + 1) * hd))
            v.append((base + (g + 1) * hd, base + (g + 2) * hd))
        return {"q": tuple(q), "k": tuple(k), "v": tuple(v)}
    if getattr(cfg, "multi_query", False):
        return _contiguous(("q", h * hd), ("k", hd), ("v", hd))
    return _per_head(h, hd)


# --------------------------------------------------------------------------- architectures
Rule = tuple[str, str | Callable]  # (regex with the layer as group 1, component or fused split)
_L = r"(?:^|\.)layers\.(\d+)\."
LLAMA: list[Rule] = [(_L + rf"(?:self_attn|mlp)\.{c}_proj$", c) for c in COMPONENTS]
ARCHITECTURES: dict[str, list[Rule]] = {
    "llama": LLAMA,  # also Mistral, Qwen2, Gemma/Gemma2 and every model_type not listed (same names)
    "phi3": [(_L + r"self_attn\.qkv_proj$", phi3_qkv), (_L + r"self_attn\.o_proj$", "o"),
             (_L + r"mlp\.gate_up_proj$", phi3_gate_up), (_L + r"mlp\.down_proj$", "down")],
    "gpt2": [(r"(?:^|\.)h\.(\d+)\.attn\.c_attn$", gpt2_qkv), (r"(?:^|\.)h\.(\d+)\.attn\.c_proj$", "o"),
             (r"(?:^|\.)h\.(\d+)\.mlp\.c_fc$", "up"), (r"(?:^|\.)h\.(\d+)\.mlp\.c_proj$", "down")],
    "gpt_neox": [(_L + r"attention\.query_key_value$", neox_qkv), (_L + r"attention\.dense$", "o"),
                 (_L + r"mlp\.dense_h_to_4h$", "up"), (_L + r"mlp\.dense_4h_to_h$", "down")],
    "opt": [(_L + r"self_attn\.q_proj$", "q"), (_L + r"self_attn\.k_proj$", "k"), (_L + r"self_attn\.v_proj$", "v"),
            (_L + r"self_attn\.out_proj$", "o"), (_L + r"fc1$", "up"), (_L + r"fc2$", "down")],
    "falcon": [(r"(?:^|\.)h\.(\d+)\.self_attention\.query_key_value$", falcon_qkv),
               (r"(?:^|\.)h\.(\d+)\.self_attention\.dense$", "o"),
               (r"(?:^|\.)h\.(\d+)\.mlp\.dense_h_to_4h$", "up"), (r"(?:^|\.)h\.(\d+)\.mlp\.dense_4h_to_h$", "down")],
    "bert": [(rf"(?:^|\.)layer\.(\d+)\.attention\.self\.{n}$", c)
             for n, c in (("query", "q"), ("key", "k"), ("value", "v"))]
    + [(r"(?:^|\.)layer\.(\d+)\.attention\.output\.dense$", "o"), (r"(?:^|\.)layer\.(\d+)\.intermediate\.dense$", "up"),
       (r"(?:^|\.)layer\.(\d+)\.output\.dense$", "down")],
    "distilbert": [(rf"(?:^|\.)layer\.(\d+)\.attention\.{c}_lin$", c) for c in ("q", "k", "v")]
    + [(r"(?:^|\.)layer\.(\d+)\.attention\.out_lin$", "o"), (r"(?:^|\.)layer\.(\d+)\.ffn\.lin1$", "up"),
       (r"(?:^|\.)layer\.(\d+)\.ffn\.lin2$", "down")],
}
ALIASES = {"mistral": "llama", "qwen2": "llama", "gemma": "llama", "gemma2": "llama", "roberta": "bert",
           "xlm-roberta": "bert", "electra": "bert", "camembert": "bert", "gpt_bigcode": "gpt2"}
SUPPORTED = ("llama", "mistral", "qwen2", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox", "opt", "falcon",
             "bert", "roberta", "distilbert")

_override: list[Rule] | None = None


def parse_override(spec: str) -> list[Rule]:
    """`q=REGEX,k=REGEX,...` -> rules (a comma splits only before `<component>=`, so regexes may hold commas)."""
    names = "|".join(COMPONENTS)
    rules = []
    for item in re.split(rf",\s*(?=(?:{names})=)", spec.strip()):
        comp, eq, rx = item.partition("=")
        comp = comp.strip()
        if not eq or comp not in COMPONENTS or not rx:
            raise SpectraError(f"--components takes COMPONENT=REGEX pairs such as q=attn\\.wq$,o=attn\\.wo$ "
                               f"(components: {', '.join(COMPONENTS)}); not {item!r}")
        try:
            re.compile(rx)
        except re.error as e:
            raise SpectraError(f"--components {comp}: bad regex {rx!r} ({e})") from None
        rules.append((rx, comp))
    return rules


def set_override(spec: str | None) -> None:
    """Use the user's `--components q=REGEX,...` for every model in this process (None: registry)."""
    global _override
    _override = parse_override(spec) if spec else None


def _layer_of(match: re.Match, name: str) -> int | None:
    if match.re.groups and match.group(1) is not None and match.group(1).isdigit():
        return int(match.group(1))
    m = re.search(r"\.(\d+)\.", f".{name}.")
    return int(m.group(1)) if m else None


def linear_names(model: nn.Module) -> list[str]:
    """Names of every linear-like leaf (nn.Linear, Conv1D), for the unsupported-model message."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)]


def _rules_for(model: nn.Module) -> tuple[list[Rule], bool]:
    """(rules, whether they are the LLaMA-name fallback for a model_type the registry does not list)."""
    if _override is not None:
        return _override, False
    mt = getattr(getattr(model, "config", None), "model_type", None)
    mt = ALIASES.get(mt, mt)
    return ARCHITECTURES.get(mt, LLAMA), mt not in ARCHITECTURES


def _unsupported(model: nn.Module, what: str) -> SpectraError:
    names = linear_names(model)
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    mt = getattr(getattr(model, "config", None), "model_type", "?")
    return SpectraError(f"{type(model).__name__} (model_type {mt}) {what}; its linear modules: {shown or 'none'}. "
                        f"Map them yourself with --components q=REGEX,k=REGEX,v=REGEX,o=REGEX,up=REGEX,down=REGEX "
                        f"(supported: {', '.join(SUPPORTED)})")


def parts(model: nn.Module, *, required: bool = True) -> list[tuple[Part, nn.Module]]:
    """Every (Part, module) of `model`, ordered by layer, then q, k, v, o, gate, up, down."""
    cfg = getattr(model, "config", None)
    rules, fallback = _rules_for(model)
    rules = [(re.compile(rx), what) for rx, what in rules]
    found: list[tuple[Part, nn.Module]] = []
    for name, module in model.named_modules():
        for rx, what in rules:
            m = rx.search(name)
            if m is None:
                continue
            layer = _layer_of(m, name)
            if layer is None:
                raise SpectraError(f"--components: no layer number in matched module {name!r}")
            if callable(what):
                found += [(Part(layer, c, name, rows), module) for c, rows in what(cfg).items()]
            else:
                found.append((Part(layer, what, name), module))
            break
    names = {p.module_name for p, _ in found}  # a match inside a matched module (its factors) is not another one
    found = [(p, m) for p, m in found if not any(p.module_name.startswith(f"{n}.") for n in names)]
    if not found and required:
        raise _unsupported(model, "has no module the component registry knows")
    missing = sorted(set(COMPONENTS) - {p.component for p, _ in found}, key=COMPONENTS.index)
    if found and fallback and missing and required:  # e.g. a MoE whose experts are not gate/up/down: never half a model
        raise _unsupported(model, f"has LLaMA-style names for only part of its components (no {', '.join(missing)})")
    seen = set()
    for p, _ in found:
        if (p.layer, p.component) in seen:
            raise SpectraError(f"two modules map to layer {p.layer} component {p.component} (e.g. {p.module_name}); "
                               "make the --components regexes more specific")
        seen.add((p.layer, p.component))
    return sorted(found, key=lambda pm: (pm[0].layer, COMPONENTS.index(pm[0].component)))


def iter_parts(model: nn.Module) -> Iterator[tuple[Part, nn.Module]]:
    yield from parts(model)
