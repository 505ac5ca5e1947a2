"""Model factories, looked up by name: a run directory names its model, it never carries code.

Built-ins: ``mlp``, ``small_cnn`` and ``resnet18_nonorm`` (torchvision's ResNet-18 layout with
every normalization layer replaced by the identity, the paper's model). Other modules register
more with :func:`register_model`. A factory outside the registry is only reachable through
:func:`load_external_factory`, which the CLI calls when the user types ``--allow-factory``.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from recorder.rundir.errors import RunDirError
from recorder.rundir.probes import Inputs, describe, map_inputs
from recorder.rundir.spec import ModelSpec

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
# what ``torch.compile``'s wrapper puts before every name of the module it compiles
COMPILE_PREFIX = "_orig_mod."


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make ``fn(**kwargs) -> nn.Module`` buildable from a spec as ``name``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = fn
        return fn

    return wrap


def registered_models() -> list[str]:
    return sorted(_REGISTRY)


def load_external_factory(target: str, name: str | None = None) -> str:
    """Import ``module:function`` and register it (only on the user's explicit request).

    The module is looked up in the current folder first, then on ``sys.path`` (the current folder
    is on the path for this import only). Raises ImportError when the module cannot be found or
    its code raises, AttributeError when it has no such function."""
    module, _, attr = target.partition(":")
    if not module or not attr:
        raise ValueError(f"--allow-factory expects 'module:function', got {target!r}")
    cwd = os.getcwd()
    sys.path.insert(0, cwd)
    importlib.invalidate_caches()  # a module written since the folder was last looked at
    try:
        imported = importlib.import_module(module)
    except ImportError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the module's own code raises
        raise ImportError(f"importing {module!r} raised {type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(cwd)
    fn = getattr(imported, attr)
    register_model(name or attr)(fn)
    return name or attr


def build_model(spec: ModelSpec) -> nn.Module:
    """Instantiate a registered factory; unknown names and bad kwargs raise RunDirError."""
    if spec.factory not in _REGISTRY:
        raise RunDirError(
            f"model factory {spec.factory!r} is not registered (known: {', '.join(registered_models())}); "
            "a factory of your own needs --allow-factory module:function"
        )
    try:
        return _REGISTRY[spec.factory](**spec.kwargs)
    except (TypeError, ValueError) as e:
        raise RunDirError(
            f"model factory {spec.factory!r} rejected its arguments {spec.kwargs}: {e}"
        ) from None


def rebuild_model(spec: ModelSpec) -> nn.Module:
    """The model ``spec`` names, in eval mode, built with the global random generator forked, so
    that building it (to check a recording or replay it) leaves the caller's random stream as it
    was. Whatever the factory raises becomes a :class:`RunDirError` naming it."""
    with torch.random.fork_rng(devices=[]):
        try:
            return build_model(spec).eval()
        except RunDirError:
            raise
        except Exception as e:  # noqa: BLE001 - the factory ran on the spec's kwargs
            raise RunDirError(
                f"model {spec.factory!r} cannot be built from {spec.kwargs} ({type(e).__name__}: {e})"
            ) from None


def check_fits_before_building(spec: ModelSpec, params: dict[str, torch.Tensor], where: str) -> None:
    """Raise RunDirError unless the model ``spec`` names has the parameters ``params`` (names and
    shapes; ``meta`` tensors will do), checked on the model built on the ``meta`` device, which
    allocates no memory for its weights: a spec that names a huge model is refused before it is
    built. A factory that cannot build on ``meta`` is left to :func:`rebuild_model` to report."""
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            skeleton = build_model(spec)
    except Exception:  # noqa: BLE001 - rebuild_model builds it for real and says what is wrong
        return
    check_state_matches(skeleton, params, where)


def model_outputs(returned: Any) -> Tensor:
    """The outputs ``[N, C]`` in what a model returns: a tensor, or an object or mapping holding
    one as ``logits`` (the outputs of Hugging Face models). Raises TypeError otherwise."""
    if isinstance(returned, Tensor):
        return returned
    logits = returned.get("logits") if isinstance(returned, Mapping) else getattr(returned, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(
        f"the model returned a {type(returned).__name__}: it must return its outputs [N, C] as a tensor "
        "or as the 'logits' of what it returns"
    )


def forward(
    model: nn.Module, inputs: Inputs, state: dict[str, Tensor] | tuple[dict[str, Tensor], ...] | None = None
) -> Tensor:
    """``model``'s outputs ``[N, C]`` (:func:`model_outputs`) on ``inputs``: one tensor ``[N, ...]``
    passed as its argument, or named tensors passed as keyword arguments; with ``state`` (weights
    and buffers by name, or several such dicts), through ``torch.func.functional_call`` at those
    values."""
    args, kwargs = ((inputs,), {}) if isinstance(inputs, Tensor) else ((), dict(inputs))
    returned = model(*args, **kwargs) if state is None else functional_call(model, state, args, kwargs)
    return model_outputs(returned)


def probe_outputs(model: nn.Module, inputs: Inputs, name: str) -> Tensor:
    """The outputs ``[1, ...]`` of ``model`` (named ``name`` in messages) on the first probe of
    ``inputs`` (:mod:`recorder.rundir.probes`), floating inputs cast to the model's dtype, without
    gradients. Raises ValueError when the model cannot take the probe inputs."""
    weight = next(iter(model.parameters()), None)

    def first(t: Tensor) -> Tensor:
        t = t[:1].detach().cpu()
        return t.to(weight.dtype) if t.is_floating_point() and weight is not None else t

    try:
        with torch.no_grad():
            return forward(model, map_inputs(first, inputs))
    except Exception as e:  # noqa: BLE001 - whatever the model raises on inputs it cannot take
        raise ValueError(
            f"probe inputs {describe(inputs)} do not fit the model {name!r} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''})"
        ) from None


def check_state_matches(model: nn.Module, params: dict[str, torch.Tensor], where: str) -> None:
    """Raise RunDirError unless ``params`` has exactly the model's parameter names and shapes
    (names recorded through ``torch.compile`` are compared without its prefix ``_orig_mod.``)."""
    expected = {k: tuple(v.shape) for k, v in model.named_parameters()}
    found = {k: tuple(v.shape) for k, v in params.items()}
    if not any(COMPILE_PREFIX in k for k in expected):
        found = {k.replace(COMPILE_PREFIX, ""): v for k, v in found.items()}
    if expected == found:
        return
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    shape = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    parts = []
    if missing:
        parts.append(f"missing {missing[:3]}")
    if extra:
        parts.append(f"unexpected {extra[:3]}")
    if shape:
        k = shape[0]
        parts.append(f"shape of {k!r} is {found[k]}, the model has {expected[k]}")
    raise RunDirError(f"{where}: weights do not fit the model spec ({'; '.join(parts)})")


# ----------------------------------------------------------------------------- built-in models


@register_model("mlp")
def mlp(
    in_features: int, num_outputs: int, hidden: list[int] | tuple[int, ...] = (128,), activation: str = "relu"
) -> nn.Module:
    """Fully connected network: inputs [N, in_features] (or anything flattening to it) -> [N, C]."""
    acts = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
    if activation not in acts:
        raise ValueError(f"activation must be one of {sorted(acts)}")
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), acts[activation]()]
        width = h
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)


@register_model("small_cnn")
def small_cnn(in_channels: int, num_outputs: int, width: int = 16, image_size: int = 8) -> nn.Module:
    """Two conv layers and a linear head: inputs [N, in_channels, image_size, image_size] -> [N, C]."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * width, num_outputs),
    )


@register_model("resnet18_nonorm")
def resnet18_nonorm(num_outputs: int = 3) -> nn.Module:
    """torchvision's ResNet-18 with every BatchNorm replaced by the identity (SPEC §5)."""
    from torchvision.models import resnet18

    return resnet18(num_classes=num_outputs, norm_layer=lambda _channels: nn.Identity())


# ----------------------------------------------------------------------------- theory families (SPEC §6)


class RandomFeatures(nn.Module):
    """``f(x) = W^T relu(V x)``: inputs [N, in_features] -> [N, num_outputs].

    ``V`` [num_features, in_features] is a fixed buffer drawn from ``feature_seed`` (entries
    N(0, feature_scale^2 / in_features)); ``W`` [num_features, num_outputs] is the only parameter
    (entries N(0, 1 / num_features) from torch's global generator).
    """

    V: torch.Tensor  # a buffer, registered in __init__

    def __init__(
        self,
        in_features: int,
        num_features: int,
        num_outputs: int,
        feature_seed: int = 0,
        feature_scale: float = 1.0,
    ):
        super().__init__()
        generator = torch.Generator().manual_seed(feature_seed)
        V = torch.randn(num_features, in_features, generator=generator) * (feature_scale / in_features**0.5)
        self.register_buffer("V", V)
        self.W = nn.Parameter(torch.randn(num_features, num_outputs) / num_features**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x.flatten(1) @ self.V.T) @ self.W


class ReluGate(nn.Module):
    """``f(x) = relu(w . x)``: inputs [N, in_features] -> [N, 1]; ``w`` [in_features], N(0, 1 / in_features)."""

    def __init__(self, in_features: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(in_features) / in_features**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x.flatten(1) @ self.w).unsqueeze(-1)


class DiagonalHomogeneous(nn.Module):
    """``f(x) = <w^d, x>`` (elementwise power): inputs [N, in_features] -> [N, 1]; ``w`` [in_features],
    N(0, 1 / in_features); ``d`` a positive integer."""

    def __init__(self, in_features: int, d: int):
        super().__init__()
        if not isinstance(d, int) or isinstance(d, bool) or d < 1:
            raise ValueError(f"d must be a positive integer, got {d!r}")
        self.d = d
        self.w = nn.Parameter(torch.randn(in_features) / in_features**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) @ self.w.pow(self.d)).unsqueeze(-1)


@register_model("random_features")
def random_features(
    in_features: int, num_features: int, num_outputs: int, feature_seed: int = 0, feature_scale: float = 1.0
) -> nn.Module:
    """The linear model on fixed random ReLU features of SPEC §6.1 (see :class:`RandomFeatures`)."""
    return RandomFeatures(in_features, num_features, num_outputs, feature_seed, feature_scale)


@register_model("relu_gate")
def relu_gate(in_features: int) -> nn.Module:
    """The single ReLU gate of SPEC §6.2 (see :class:`ReluGate`)."""
    return ReluGate(in_features)


@register_model("diagonal_homogeneous")
def diagonal_homogeneous(in_features: int, d: int = 2) -> nn.Module:
    """The weight d-homogeneous, feature-linear predictor of SPEC §6.3 (see :class:`DiagonalHomogeneous`)."""
    return DiagonalHomogeneous(in_features, d)


# ----------------------------------------------------------------------------- conformance models
# Small models of the features a replay must handle (normalization, dropout, mixed dtypes,
# attention, token ids, recurrence, tied and frozen weights): tests/test_conformance.py records
# and replays each. Every factory maps a batch [N, ...] to outputs [N, num_outputs].

PAD_TOKEN = 0  # the token id of padding in the conformance token models


@register_model("bn_cnn")
def bn_cnn(num_outputs: int, in_channels: int = 1, width: int = 4) -> nn.Module:
    """Convolution, ``BatchNorm2d``, relu and a linear head: ``[N, in_channels, H, W]`` -> ``[N, C]``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * width, num_outputs),
    )


@register_model("dropout_mlp")
def dropout_mlp(in_features: int, num_outputs: int, hidden: int = 8, p: float = 0.3) -> nn.Module:
    """An MLP with ``Dropout`` after its hidden layer: ``[N, in_features]`` -> ``[N, C]``."""
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(p), nn.Linear(hidden, num_outputs)
    )


class MixedDtypes(nn.Module):
    """A float32 MLP whose hidden units are scaled by a float64 buffer ``scale`` ``[hidden]`` and
    permuted by an int64 buffer ``order`` ``[hidden]``: ``[N, in_features]`` -> ``[N, C]``."""

    scale: Tensor
    order: Tensor

    def __init__(self, in_features: int, num_outputs: int, hidden: int = 8):
        super().__init__()
        self.fc = nn.Linear(in_features, hidden)
        self.head = nn.Linear(hidden, num_outputs)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, hidden, dtype=torch.float64))
        self.register_buffer("order", torch.arange(hidden).flip(0))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc(x)) * self.scale.to(x.dtype)
        return self.head(h[:, self.order])


@register_model("mixed_dtypes")
def mixed_dtypes(in_features: int, num_outputs: int, hidden: int = 8) -> nn.Module:
    """See :class:`MixedDtypes`."""
    return MixedDtypes(in_features, num_outputs, hidden)


class TinyAttention(nn.Module):
    """Pre-norm self-attention block over a sequence: ``[N, L, in_features]`` -> ``[N, C]``
    (``Linear`` embedding, ``LayerNorm``, ``MultiheadAttention``, a ``GELU`` MLP, mean pooling)."""

    def __init__(self, in_features: int, num_outputs: int, width: int = 8, heads: int = 2):
        super().__init__()
        self.embed = nn.Linear(in_features, width)
        self.norm1 = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        a = self.norm1(h)
        h = h + self.attention(a, a, a, need_weights=False)[0]
        h = h + self.mlp(self.norm2(h))
        return self.head(h.mean(1))


@register_model("tiny_attention")
def tiny_attention(in_features: int, num_outputs: int, width: int = 8, heads: int = 2) -> nn.Module:
    """See :class:`TinyAttention`."""
    return TinyAttention(in_features, num_outputs, width, heads)


class TokenBag(nn.Module):
    """Embeddings of int64 token ids ``[N, L]`` averaged over the tokens that are not :data:`PAD_TOKEN`
    (the padding mask derived from the ids), then an MLP: -> ``[N, C]``."""

    def __init__(self, vocab: int, num_outputs: int, width: int = 8):
        super().__init__()
        self.embedding = nn.Embedding(vocab, width, padding_idx=PAD_TOKEN)
        self.fc = nn.Linear(width, width)
        self.head = nn.Linear(width, num_outputs)

    def forward(self, ids: Tensor) -> Tensor:
        keep = (ids != PAD_TOKEN).unsqueeze(-1)  # [N, L, 1]
        pooled = (self.embedding(ids) * keep).sum(1) / keep.sum(1).clamp_min(1)
        return self.head(torch.relu(self.fc(pooled)))


@register_model("token_bag")
def token_bag(vocab: int, num_outputs: int, width: int = 8) -> nn.Module:
    """See :class:`TokenBag`."""
    return TokenBag(vocab, num_outputs, width)


class TiedTokens(nn.Module):
    """Token ids ``[N, L]`` -> logits over the vocabulary ``[N, vocab]`` whose output head shares
    its weight with the input embedding (one parameter, ``embedding.weight``)."""

    def __init__(self, vocab: int, num_outputs: int, width: int = 6):
        super().__init__()
        if num_outputs != vocab:
            raise ValueError(f"tied weights need num_outputs == vocab, got {num_outputs} and {vocab}")
        self.embedding = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(self.embedding(ids).mean(1))))


@register_model("tied_tokens")
def tied_tokens(vocab: int, num_outputs: int, width: int = 6) -> nn.Module:
    """See :class:`TiedTokens`."""
    return TiedTokens(vocab, num_outputs, width)


class KeywordTokens(nn.Module):
    """Named inputs, as a transformers model takes them: ``input_ids`` int64 ``[N, L]`` and
    ``attention_mask`` ``[N, L]`` (1 for a token, 0 for padding); the embeddings of the tokens
    averaged, an MLP, and the outputs returned as ``{"logits": [N, C]}``."""

    def __init__(self, vocab: int, num_outputs: int, width: int = 6):
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        self.fc = nn.Linear(width, width)
        self.head = nn.Linear(width, num_outputs)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        keep = attention_mask.unsqueeze(-1)  # [N, L, 1]
        pooled = (self.embedding(input_ids) * keep).sum(1) / keep.sum(1).clamp_min(1)
        return {"logits": self.head(torch.relu(self.fc(pooled)))}


@register_model("keyword_tokens")
def keyword_tokens(vocab: int, num_outputs: int, width: int = 6) -> nn.Module:
    """See :class:`KeywordTokens`."""
    return KeywordTokens(vocab, num_outputs, width)


class Recurrent(nn.Module):
    """A ``GRU`` over a sequence ``[N, L, in_features]``, its last hidden state to a linear head:
    -> ``[N, C]``."""

    def __init__(self, in_features: int, num_outputs: int, hidden: int = 6):
        super().__init__()
        self.rnn = nn.GRU(in_features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


@register_model("gru")
def gru(in_features: int, num_outputs: int, hidden: int = 6) -> nn.Module:
    """See :class:`Recurrent`."""
    return Recurrent(in_features, num_outputs, hidden)


class Adapter(nn.Module):
    """A frozen base layer (``requires_grad=False``) with a trainable low-rank adapter beside it,
    and a trainable head: ``[N, in_features]`` -> ``[N, C]``."""

    def __init__(self, in_features: int, num_outputs: int, hidden: int = 8, rank: int = 2):
        super().__init__()
        self.base = nn.Linear(in_features, hidden)
        self.base.requires_grad_(False)
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, hidden, bias=False)
        self.head = nn.Linear(hidden, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.base(x) + self.up(self.down(x))))


@register_model("adapter")
def adapter(in_features: int, num_outputs: int, hidden: int = 8, rank: int = 2) -> nn.Module:
    """See :class:`Adapter`."""
    return Adapter(in_features, num_outputs, hidden, rank)


# ----------------------------------------------------------------------------- Hugging Face transformers

# The Auto classes a run may name: each builds a model whose outputs carry ``logits`` [N, C].
TRANSFORMERS_AUTO_CLASSES = (
    "AutoModelForSequenceClassification",
    "AutoModelForImageClassification",
)
# Keys of a stored configuration that are never passed on: ``auto_map`` points at remote code.
_IGNORED_CONFIG_KEYS = ("auto_map", "trust_remote_code", "model_type", "transformers_version")


@register_model("transformers")
def transformers_model(auto_class: str, config: dict[str, Any]) -> nn.Module:
    """A Hugging Face ``transformers`` model, built by the Auto class ``auto_class`` (one of
    :data:`TRANSFORMERS_AUTO_CLASSES`) from its configuration ``config`` (``model.config.to_dict()``,
    see :func:`transformers_spec`), randomly initialised: the snapshots hold its weights. Only
    model types that ``transformers`` itself defines are built: never remote code, never a
    download. Inputs are named tensors (``input_ids``, ``attention_mask``, ...), outputs the
    ``logits`` [N, C] of what it returns. Attention is built ``eager`` (its plain operations, the
    values of the fused kernels a training may use, up to rounding): that is what ``vmap`` and
    forward-mode derivatives go through."""
    if auto_class not in TRANSFORMERS_AUTO_CLASSES:
        raise ValueError(f"auto_class must be one of {TRANSFORMERS_AUTO_CLASSES}, got {auto_class!r}")
    if not isinstance(config, dict):
        raise ValueError("config must be a JSON object (model.config.to_dict())")
    try:
        import transformers
    except ImportError:
        raise ValueError(
            "this run holds a Hugging Face transformers model: pip install 'local-elasticity[transformers]'"
        ) from None
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in transformers.CONFIG_MAPPING:
        raise ValueError(f"model_type {model_type!r} is not a model type transformers defines")
    settings = {k: v for k, v in config.items() if k not in _IGNORED_CONFIG_KEYS}
    built = transformers.AutoConfig.for_model(model_type, **settings)
    # attention by its plain operations (replay differentiates it forward and maps it over probes)
    return getattr(transformers, auto_class).from_config(
        built, trust_remote_code=False, attn_implementation="eager"
    )


def transformers_spec(model: nn.Module, auto_class: str = "AutoModelForSequenceClassification") -> ModelSpec:
    """The :class:`ModelSpec` of a Hugging Face ``transformers`` ``model``: its configuration as
    JSON and the Auto class that builds it again (:func:`transformers_model`)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError(f"{type(model).__name__} is not a transformers model (it has no config)")
    return ModelSpec("transformers", {"auto_class": auto_class, "config": config.to_dict()})
