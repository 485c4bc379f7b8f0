"""What fedtune needs to know about a backbone, read from the loaded model's own modules.

A transformer here is: an embedding stage, an `nn.ModuleList` of identical blocks, and
(pre-norm decoders) a final norm. Inside a block, the attention module holds the
projections (q, k, v or one fused qkv, then the output projection) and the rest of the
block holds the MLP (up, then down). Everything below is found by module type, shape and
registration order, not from a table of `model_type` strings, so a renamed attribute or a
new family with the same shape is still understood:

- LoRA's default targets are the query- and value-like projections (peft matches module
  names by suffix, so the leaf names are the targets);
- SLaSh's shift points are the attention output projection and the MLP's first/last
  linear layers;
- split mode cuts the block list and runs each block with the arguments the model's own
  `forward` passes to its first block (masks in the form the family expects, positions,
  rotary embeddings, relative position bias), captured by a pre-hook rather than
  re-implemented per family (`LayerInputs`).

Which families are *supported* (tested end to end: every tuning method and the split path)
is a registry; an untested model whose structure is found still works for LoRA's target
listing, but split mode refuses it with the list of supported families.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class FamilyError(ValueError):
    """The model's structure is not one fedtune understands (names what is missing)."""


# Families tested end to end (tests/test_families.py): every tuning method, DP-SGD and the
# split path at a cut. Structure comes from the model; this only says "known to work".
_SUPPORTED: dict[str, str] = {}


def register_family(model_type: str, note: str = "") -> None:
    """Mark `model_type` (a transformers `config.model_type`) as supported."""
    if model_type in _SUPPORTED:
        raise ValueError(f"backbone family {model_type!r} is registered twice")
    _SUPPORTED[model_type] = note


def supported_families() -> list[str]:
    return sorted(_SUPPORTED)


for _type, _note in [
    ("bert", "BERT / MiniLM encoders"),
    ("roberta", "RoBERTa encoders"),
    ("distilbert", "DistilBERT encoders"),
    ("mpnet", "MPNet encoders (relative position bias)"),
    ("gpt2", "GPT-2 decoders (Conv1D projections)"),
    ("llama", "Llama-style decoders (rotary embeddings, RMSNorm, grouped KV)"),
]:
    register_family(_type, _note)


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a linear-like layer: `nn.Linear`, or GPT-2's `Conv1D` (its
    weight is stored transposed, in x out); None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return int(module.weight.shape[0]), int(module.nf)
    return None


def _linears(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Linear-like leaves of `module`, in registration order (= forward order here)."""
    for name, sub in module.named_modules():
        if name and linear_shape(sub) is not None:
            yield name, sub


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _is_attention(module: nn.Module) -> bool:
    return "attention" in type(module).__name__.lower()


def _find_attention(block: nn.Module) -> str | None:
    """The outermost submodule of a block that is an attention module and holds linear
    layers (BERT's `attention` wraps `self` + `output`; MPNet's wraps `attn`)."""
    for name, sub in block.named_modules():
        if name and _is_attention(sub) and next(_linears(sub), None) is not None:
            return name
    return None


def _find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The block list: the longest `nn.ModuleList` whose children are all of one type and
    each hold an attention module."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, sub in model.named_modules():
        if not isinstance(sub, nn.ModuleList) or len(sub) == 0:
            continue
        if len({type(child) for child in sub}) != 1 or _find_attention(sub[0]) is None:
            continue
        if best is None or len(sub) > len(best[1]):
            best = (name, sub)
    if best is None:
        raise FamilyError(f"{type(model).__name__} has no list of transformer blocks "
                          "(an nn.ModuleList of identical modules with attention)")
    return best


def _qkv_roles(inputs: list[tuple[str, nn.Module]]) -> dict[str, str]:
    """Roles of a block's attention input projections: three separate ones (q, k, v) or
    one fused one (qkv). Names decide where they say q/k/v (query, q_lin, q_proj, q);
    otherwise the forward order q, k, v that every family here registers them in."""
    if len(inputs) == 1:
        return {"qkv": inputs[0][0]}
    if len(inputs) != 3:
        raise FamilyError(f"expected 3 attention input projections (q, k, v) or 1 fused, "
                          f"found {len(inputs)}: {', '.join(n for n, _ in inputs)}")
    initials = [_leaf(name)[0].lower() for name, _ in inputs]
    if sorted(initials) == ["k", "q", "v"]:
        return {initial: name for initial, (name, _) in zip(initials, inputs, strict=True)}
    return {role: name for role, (name, _) in zip("qkv", inputs, strict=True)}


@dataclass(frozen=True)
class Structure:
    """The parts of one loaded backbone that fedtune uses. Paths inside a block are
    relative to the block (`attention.self.query`); `layers_path` to the model."""

    model_type: str
    hidden_size: int
    layers_path: str
    layers: nn.ModuleList
    attention_path: str
    # role -> path in a block: q, k, v (or qkv when fused) and o (the output projection)
    projections: dict[str, str]
    # SLaSh positions -> path in a block: "attention" (attention output projection),
    # "intermediate" (MLP up), "output" (MLP down, back to the hidden size)
    sublayers: dict[str, str]
    # Linear leaf names outside attention (MLP), for error messages
    other_linears: tuple[str, ...]
    final_norm: nn.Module | None

    @property
    def supported(self) -> bool:
        return self.model_type in _SUPPORTED

    def lora_targets(self) -> list[str]:
        """LoRA's default targets: the query- and value-like projections' leaf names (the
        fused qkv projection where there is one; peft matches names by suffix)."""
        if "qkv" in self.projections:
            return [_leaf(self.projections["qkv"])]
        return [_leaf(self.projections["q"]), _leaf(self.projections["v"])]

    def attention_names(self) -> list[str]:
        """Leaf names of the attention projections, in forward order."""
        return list(dict.fromkeys(_leaf(p) for p in self.projections.values()))

    def sublayer(self, block: nn.Module, position: str) -> nn.Module:
        if position not in self.sublayers:
            raise FamilyError(f"no {position!r} sub-layer in a {self.model_type} block; "
                              f"found: {', '.join(self.sublayers)}")
        return block.get_submodule(self.sublayers[position])


def derive_structure(model: nn.Module) -> Structure:
    """Read the block list, attention projections, MLP layers and final norm from `model`'s
    modules. Raises FamilyError naming the first part it cannot find."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", "") or
                     type(model).__name__)
    hidden = int(model.get_input_embeddings().weight.shape[1])
    layers_path, layers = _find_layers(model)
    block = layers[0]
    attention_path = _find_attention(block)
    assert attention_path is not None  # _find_layers only accepts blocks with attention
    attention = block.get_submodule(attention_path)
    in_attention = [(f"{attention_path}.{n}", m) for n, m in _linears(attention)]
    if len(in_attention) < 2:
        raise FamilyError(f"the attention of a {model_type} block has "
                          f"{len(in_attention)} linear layer(s); expected input projections "
                          "and an output projection")
    # The output projection is the last one (it writes the hidden size back); the ones
    # before it read the hidden states.
    *inputs, (out_path, out_module) = in_attention
    if linear_shape(out_module)[1] != hidden:  # type: ignore[index]
        raise FamilyError(f"the last attention projection of a {model_type} block "
                          f"({out_path}) does not write the hidden size {hidden}")
    projections = {**_qkv_roles(inputs), "o": out_path}
    mlp = [(n, m) for n, m in _linears(block)
           if not (n == attention_path or n.startswith(attention_path + "."))]
    ups = [n for n, m in mlp if linear_shape(m)[0] == hidden]  # type: ignore[index]
    downs = [n for n, m in mlp if linear_shape(m)[1] == hidden]  # type: ignore[index]
    sublayers = {"attention": out_path}
    if ups:
        sublayers["intermediate"] = ups[0]
    if downs:
        sublayers["output"] = downs[-1]
    return Structure(
        model_type=model_type, hidden_size=hidden, layers_path=layers_path, layers=layers,
        attention_path=attention_path, projections=projections, sublayers=sublayers,
        other_linears=tuple(dict.fromkeys(_leaf(n) for n, _ in mlp)),
        final_norm=_final_norm(model, layers_path))


def _final_norm(model: nn.Module, layers_path: str) -> nn.Module | None:
    """A norm registered after the block list by the list's parent or one of its
    ancestors (GPT-2's `ln_f`, Llama's `norm`); None for post-norm encoders."""
    parts = layers_path.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        parent = model.get_submodule(".".join(parts[:depth]))
        names = list(parent._modules)  # registration order, which is the forward order here
        after = names[names.index(parts[depth]) + 1:]
        for name in after:
            child = parent._modules[name]
            if child is not None and "norm" in type(child).__name__.lower():
                return child
    return None


class _Captured(Exception):
    """Raised by the capture hook: stops the model's forward at its first block."""


@dataclass
class LayerInputs:
    """What the model's own `forward` passes to its blocks besides the hidden states
    (attention mask in the family's form, position ids, rotary cos/sin, MPNet's relative
    position bias, ...), captured at the first block."""

    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def call(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = block(hidden, *self.args, **self.kwargs)
        # Blocks return a tensor (transformers 5) or a tuple led by the hidden states.
        return out[0] if isinstance(out, tuple) else out


def capture_layer_inputs(model: nn.Module, structure: Structure,
                         inputs_embeds: torch.Tensor, attention_mask: torch.Tensor
                         ) -> LayerInputs:
    """Run `model`'s forward on `inputs_embeds` up to its first block and return that
    block's inputs: the embedding stage's output (with its autograd graph) and the other
    arguments. Nothing after the embedding stage runs."""
    captured: dict[str, Any] = {}
    owner = threading.get_ident()

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # Only this call's forward stops here: another thread running the shared model
        # meanwhile (a server evaluating in the same process) passes through.
        if threading.get_ident() != owner or "args" in captured:
            return
        captured["args"], captured["kwargs"] = args, kwargs
        raise _Captured

    handle = structure.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    # No KV cache: its object would be captured and shared by every block and call.
    extra = {"use_cache": False} if _accepts_use_cache(type(model)) else {}
    try:
        model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **extra)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "args" not in captured:
        raise FamilyError(f"the {structure.model_type} model's forward never reached its "
                          f"first block ({structure.layers_path}.0)")
    args, kwargs = captured["args"], dict(captured["kwargs"])
    if args:
        hidden, rest = args[0], tuple(args[1:])
    else:
        key = next(k for k in ("hidden_states", "hidden_state", "x") if k in kwargs)
        hidden, rest = kwargs.pop(key), ()
    return LayerInputs(hidden=hidden, args=rest, kwargs=kwargs)


@functools.cache
def _accepts_use_cache(model_class: type) -> bool:
    return "use_cache" in inspect.signature(model_class.forward).parameters


def _all_linear_names(model: nn.Module) -> list[str]:
    return list(dict.fromkeys(_leaf(n) for n, _ in _linears(model)))


def resolve_lora_targets(model: nn.Module, requested: list[str] | tuple[str, ...],
                         field: str = "tuning.lora.targets") -> list[str]:
    """LoRA's target module names for `model`: the derived query/value-like projections
    when `requested` is empty, else `requested` once every name is checked to match a
    module (peft matches a name or a dotted suffix; a target that matches nothing would
    otherwise be dropped silently when another one matches). Raises ConfigError naming
    `field` and the linear layers the model does have."""
    from fedtune.config import ConfigError

    model_type = str(getattr(getattr(model, "config", None), "model_type", "") or
                     type(model).__name__)
    try:
        structure: Structure | None = derive_structure(model)
    except FamilyError:
        structure = None
    if structure is not None:
        have = (f"its attention projections are: {', '.join(structure.attention_names())}"
                f"; its other linear layers: {', '.join(structure.other_linears) or 'none'}")
    else:
        have = f"its linear layers are: {', '.join(_all_linear_names(model)) or 'none'}"
    if not requested:
        if structure is None:
            raise ConfigError(f"{field}=[] (derive) finds no attention projections in this "
                              f"{model_type} model; name the targets: {have}")
        return structure.lora_targets()
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in requested
               if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ConfigError(f"{field}={list(requested)}: {missing} match no module of this "
                          f"{model_type} model; {have}")
    return list(requested)
