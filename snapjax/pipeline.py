"""Text to image: tokenizer, text encoder, UNet + DDIM (+ guidance), VAE decoder.

Legend: B batch, L tokens, D context width, H/W image side, h/w latent side, C latent channels.

A pipeline folder is either a diffusers Stable Diffusion folder (``model_index.json`` with
``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) or snapjax's own
(``snapjax_pipeline.json`` beside the same subfolders holding snapjax model folders).

:class:`TextToImage` samples through :mod:`snapjax.sampling`, the path training previews take
too: the same prompt and seed give the same image in both.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from snapjax import pretrained, sampling, storage
from snapjax.diffusion.schedule import NoiseSchedule, ddim_timesteps
from snapjax.models.tokenizer import Tokenizer

PIPELINE_FILE = "snapjax_pipeline.json"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")
# What diffusers' StableDiffusionPipeline samples with when a folder records nothing else.
DEFAULT_NUM_STEPS = 50
DEFAULT_GUIDANCE_SCALE = 7.5


@dataclasses.dataclass(frozen=True)
class PipelineFile:
    """The contents of ``snapjax_pipeline.json``: schedule, default latent side, and the
    sampling defaults the model was trained or evaluated with (None where not recorded).

    ``timesteps`` is the exact DDIM grid of ``num_steps`` under the schedule (a distilled student
    is only right on the grid it learned; a reader checks the schedule still gives it), and
    ``guidance_conditioned`` says whether the UNet takes the guidance scale as an input (one
    UNet call per step) or guidance needs two calls. Both are written by :meth:`to_json`.
    """

    schedule: NoiseSchedule
    sample_size: int
    num_steps: int | None = None
    guidance_scale: float | None = None
    guidance_conditioned: bool = False

    @property
    def timesteps(self) -> list[int] | None:
        if self.num_steps is None:
            return None
        return [int(t) for t in ddim_timesteps(self.schedule, self.num_steps)]

    def to_json(self) -> str:
        meta = {"scheduler": dataclasses.asdict(self.schedule), "sample_size": self.sample_size}
        if self.num_steps is not None:
            meta["num_steps"] = self.num_steps
            meta["timesteps"] = self.timesteps
        if self.guidance_scale is not None:
            meta["guidance_scale"] = self.guidance_scale
        meta["guidance_conditioned"] = self.guidance_conditioned
        return json.dumps(meta, indent=1)


_PIPELINE_KEYS = {"scheduler", "sample_size", "num_steps", "timesteps", "guidance_scale",
                  "guidance_conditioned"}


def read_pipeline_file(folder: str | os.PathLike) -> PipelineFile:
    """Read and check ``folder/snapjax_pipeline.json``; errors name the file and the key."""
    path = storage.path(folder) / PIPELINE_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    unknown = sorted(set(meta) - _PIPELINE_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}")
    for key in ("scheduler", "sample_size"):
        if meta.get(key) is None:
            raise ValueError(f"{path}: missing key {key!r}")
    if not isinstance(meta["scheduler"], dict):
        raise ValueError(f"{path}: 'scheduler' must be an object of NoiseSchedule fields")
    try:
        schedule = NoiseSchedule(**meta["scheduler"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad 'scheduler': {e}") from None

    def positive(key, kind):
        value = meta.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
            raise ValueError(f"{path}: {key!r} must be a positive "
                             f"{'integer' if kind is int else 'number'}, got {value!r}")
        return value

    conditioned = meta.get("guidance_conditioned", False)
    if not isinstance(conditioned, bool):
        raise ValueError(f"{path}: 'guidance_conditioned' must be true or false, "
                         f"got {conditioned!r}")
    guidance = positive("guidance_scale", (int, float))
    file = PipelineFile(schedule=schedule, sample_size=positive("sample_size", int),
                        num_steps=positive("num_steps", int),
                        guidance_scale=None if guidance is None else float(guidance),
                        guidance_conditioned=conditioned)
    recorded = meta.get("timesteps")
    if recorded is not None:
        if file.num_steps is None:
            raise ValueError(f"{path}: 'timesteps' without 'num_steps'")
        if recorded != file.timesteps:
            raise ValueError(f"{path}: 'timesteps' {recorded} is not the grid the scheduler "
                             f"gives for {file.num_steps} steps ({file.timesteps}); the model was "
                             "trained on the recorded grid, so the schedule must reproduce it")
    return file


def _check_pipeline_folder(path: epath.Path) -> None:
    storage.check_readable(path, "pipeline folder")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a folder (expected a pipeline folder with "
                                f"{', '.join(COMPONENTS)} subfolders)")
    if not ((path / PIPELINE_FILE).is_file() or (path / "model_index.json").is_file()):
        raise FileNotFoundError(f"{path}: not a pipeline folder (no {PIPELINE_FILE} or "
                                "model_index.json; a folder whose write was killed has "
                                "neither: write it again with --overwrite)")
    missing = [c for c in COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise FileNotFoundError(f"{path}: pipeline folder without {', '.join(m + '/' for m in missing)}")


class TextToImage:
    """Generate images from prompts. Build with :meth:`from_pretrained` or from components."""

    def __init__(self, *, unet, unet_params, vae, vae_params, text_encoder, text_encoder_params,
                 tokenizer: Tokenizer, schedule: NoiseSchedule, sample_size: int,
                 num_steps: int = DEFAULT_NUM_STEPS,
                 guidance_scale: float = DEFAULT_GUIDANCE_SCALE):
        self.unet, self.unet_params = unet, unet_params
        self.vae, self.vae_params = vae, vae_params
        self.text_encoder, self.text_encoder_params = text_encoder, text_encoder_params
        self.tokenizer = tokenizer
        self.schedule = schedule
        self.sample_size = sample_size  # default latent side
        # Sampling defaults, saved with the folder: a model trained and scored at 50 steps and
        # guidance 4 (the world teacher), or distilled to 8 steps, samples that way by default.
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=jnp.float32) -> "TextToImage":
        """Load a diffusers or snapjax pipeline folder; ``dtype`` is the compute dtype."""
        path = storage.path(path)
        _check_pipeline_folder(path)
        unet, unet_params = pretrained.load_component(path / "unet", "unet", dtype=dtype)
        vae, vae_params = pretrained.load_component(path / "vae", "vae", dtype=dtype)
        text_encoder, text_params = pretrained.load_component(
            path / "text_encoder", "text_encoder", dtype=dtype)
        tokenizer = Tokenizer.from_folder(path / "tokenizer")
        num_steps, guidance_scale = DEFAULT_NUM_STEPS, DEFAULT_GUIDANCE_SCALE
        if (path / PIPELINE_FILE).is_file():
            meta = read_pipeline_file(path)
            if meta.guidance_conditioned != bool(unet.spec.guidance_embed_dim):
                raise ValueError(f"{path / PIPELINE_FILE}: guidance_conditioned="
                                 f"{str(meta.guidance_conditioned).lower()} but unet/ has "
                                 f"guidance_embed_dim={unet.spec.guidance_embed_dim}")
            schedule, sample_size = meta.schedule, meta.sample_size
            num_steps = meta.num_steps or num_steps  # recorded values are positive
            guidance_scale = meta.guidance_scale or guidance_scale
        else:
            config = path / "scheduler" / "scheduler_config.json"
            if not config.is_file():
                raise FileNotFoundError(f"{path}: no scheduler/scheduler_config.json")
            schedule = NoiseSchedule.from_diffusers_config(config)
            unet_config = json.loads((path / "unet" / "config.json").read_text())
            sample_size = int(unet_config.get("sample_size") or 64)
        return cls(unet=unet, unet_params=unet_params, vae=vae, vae_params=vae_params,
                   text_encoder=text_encoder, text_encoder_params=text_params,
                   tokenizer=tokenizer, schedule=schedule, sample_size=sample_size,
                   num_steps=num_steps, guidance_scale=guidance_scale)

    def save_pretrained(self, path: str | os.PathLike, *, overwrite: bool = False) -> epath.Path:
        """Write a snapjax pipeline folder, local or ``gs://`` (atomically:
        :func:`snapjax.pretrained.replace_folder`)."""
        def write(tmp: epath.Path) -> None:
            for kind, module, params in (("unet", self.unet, self.unet_params),
                                         ("vae", self.vae, self.vae_params),
                                         ("text_encoder", self.text_encoder,
                                          self.text_encoder_params)):
                pretrained.save_model(tmp / kind, kind, module.spec, params)
            self.tokenizer.save(tmp / "tokenizer")
            (tmp / PIPELINE_FILE).write_text(PipelineFile(
                self.schedule, self.sample_size, self.num_steps, self.guidance_scale,
                self.guidance_conditioned).to_json())

        return pretrained.replace_folder(path, write, overwrite=overwrite)

    @property
    def guidance_conditioned(self) -> bool:
        """The UNet takes the guidance scale as an input: one UNet call per step, not two."""
        return bool(self.unet.spec.guidance_embed_dim)

    @property
    def unet_calls_per_step(self) -> int:
        return 1 if self.guidance_conditioned or self.guidance_scale == 1 else 2

    @property
    def vae_factor(self) -> int:
        return self.vae.spec.downsample_factor

    def encode_prompts(self, prompts: Sequence[str]) -> jax.Array:
        """Context ``B L D`` for the prompts (the text encoder's last hidden state)."""
        ids = np.asarray(self.tokenizer(list(prompts)), np.int32)
        return sampling.encode_text(self.text_encoder, self.text_encoder_params, ids)

    def __call__(self, prompts: str | Sequence[str], *, num_steps: int | None = None,
                 guidance_scale: float | None = None, seed: int = 0,
                 latents: np.ndarray | None = None, negative_prompt: str | Sequence[str] | None = None, height: int | None = None,
                 width: int | None = None, return_latents: bool = False,
                 first_index: int = 0) -> np.ndarray:
        """Images ``B H W 3`` uint8, or with ``return_latents`` the final latents ``B h w C``.

        ``latents``: explicit initial noise (NHWC, unscaled); else drawn per example from
        ``(seed, first_index + i)``, so a prompt's image does not depend on how prompts are batched.
        Guidance uses ``negative_prompt`` (default: the empty prompt) when ``guidance_scale != 1``.
        ``num_steps`` and ``guidance_scale`` default to the pipeline's (see ``__init__``).
        """
        num_steps = self.num_steps if num_steps is None else num_steps
        guidance_scale = self.guidance_scale if guidance_scale is None else guidance_scale
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        batch = len(prompts)
        noise = self._initial_latents(batch, seed, latents, height, width, first_index)
        ids = np.asarray(self.tokenizer(prompts), np.int32)
        uncond_ids = None
        if self.guidance_conditioned and negative_prompt is not None:
            raise ValueError("negative_prompt: this pipeline's UNet is guidance-conditioned (it "
                             "takes the scale, not an unconditional pass), so it cannot use one")
        if guidance_scale != 1 and not self.guidance_conditioned:
            negative = negative_prompt if negative_prompt is not None else ""
            negative = [negative] * batch if isinstance(negative, str) else list(negative)
            if len(negative) != batch:
                raise ValueError(f"{len(negative)} negative prompts for {batch} prompts")
            uncond_ids = np.asarray(self.tokenizer(negative), np.int32)
        args = (self.unet, self.unet_params, self.text_encoder, self.text_encoder_params)
        options = dict(schedule=self.schedule, num_steps=num_steps,
                       guidance_scale=guidance_scale)
        if return_latents:
            return np.asarray(sampling.sample_latents(*args, ids, uncond_ids, noise, **options))
        return sampling.generate(*args, self.vae, self.vae_params, ids, uncond_ids, noise,
                                 **options)

    def _initial_latents(self, batch, seed, latents, height, width, first_index) -> jax.Array:
        channels = self.unet.spec.in_channels
        if latents is not None:
            latents = jnp.asarray(latents, jnp.float32)
            if latents.ndim != 4 or latents.shape[0] != batch or latents.shape[-1] != channels:
                raise ValueError(f"latents must be ({batch}, h, w, {channels}) (NHWC, one per "
                                 f"prompt), got {tuple(latents.shape)}")
            return latents
        hw = (self._latent_side("height", height), self._latent_side("width", width))
        return sampling.initial_noise(seed, batch, hw, channels, first_index)

    def _latent_side(self, name: str, pixels: int | None) -> int:
        if pixels is None:
            return self.sample_size
        multiple = self.vae_factor * 2 ** (self.unet.spec.num_stages - 1)
        if pixels <= 0 or pixels % multiple:
            raise ValueError(f"{name}={pixels} must be a positive multiple of {multiple} "
                             "(VAE factor x UNet downsampling)")
        return pixels // self.vae_factor


def assemble_pipeline(out: str | os.PathLike, base: str | os.PathLike,
                      replace: dict[str, str | os.PathLike], *, overwrite: bool = False) -> epath.Path:
    """Write pipeline folder ``out``: ``base``'s components and sampling defaults with some
    components taken from other model folders (``{"vae": decoder_folder}``), e.g. a distilled
    UNet with a pruned decoder. A VAE must have the latents of the UNet it serves."""
    unknown = sorted(set(replace) - {"unet", "vae", "text_encoder"})
    if unknown:
        raise ValueError(f"assemble_pipeline: cannot replace {unknown}; components are "
                         "unet, vae and text_encoder")
    pipe = TextToImage.from_pretrained(base)
    for kind, folder in replace.items():
        module, params = pretrained.load_component(folder, kind)
        setattr(pipe, kind, module)
        setattr(pipe, f"{kind}_params", params)
    if pipe.vae.spec.latent_channels != pipe.unet.spec.in_channels:
        raise ValueError(f"{replace.get('vae', storage.path(base) / 'vae')}: VAE latents have "
                         f"{pipe.vae.spec.latent_channels} channels, the UNet of {base} takes "
                         f"{pipe.unet.spec.in_channels}")
    if pipe.text_encoder.spec.width != pipe.unet.spec.context_dim:
        raise ValueError(f"text encoder width {pipe.text_encoder.spec.width} != the UNet's "
                         f"context_dim {pipe.unet.spec.context_dim}")
    return pipe.save_pretrained(out, overwrite=overwrite)


def image_grid(images_BHWC: np.ndarray, columns: int | None = None) -> np.ndarray:
    """Tile images into one (rows*H, columns*W, 3) array, row-major, black padding."""
    images_BHWC = np.asarray(images_BHWC)
    b, h, w, c = images_BHWC.shape
    columns = columns or int(np.ceil(np.sqrt(b)))
    rows = -(-b // columns)
    grid = np.zeros((rows * h, columns * w, c), images_BHWC.dtype)
    for i, img in enumerate(images_BHWC):
        r, col = divmod(i, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = img
    return grid
