"""Channel pruning of the VAE decoder from the teacher's weights (SnapFusion's efficient decoder).

:func:`prune_decoder` keeps a ``ratio`` of every decoder width and copies the teacher's weights
for the channels kept, so training the student starts from a function close to the teacher's.

Which channels can be chosen independently:

* A *site* is a set of channels that must be kept or dropped together in every layer touching it.
  A residual stream is one site: the output of ``conv_in`` (or of an upsampler, or of a ResNet
  whose width changes), every ResNet input and output it passes through without a 1x1 shortcut,
  and the mid attention's input and output (residual adds need one index set). A ResNet's inner
  channels (conv1 out, norm2, conv2 in) are a site of their own, as are the mid attention's
  query/key channels (one set, so q.k sums the same dimensions) and its value channels.
* Every decoder site but the attention's is normalised by GroupNorm. Whole groups are kept, so a
  kept channel is normalised over exactly the channels its teacher group held, and the pruned
  decoder has fewer groups of the teacher's size: ``decoder_norm_groups`` = the teacher's groups
  times ``ratio``, rounded to the nearest whole group. The attention sites keep the same number
  of channels in every head.

Importance (one rule everywhere): the L1 norm of all the teacher's weights indexed by the channel,
on both sides: the filters that write it (kernel output slice, bias), the norms that scale it and
the filters that read it (kernel input slice). A group's importance is the sum over its channels;
the groups (or, per head, the channels) with the largest importance are kept. Both sides count
because a following GroupNorm divides away the scale of the filters that write a channel (an inner
channel's conv1 filters say little on their own), while the weights that read it do not.

Two corrections keep the pruned layers' outputs where the teacher's were:

* Dropped inputs' means. A layer that reads a GroupNorm's output (conv1, conv2, conv_out, the
  attention projections) loses its dropped input channels' contribution, whose mean is known from
  the weights: after a GroupNorm with scale a and offset b a channel is about a n + b, n ~ N(0, 1),
  so its mean is b, or E[silu(a n + b)] after SiLU. That mean times the dropped weights moves into
  the layer's bias. (Layers that read the raw stream, the 1x1 shortcut and the upsamplers, would
  need data for it and keep their bias.)
* Attention temperature. The teacher's logits are q.k / sqrt(d); with d' < d dimensions kept the
  student divides by sqrt(d'), so the kept query weights are scaled by sqrt(d' / d) and every kept
  dimension contributes to the logits exactly what it contributed in the teacher.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from snapjax.models.vae import VAEDecoder, VAESpec


@dataclasses.dataclass(frozen=True)
class Site:
    """A set of channels kept or dropped together. ``parts`` contiguous equal parts of the
    channels: GroupNorm groups (``whole_parts``: keep whole parts) or attention heads (keep the
    same number of channels in each)."""

    width: int
    parts: int
    whole_parts: bool


def prune_spec(spec: VAESpec, ratio: float = 0.5) -> VAESpec:
    """The spec :func:`prune_decoder` returns: the decoder keeps ``groups * ratio`` (rounded half
    up) of its GroupNorm groups, each of the teacher's size, so every decoder width scales by that
    fraction. The encoder is unchanged. ``ratio`` 1.0 returns ``spec`` itself."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"prune_decoder: ratio={ratio!r} must be a number in (0, 1]")
    groups = spec.decoder_groups
    kept = math.floor(groups * ratio + 0.5)
    if kept == groups:
        return spec
    if kept < 1:
        raise ValueError(
            f"prune_decoder: ratio={ratio} keeps {groups * ratio:.3g} of the decoder's {groups} "
            f"GroupNorm groups, less than one whole group (channels per group: "
            f"{[c // groups for c in spec.decoder_channels]}); use ratio >= {0.5 / groups:.3g}")
    channels = tuple(c // groups * kept for c in spec.decoder_channels)
    try:
        return dataclasses.replace(spec, decoder_channels=channels, decoder_norm_groups=kept)
    except ValueError as e:
        raise ValueError(f"prune_decoder: ratio={ratio} gives decoder widths {channels}: "
                         f"{e}") from e


@dataclasses.dataclass(frozen=True)
class Layer:
    """A decoder module's input and output sites (None: the latent or the image, never pruned) and
    what its input is: ``norm`` (a GroupNorm module path, then SiLU if ``silu``) or raw."""

    x: str | None
    y: str | None
    norm: str | None = None
    silu: bool = False


def decoder_sites(spec: VAESpec) -> tuple[dict[str, Site], dict[str, Layer]]:
    """The decoder's sites, and its modules (paths under ``decoder/``) as :class:`Layer` s."""
    ch, groups = spec.decoder_channels, spec.decoder_groups
    sites: dict[str, Site] = {}
    layers: dict[str, Layer] = {}

    def site(name: str, width: int, parts: int = groups, whole_parts: bool = True) -> str:
        sites[name] = Site(width, parts, whole_parts)
        return name

    def resnet(name: str, x: str, width: int) -> str:
        inner = site(f"{name}/inner", width)
        out = x
        if sites[x].width != width:
            out = site(name, width)
            layers[f"{name}/conv_shortcut"] = Layer(x, out)
        layers.update({f"{name}/norm1": Layer(x, x),
                       f"{name}/conv1": Layer(x, inner, f"{name}/norm1", silu=True),
                       f"{name}/norm2": Layer(inner, inner),
                       f"{name}/conv2": Layer(inner, out, f"{name}/norm2", silu=True)})
        return out

    # Streams are named after the layer that starts them.
    x = site("conv_in", ch[-1])
    layers["conv_in"] = Layer(None, x)
    x = resnet("mid_res_0", x, ch[-1])
    if spec.mid_attention:
        heads, norm = spec.mid_attention_heads, "mid_attn/group_norm"
        qk = site("mid_attn/qk", ch[-1], heads, whole_parts=False)
        v = site("mid_attn/v", ch[-1], heads, whole_parts=False)
        layers.update({norm: Layer(x, x), "mid_attn/to_q": Layer(x, qk, norm),
                       "mid_attn/to_k": Layer(x, qk, norm), "mid_attn/to_v": Layer(x, v, norm),
                       "mid_attn/to_out": Layer(v, x)})
    x = resnet("mid_res_1", x, ch[-1])
    for i, c in enumerate(reversed(ch)):
        for j in range(spec.layers_per_block + 1):
            x = resnet(f"up_{i}_res_{j}", x, c)
        if i < len(ch) - 1:
            out = site(f"up_{i}_upsample", c)
            layers[f"up_{i}_upsample/conv"] = Layer(x, out)
            x = out
    layers["conv_norm_out"] = Layer(x, x)
    layers["conv_out"] = Layer(x, None, "conv_norm_out", silu=True)
    return sites, layers


def _decoder_modules(params: dict) -> dict[str, dict[str, Any]]:
    """Decoder module path -> {leaf name: array}."""
    modules: dict[str, dict[str, Any]] = {}
    for path, leaf in traverse_util.flatten_dict(params["decoder"]).items():
        modules.setdefault("/".join(path[:-1]), {})[path[-1]] = leaf
    return modules


def _check_params(spec: VAESpec, params: dict) -> None:
    if not isinstance(params, Mapping) or "decoder" not in params:
        got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError("prune_decoder: params must be a VAE or VAEDecoder param tree (with a "
                         f"'decoder' subtree); got {got}")
    expected = jax.eval_shape(VAEDecoder(spec).init, jax.random.key(0),
                              jnp.zeros((1, 1, 1, spec.latent_channels)))["params"]["decoder"]
    want = traverse_util.flatten_dict(expected)
    have = traverse_util.flatten_dict(params["decoder"])
    for path in sorted(set(want) | set(have)):
        name = "decoder/" + "/".join(path)
        if path not in have:
            raise ValueError(f"prune_decoder: params lack {name} (shape {want[path].shape}) "
                             "that the spec's decoder has")
        if path not in want:
            raise ValueError(f"prune_decoder: params have {name}, which the spec's decoder lacks")
        if tuple(have[path].shape) != tuple(want[path].shape):
            raise ValueError(f"prune_decoder: {name} has shape {tuple(have[path].shape)}; the "
                             f"spec's decoder needs {tuple(want[path].shape)}")


def channel_importance(spec: VAESpec, params: dict) -> dict[str, np.ndarray]:
    """Site name -> importance of each of its channels (float64): the L1 norm of every decoder
    weight indexed by the channel (kernel input and output slices, biases, GroupNorm scales and
    offsets)."""
    sites, layers = decoder_sites(spec)
    scores = {name: np.zeros(s.width) for name, s in sites.items()}
    for module, leaves in _decoder_modules(params).items():
        x, y = layers[module].x, layers[module].y
        for leaf in leaves.values():
            a = np.abs(np.asarray(leaf, np.float64))
            if a.ndim == 1:  # bias, scale: indexed by the output channel
                if y is not None:
                    scores[y] += a
                continue
            if x is not None:  # kernels: (..., in, out), conv and Dense alike
                scores[x] += a.sum(axis=tuple(i for i in range(a.ndim) if i != a.ndim - 2))
            if y is not None:
                scores[y] += a.sum(axis=tuple(range(a.ndim - 1)))
    return scores


def _keep(score: np.ndarray, site: Site, width: int) -> np.ndarray:
    """Sorted indices of the ``width`` channels kept (highest importance first; ties: lowest
    index)."""
    size = site.width // site.parts
    by_part = score.reshape(site.parts, size)
    if site.whole_parts:
        parts = width // size
        best = np.argsort(-by_part.sum(axis=1), kind="stable")[:parts]
        return np.sort((best[:, None] * size + np.arange(size)).ravel())
    per_part = width // site.parts
    best = np.argsort(-by_part, axis=1, kind="stable")[:, :per_part]
    return np.sort((best + np.arange(site.parts)[:, None] * size).ravel())


def select_channels(spec: VAESpec, params: dict, ratio: float = 0.5) -> dict[str, np.ndarray]:
    """Site name -> sorted indices of the teacher channels :func:`prune_decoder` keeps."""
    _check_params(spec, params)
    small = prune_spec(spec, ratio)
    sites = decoder_sites(spec)[0]
    small_sites = decoder_sites(small)[0]
    scores = channel_importance(spec, params)
    return {name: _keep(scores[name], site, small_sites[name].width)
            for name, site in sites.items()}


# Probabilists' Gauss-Hermite nodes: E[f(n)] for n ~ N(0, 1) as a weighted sum.
_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(40)
_WEIGHTS = _WEIGHTS / _WEIGHTS.sum()


def _input_means(layer: Layer, module: str, teacher: dict[str, dict[str, np.ndarray]]
                 ) -> np.ndarray | None:
    """The expected value of each input channel of ``module`` (teacher widths), where the weights
    alone tell it: after a GroupNorm (scale a, offset b) a channel is a n + b with n about N(0, 1),
    so its mean is b, or E[silu(a n + b)] after SiLU; the attention's values average the value
    projection of the normalised input. None for raw inputs (the stream's mean needs data)."""
    if layer.norm is not None:
        a, b = teacher[layer.norm]["scale"], teacher[layer.norm]["bias"]
        if not layer.silu:
            return b
        y = a[:, None] * _NODES[None] + b[:, None]
        return (y * 0.5 * (1 + np.tanh(y / 2))) @ _WEIGHTS  # silu, without exp overflow
    if module == "mid_attn/to_out":
        v, norm = teacher["mid_attn/to_v"], teacher["mid_attn/group_norm"]
        return norm["bias"] @ v["kernel"] + v["bias"]
    return None


def prune_decoder(spec: VAESpec, params: dict, ratio: float = 0.5) -> tuple[VAESpec, dict]:
    """A decoder ``ratio`` as wide as the teacher ``(spec, params)``, with the teacher's weights for
    the channels :func:`channel_importance` ranks highest (whole GroupNorm groups, one index set
    per residual stream). ``params``: a :class:`VAEDecoder` or a whole :class:`VAE` tree; the
    encoder and ``post_quant_conv`` are returned as they are. Ratio 1.0 returns the teacher's spec
    and bit-identical weights.

    Dropped inputs' means move into the biases and the query keeps the teacher's temperature
    (module docstring)."""
    small = prune_spec(spec, ratio)
    kept = select_channels(spec, params, ratio)
    sites, layers = decoder_sites(spec)
    teacher = {m: {k: np.asarray(v) for k, v in leaves.items()}
               for m, leaves in _decoder_modules(params).items()}
    decoder: dict[tuple[str, ...], Any] = {}
    for module, leaves in teacher.items():
        layer = layers[module]
        x, y = layer.x, layer.y
        for name, a in leaves.items():
            if a.ndim == 1:
                a = a if y is None else a[kept[y]]
            else:
                a = a if x is None else np.take(a, kept[x], axis=a.ndim - 2)
                a = a if y is None else np.take(a, kept[y], axis=a.ndim - 1)
            decoder[tuple(module.split("/")) + (name,)] = a
        dropped = np.setdiff1d(np.arange(sites[x].width), kept[x]) if x is not None else ()
        means = _input_means(layer, module, teacher) if len(dropped) else None
        if means is not None:
            # Summed over the kernel taps: exact inside the image, where zero padding is not read.
            w = np.take(leaves["kernel"].astype(np.float64), dropped, axis=-2)
            w = w.reshape(-1, len(dropped), w.shape[-1]).sum(axis=0)
            shift = means[dropped].astype(np.float64) @ w
            path = tuple(module.split("/")) + ("bias",)
            bias = decoder[path]
            decoder[path] = (bias + (shift if y is None else shift[kept[y]])).astype(bias.dtype)
    if spec.mid_attention:
        head_dim = spec.decoder_channels[-1] // spec.mid_attention_heads
        small_head_dim = small.decoder_channels[-1] // spec.mid_attention_heads
        temperature = math.sqrt(small_head_dim / head_dim)
        for name in ("kernel", "bias") if temperature != 1 else ():
            path = ("mid_attn", "to_q", name)
            decoder[path] = (decoder[path] * temperature).astype(decoder[path].dtype)
    decoder = {path: jnp.asarray(a) for path, a in decoder.items()}
    return small, {**params, "decoder": traverse_util.unflatten_dict(decoder)}
