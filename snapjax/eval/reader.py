"""The attribute reader: a small CNN that reads a world image's attributes back.

It is the embedded world's stand-in for CLIP and Inception: `attribute_accuracy` of generated
images against their prompts' attributes is the world's CLIP score, and the Fréchet distance
between reader features of generated and real images is the world's FID. The reader trains
on a held-out world seed (never the seed the diffusion models train on) and caches itself,
so every stage and test scores with the same reader without retraining.

Legend: B batch, H height, W width, C channels, F features.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Mapping

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from snapjax import storage
from snapjax.data.world import WorldSpec, canonical_labels, render_batch
from snapjax.eval import frechet

READER_RESOLUTION = 32        # every image is read at this size, whatever the world's resolution
READER_WORLD_SEED = 10_000    # the reader's training images; the diffusion models use other seeds
EVAL_WORLD_SEED = 20_000      # fresh images for the accuracy recorded after training
DEFAULT_BATCH = 64
# Steps that reach > 98% on every attribute (measured, docs/world.md); binding attributes to
# one of two objects takes longer to learn.
DEFAULT_STEPS_ONE_OBJECT = 400
DEFAULT_STEPS_TWO_OBJECTS = 1200
DEFAULT_WIDTHS = (16, 32, 64)
DEFAULT_HIDDEN = 64
DEFAULT_LEARNING_RATE = 2e-3
_FORMAT = 1                   # bump when the saved layout or the network changes
_CHUNK = 256                  # images per forward pass at scoring time (fixed: one compilation)


class ReaderNet(nn.Module):
    """Conv stages (conv, relu, 2x max-pool) then one hidden layer (the features) and a head per attribute."""

    classes: tuple[int, ...]              # number of values of each attribute, in spec order
    widths: tuple[int, ...] = DEFAULT_WIDTHS
    hidden: int = DEFAULT_HIDDEN

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        h = x_BHWC
        for w in self.widths:
            h = nn.relu(nn.Conv(w, (3, 3))(h))
            h = nn.max_pool(h, (2, 2), strides=(2, 2))
        # Position needs to know where things are (flatten); shape is the same anywhere, and a
        # global max-pool lets every position share one shape detector, which learns far faster.
        h = jnp.concatenate([h.reshape(h.shape[0], -1), h.max(axis=(1, 2))], axis=-1)
        feats_BF = nn.relu(nn.Dense(self.hidden)(h))
        return feats_BF, tuple(nn.Dense(n)(feats_BF) for n in self.classes)


@dataclasses.dataclass(frozen=True)
class ReaderState:
    """A trained reader: the world it reads, its network and its parameters."""

    spec: WorldSpec
    params: dict
    widths: tuple[int, ...] = DEFAULT_WIDTHS
    hidden: int = DEFAULT_HIDDEN
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)

    @property
    def model(self) -> ReaderNet:
        return reader_net(self.spec, self.widths, self.hidden)

    @property
    def attribute_names(self) -> tuple[str, ...]:
        return tuple(self.spec.attributes)


def reader_net(spec: WorldSpec, widths=DEFAULT_WIDTHS, hidden: int = DEFAULT_HIDDEN) -> ReaderNet:
    return ReaderNet(classes=tuple(len(v) for v in spec.attributes.values()),
                     widths=tuple(widths), hidden=hidden)


def default_steps(spec: WorldSpec) -> int:
    return DEFAULT_STEPS_ONE_OBJECT if spec.max_objects == 1 else DEFAULT_STEPS_TWO_OBJECTS


def reader_world_seed(spec: WorldSpec) -> int:
    """The held-out world seed the reader trains on (never the spec's own seed)."""
    return READER_WORLD_SEED if spec.seed != READER_WORLD_SEED else READER_WORLD_SEED + 1


# ---- input ----

def to_reader_input(images) -> jax.Array:
    """uint8 [0, 255] or float [-1, 1] images [B, H, W, 3] -> float32 [-1, 1] at READER_RESOLUTION."""
    images = np.asarray(images) if not isinstance(images, jax.Array) else images
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3], got shape {images.shape}")
    if images.dtype == np.uint8:
        x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    elif jnp.issubdtype(images.dtype, jnp.floating):
        x = jnp.clip(jnp.asarray(images, jnp.float32), -1.0, 1.0)
    else:
        raise ValueError(f"images must be uint8 in [0, 255] or float in [-1, 1], got dtype {images.dtype}")
    if x.shape[1:3] != (READER_RESOLUTION, READER_RESOLUTION):
        x = jax.image.resize(x, (x.shape[0], READER_RESOLUTION, READER_RESOLUTION, 3),
                             method="linear", antialias=True)
    return x


# ---- training ----

def _augment_noise(rng: np.random.Generator, shape_BHWC) -> tuple[np.ndarray, np.ndarray]:
    """Per-image blur amounts [B,1,1,1] and scaled Gaussian noise [B,H,W,C], drawn on the host.

    Mild blur and noise, because generated images are a little soft and noisy; strong
    augmentation would let the reader see attributes that a bad sample does not show.
    (Drawn with numpy: jax.random's threefry costs seconds of compile time on CPU.)
    """
    b = shape_BHWC[0]
    mix_B = rng.uniform(0.0, 0.6, (b, 1, 1, 1)).astype(np.float32)
    sigma_B = rng.uniform(0.0, 0.1, (b, 1, 1, 1)).astype(np.float32)
    return mix_B, (sigma_B * rng.standard_normal(shape_BHWC, np.float32)).astype(np.float32)


def _augment(x_BHWC: jax.Array, mix_B: jax.Array, noise_BHWC: jax.Array) -> jax.Array:
    # 3x3 box blur with edge padding, mixed in per image, then additive noise.
    h, w = x_BHWC.shape[1:3]
    xp = jnp.pad(x_BHWC, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = sum(xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0
    return x_BHWC + mix_B * (blurred - x_BHWC) + noise_BHWC


def _loss(params, x_BHWC, labels, *, model: ReaderNet):
    _, logits = model.apply({"params": params}, x_BHWC)
    losses = [optax.softmax_cross_entropy_with_integer_labels(lg, y).mean()
              for lg, y in zip(logits, labels)]
    return sum(losses), jnp.stack(losses)


def _param_shapes(model: ReaderNet):
    x = jax.ShapeDtypeStruct((1, READER_RESOLUTION, READER_RESOLUTION, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


def init_params(model: ReaderNet, seed: int) -> dict:
    """He-normal kernels and zero biases, drawn with numpy.

    Same distribution family as Flax's default initialisers, but without compiling threefry
    sampling, which takes longer on CPU than the reader's whole training.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))

    def init(path, s):
        if path[-1].key == "bias":
            return np.zeros(s.shape, s.dtype)
        fan_in = int(np.prod(s.shape[:-1]))
        return (rng.standard_normal(s.shape) * np.sqrt(2.0 / fan_in)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(init, _param_shapes(model))


def train_step(params, opt_state, x_BHWC, labels, mix_B, noise_BHWC, *, model: ReaderNet,
               tx: optax.GradientTransformation):
    """One Adam step on the summed cross-entropy of all heads (augmented inputs)."""
    x_BHWC = _augment(x_BHWC, mix_B, noise_BHWC)
    (loss, per_head), grads = jax.value_and_grad(_loss, has_aux=True)(params, x_BHWC, labels, model=model)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, per_head


def train_reader(spec: WorldSpec = WorldSpec(), steps: int | None = None, batch: int = DEFAULT_BATCH,
                 seed: int = 0, *, learning_rate: float = DEFAULT_LEARNING_RATE,
                 widths=DEFAULT_WIDTHS, hidden: int = DEFAULT_HIDDEN, eval_size: int = 1000,
                 log=None) -> ReaderState:
    """Trains a reader on freshly rendered images of the held-out world seed.

    `seed` drives initialisation and augmentation; the images come from
    `reader_world_seed(spec)`. After training, accuracy on `eval_size` images of yet another
    seed is stored in `metrics` (0 skips it). steps=None: default_steps(spec).
    """
    steps = default_steps(spec) if steps is None else steps
    if steps < 1 or batch < 1:
        raise ValueError(f"train_reader needs steps >= 1 and batch >= 1, got {steps}, {batch}")
    data_spec = dataclasses.replace(spec, seed=reader_world_seed(spec))
    model = reader_net(spec, widths, hidden)
    params = init_params(model, seed)
    aug_rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    # Cosine decay to 5%: a fast start, then the last steps polish the decision boundaries.
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(50, steps // 10 + 1),
                                                  steps, end_value=0.05 * learning_rate)
    tx = optax.adam(schedule)
    opt_state = tx.init(params)
    step_fn = jax.jit(functools.partial(train_step, model=model, tx=tx), donate_argnums=(0, 1))

    start = time.perf_counter()
    loss = None
    for step in range(steps):
        images, _, labels = render_batch(np.arange(step * batch, (step + 1) * batch), data_spec)
        labels = canonical_labels(labels, spec)
        y = tuple(jnp.asarray(labels[a]) for a in spec.attributes)
        x = to_reader_input(images)
        params, opt_state, loss, _ = step_fn(params, opt_state, x, y, *_augment_noise(aug_rng, x.shape))
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log(f"reader step {step}: loss {float(loss):.4f}")
    metrics = {"train_seconds": time.perf_counter() - start, "steps": steps, "batch": batch,
               "final_loss": float(loss)}
    reader = ReaderState(spec=spec, params=jax.device_get(params), widths=tuple(widths),
                         hidden=hidden, metrics=metrics)
    if eval_size:
        eval_spec = dataclasses.replace(spec, seed=EVAL_WORLD_SEED)
        images, _, labels = render_batch(np.arange(eval_size), eval_spec)
        acc = attribute_accuracy(reader, images, labels)
        metrics.update({f"heldout_accuracy/{k}": v for k, v in acc.items()})
    return reader


# ---- reading ----

@functools.partial(jax.jit, static_argnames="model")
def _forward(params, x_BHWC, *, model: ReaderNet):
    feats_BF, logits = model.apply({"params": params}, x_BHWC)
    return feats_BF, tuple(jnp.argmax(lg, -1) for lg in logits)


def _run(reader: ReaderState, images) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    x = to_reader_input(images)
    n = x.shape[0]
    model = reader.model
    feats, preds = [], []
    for i in range(0, n, _CHUNK):
        chunk = x[i:i + _CHUNK]
        pad = _CHUNK - chunk.shape[0]
        if pad:   # pad to a fixed batch so that any N reuses one compiled program
            chunk = jnp.concatenate([chunk, jnp.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        f, p = _forward(reader.params, chunk, model=model)
        feats.append(np.asarray(f)[:_CHUNK - pad])
        preds.append([np.asarray(a)[:_CHUNK - pad] for a in p])
    names = reader.attribute_names
    if not feats:
        return np.zeros((0, reader.hidden), np.float32), {a: np.zeros(0, np.int32) for a in names}
    return (np.concatenate(feats), {a: np.concatenate([p[k] for p in preds]).astype(np.int32)
                                    for k, a in enumerate(names)})


def predict(reader: ReaderState, images) -> dict[str, np.ndarray]:
    """The attribute labels the reader sees in each image, in canonical form: {attr: int32 [N]}."""
    return _run(reader, images)[1]


def features(reader: ReaderState, images) -> np.ndarray:
    """Penultimate-layer features [N, F] (the world's Inception pool features)."""
    return _run(reader, images)[0]


def _stated_labels(reader: ReaderState, attributes: Mapping[str, np.ndarray], n: int
                   ) -> dict[str, np.ndarray]:
    unknown = set(attributes) - set(reader.attribute_names)
    if unknown:
        raise ValueError(f"attributes {sorted(unknown)} are not read by this reader "
                         f"(it reads {reader.attribute_names})")
    canon = canonical_labels(attributes, reader.spec)
    for attr, y in canon.items():
        if y.shape[0] != n:
            raise ValueError(f"attribute {attr!r} has {y.shape[0]} labels for {n} images")
    # Only attributes with at least one stated (>= 0) label count.
    return {a: canon[a] for a in reader.attribute_names if a in canon and (canon[a] >= 0).any()}


def _accuracy(preds: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, float]:
    return {a: float((preds[a][y >= 0] == y[y >= 0]).mean()) for a, y in labels.items()}


def attribute_accuracy(reader: ReaderState, images, attributes: Mapping[str, np.ndarray]
                       ) -> dict[str, float]:
    """Fraction of images whose attribute the reader reads as labelled, per attribute.

    Labels < 0 mean 'not stated' (see world.caption_labels) and are left out; attributes
    with no stated label are left out of the result. Labels are compared in canonical form
    (world.canonical_labels), so two-object labels need their relation.
    """
    preds = predict(reader, images)
    n = len(next(iter(preds.values())))
    return _accuracy(preds, _stated_labels(reader, attributes, n))


def frechet_distance(reader: ReaderState, images_a, images_b) -> float:
    """Fréchet distance between the reader features of two image sets (the world's FID)."""
    return frechet.frechet_distance(features(reader, images_a), features(reader, images_b))


def correct_per_image(reader: ReaderState, images, attributes: Mapping[str, np.ndarray]
                      ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Features [N, F]; per stated attribute a float [N] of 1 (read as captioned), 0 (not) or
    NaN (not stated for that image); and the every-stated-attribute-right indicator [N]."""
    feats, preds = _run(reader, images)
    labels = _stated_labels(reader, attributes, feats.shape[0])
    per_attr = {a: np.where(y >= 0, (preds[a] == y).astype(np.float64), np.nan)
                for a, y in labels.items()}
    ok = np.ones(feats.shape[0], bool)
    for attr, y in labels.items():
        ok &= (y < 0) | (preds[attr] == y)
    return feats, per_attr, ok.astype(np.float64)


def score(reader: ReaderState, images, attributes: Mapping[str, np.ndarray],
          reference_images=None) -> dict[str, float]:
    """The world's metrics: accuracy per attribute, their mean, the rate at which every
    stated attribute is right, and (given reference images) the Fréchet distance."""
    feats, per_attr, all_ok = correct_per_image(reader, images, attributes)
    acc = {a: float(np.nanmean(v)) for a, v in per_attr.items()}
    out = {f"accuracy/{k}": v for k, v in acc.items()}
    out["accuracy/mean"] = float(np.mean(list(acc.values()))) if acc else float("nan")
    out["accuracy/all"] = float(all_ok.mean()) if len(all_ok) else float("nan")
    if reference_images is not None:
        out["frechet_distance"] = frechet.frechet_distance(feats, features(reader, reference_images))
    return out


# ---- saving and caching ----

def save_reader(reader: ReaderState, folder) -> epath.Path:
    """Writes params.msgpack (flax serialization) and reader.json (world spec, network,
    metrics), that last; ``folder`` may be ``gs://``."""
    folder = storage.path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.msgpack").write_bytes(flax.serialization.to_bytes(reader.params))
    meta = {"format": _FORMAT, "spec": reader.spec.to_dict(), "widths": list(reader.widths),
            "hidden": reader.hidden, "metrics": dict(reader.metrics)}
    (folder / "reader.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def load_reader(folder) -> ReaderState:
    folder = storage.path(folder)  # local or gs://
    meta_path, params_path = folder / "reader.json", folder / "params.msgpack"
    for p in (meta_path, params_path):
        if not p.is_file():
            raise FileNotFoundError(f"reader folder {folder} has no {p.name}")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{meta_path}: reader format {meta.get('format')}, expected {_FORMAT}")
    spec = WorldSpec.from_dict(meta["spec"])
    model = reader_net(spec, meta["widths"], meta["hidden"])
    template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), _param_shapes(model))
    try:
        params = flax.serialization.from_bytes(template, params_path.read_bytes())
    except (ValueError, KeyError) as e:
        raise ValueError(f"{params_path} does not match the network in {meta_path}: {e}") from e
    return ReaderState(spec=spec, params=params, widths=tuple(meta["widths"]), hidden=meta["hidden"],
                       metrics=meta.get("metrics", {}))


def default_cache_dir() -> pathlib.Path:
    # local: a per-host cache of trained readers.
    return pathlib.Path(os.environ.get("SNAPJAX_CACHE", "~/.cache/snapjax")).expanduser()


def reader_key(spec: WorldSpec, steps: int, batch: int, seed: int) -> str:
    """A short hash of everything the trained reader depends on (not the spec's own seed)."""
    spec_d = dataclasses.replace(spec, seed=reader_world_seed(spec)).to_dict()
    blob = json.dumps({"spec": spec_d, "steps": steps, "batch": batch, "seed": seed,
                       "widths": DEFAULT_WIDTHS, "hidden": DEFAULT_HIDDEN,
                       "learning_rate": DEFAULT_LEARNING_RATE, "format": _FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def get_reader(spec: WorldSpec = WorldSpec(), cache_dir=None, *, steps: int | None = None,
               batch: int = DEFAULT_BATCH, seed: int = 0, log=None) -> ReaderState:
    """The cached reader for this world: loaded from cache_dir/reader-<hash>, trained once if absent."""
    steps = default_steps(spec) if steps is None else steps
    # local: the cache is this host's (renamed into place, below).
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = root / f"reader-{reader_key(spec, steps, batch, seed)}"
    if (folder / "reader.json").is_file():
        return dataclasses.replace(load_reader(folder), spec=spec)
    reader = train_reader(spec, steps, batch, seed, log=log)
    # Write to a temporary folder and rename, so a concurrent process never sees half a reader.
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=root))  # local: as root
    tmp.chmod(0o755)          # mkdtemp makes it private; the cache is meant to be shared
    save_reader(reader, tmp)
    try:
        tmp.rename(folder)
    except OSError:           # another process got there first; theirs is equivalent
        shutil.rmtree(tmp, ignore_errors=True)
    return reader
