"""CLIP score of images against their prompts, with a transformers CLIP model folder.

The score of image I and caption C is torchmetrics' ``CLIPScore`` (Hessel et al. 2021, w = 100):

    clip_score(I, C) = max(100 * cos(E_I, E_C), 0)

with E_I, E_C the projected image and text embeddings. It lies in [0, 100]; SnapFusion and
most diffusion papers report it divided by 100 (SD-v1.5 at CFG 7.5 on COCO: about 0.30), which
is :func:`cosine` clamped at 0. torchmetrics clamps the mean over a set rather than each image;
the two agree whenever no cosine is negative, as with real CLIP models on real captions.

The model is PyTorch (``transformers.CLIPModel`` and its tokenizer, loaded with
``local_files_only``: nothing is ever downloaded; a ``gs://`` folder is copied to local disk
for the load). This is the one place snapjax touches torch,
against STYLE.md's "snapjax never imports torch": CLIP, like Inception for FID, is a metric
model whose published numbers come from its PyTorch weights, and a JAX port would be a second
CLIP to keep in parity. torch is imported only inside :class:`ClipScorer`, so importing this
module (or anything else in snapjax) does not need it.

Preprocessing is CLIP's (``CLIPImageProcessor``'s PIL path, as the original OpenAI code does):
resize the shorter side to ``size`` with bicubic filtering, center-crop to ``crop_size``,
scale to [0, 1], normalise by the processor's mean and std; read from the folder's
``preprocessor_config.json``, else the vision tower's image size and CLIP's standard constants.
Prompts are tokenized by the folder's tokenizer, truncated to the text tower's 77 positions
(the end token kept; torchmetrics cuts it off for longer prompts).

Legend: B batch, H/W image side, S CLIP image side, E embedding width.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
from etils import epath
from PIL import Image

from snapjax import storage

# CLIP's training statistics (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the "resample" code preprocessor configs use
_TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))
_FOLDER_HINT = ("a transformers CLIP model folder (config.json, the weights, the tokenizer "
                "files and preprocessor_config.json), e.g. openai/clip-vit-large-patch14 saved "
                "with CLIPModel.save_pretrained and CLIPProcessor.save_pretrained")


def check_folder(path: str | os.PathLike) -> epath.Path:
    """``path`` (local or ``gs://``) as a path if it looks like a CLIP model folder, else a
    ValueError saying what belongs there (checked before any model loads, so a run fails in
    seconds, not hours)."""
    folder = storage.path(path)
    with storage.clear_errors(path, "read"):
        _check_folder(folder)
    return folder


def _check_folder(folder: epath.Path) -> None:
    if not folder.is_dir():
        raise ValueError(f"CLIP model folder {folder} does not exist: it needs {_FOLDER_HINT}")
    if not (folder / "config.json").is_file():
        raise ValueError(f"CLIP model folder {folder} has no config.json: it needs {_FOLDER_HINT}")
    if not any(all((folder / f).is_file() for f in files) for files in _TOKENIZER_FILES):
        raise ValueError(f"CLIP model folder {folder} has no tokenizer (vocab.json and "
                         f"merges.txt, or tokenizer.json): it needs {_FOLDER_HINT}")


def _side(value, key: str) -> int:
    # Old configs write an int, new ones {"shortest_edge": n} or {"height": h, "width": w}.
    if isinstance(value, int):
        return value
    if "shortest_edge" in value:
        return int(value["shortest_edge"])
    if value.get("height") == value.get("width") and value.get("height"):
        return int(value["height"])
    raise ValueError(f"preprocessor_config.json: {key}={value!r} is not a single side "
                     "(a CLIP processor resizes the shorter side and crops a square)")


def read_preprocessing(folder: str | os.PathLike, image_size: int) -> dict:
    """{size, crop_size, mean, std, resample, rescale, do_*} from ``preprocessor_config.json``,
    else CLIP's standard pipeline at the vision tower's ``image_size``."""
    out = {"size": image_size, "crop_size": image_size, "mean": CLIP_MEAN, "std": CLIP_STD,
           "resample": _BICUBIC, "rescale": 1 / 255, "do_resize": True,
           "do_center_crop": True, "do_normalize": True}
    path = storage.path(folder) / "preprocessor_config.json"
    if not path.is_file():
        return out
    cfg = json.loads(path.read_text())
    if "size" in cfg:
        out["size"] = _side(cfg["size"], "size")
    if "crop_size" in cfg:
        out["crop_size"] = _side(cfg["crop_size"], "crop_size")
    out["mean"] = tuple(cfg.get("image_mean", out["mean"]))
    out["std"] = tuple(cfg.get("image_std", out["std"]))
    out["resample"] = int(cfg.get("resample", out["resample"]))
    out["rescale"] = float(cfg.get("rescale_factor", out["rescale"])) \
        if cfg.get("do_rescale", True) else 1.0
    for key in ("do_resize", "do_center_crop", "do_normalize"):
        out[key] = bool(cfg.get(key, True))
    return out


def preprocess(images_BHWC: np.ndarray, prep: dict) -> np.ndarray:
    """uint8 (B, H, W, 3) -> float32 (B, 3, S, S), as CLIPImageProcessor's PIL path makes it."""
    images_BHWC = np.asarray(images_BHWC)
    if images_BHWC.dtype != np.uint8 or images_BHWC.ndim != 4 or images_BHWC.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (B, H, W, 3), got {images_BHWC.dtype} "
                         f"{images_BHWC.shape}")
    mean = np.asarray(prep["mean"], np.float32)
    std = np.asarray(prep["std"], np.float32)
    out = []
    for image in images_BHWC:
        if prep["do_resize"]:
            h, w = image.shape[:2]
            short, long = min(h, w), max(h, w)
            new_short, new_long = prep["size"], int(prep["size"] * long / short)
            new_h, new_w = (new_long, new_short) if w <= h else (new_short, new_long)
            image = np.asarray(Image.fromarray(image).resize(
                (new_w, new_h), resample=Image.Resampling(prep["resample"])))
        if prep["do_center_crop"]:
            c = prep["crop_size"]
            h, w = image.shape[:2]
            if c > h or c > w:
                raise ValueError(f"image {h}x{w} is smaller than CLIP's {c}x{c} crop")
            top, left = (h - c) // 2, (w - c) // 2
            image = image[top:top + c, left:left + c]
        x = (image.astype(np.float64) * prep["rescale"]).astype(np.float32)
        if prep["do_normalize"]:
            x = (x - mean) / std
        out.append(x.transpose(2, 0, 1))
    return np.stack(out)


def scores_from_cosine(cos_B: np.ndarray) -> np.ndarray:
    """max(100 * cos, 0): the CLIP score in [0, 100] (divide by 100 for the paper's scale)."""
    return np.maximum(100.0 * np.asarray(cos_B, np.float64), 0.0)


class ClipScorer:
    """``scorer(images_uint8_BHWC, prompts) -> (B,)`` CLIP scores in [0, 100].

    Text and image features are separate calls (:meth:`text_features`, :meth:`image_features`)
    so a fixed prompt set is embedded once and every image set is scored against it.
    """

    def __init__(self, model, tokenizer, prep: dict, device, batch_size: int = 64):
        self.model, self.tokenizer, self.prep = model, tokenizer, prep
        self.device, self.batch_size = device, batch_size
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def from_folder(cls, path: str | os.PathLike, device: str | None = None,
                    batch_size: int = 64) -> "ClipScorer":
        """Load a CLIP folder, local or ``gs://`` (never from a hub). ``device``: a torch
        device; default the first CUDA device if torch has one, else the CPU."""
        check_folder(path)
        import torch  # the metric model is PyTorch: see the module docstring
        from transformers import CLIPModel, CLIPTokenizer

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # transformers reads local files only: a bucket's folder is copied for the load.
        with storage.local_folder(path) as folder:
            model = CLIPModel.from_pretrained(str(folder), local_files_only=True,
                                              dtype=torch.float32).to(device).eval()
            tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
            prep = read_preprocessing(folder, int(model.config.vision_config.image_size))
        return cls(model, tokenizer, prep, device, batch_size)

    def _features(self, fn, inputs: dict) -> np.ndarray:
        import torch
        with torch.inference_mode():
            out = fn(**{k: v.to(self.device) for k, v in inputs.items()})
            feats = getattr(out, "pooler_output", out)  # transformers 5 returns an output object
            feats = feats / feats.norm(p=2, dim=-1, keepdim=True)
        return feats.float().cpu().numpy()

    def text_features(self, prompts: Sequence[str]) -> np.ndarray:
        """Unit-norm text embeddings (B, E), float32."""
        if isinstance(prompts, str):
            raise TypeError("text_features expects a list of prompts, got one string")
        prompts, out = list(prompts), []
        for i in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(prompts[i:i + self.batch_size], padding=True,
                                    truncation=True, max_length=self.max_length,
                                    return_tensors="pt")
            out.append(self._features(self.model.get_text_features,
                                      {"input_ids": tokens["input_ids"],
                                       "attention_mask": tokens["attention_mask"]}))
        return np.concatenate(out)

    def image_features(self, images_BHWC: np.ndarray) -> np.ndarray:
        """Unit-norm image embeddings (B, E) of uint8 images, float32."""
        import torch
        pixels = preprocess(images_BHWC, self.prep)
        out = [self._features(self.model.get_image_features,
                              {"pixel_values": torch.from_numpy(pixels[i:i + self.batch_size])})
               for i in range(0, len(pixels), self.batch_size)]
        return np.concatenate(out)

    def cosine(self, images_BHWC: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """cos(E_I, E_C) per image and its prompt (B,), float64."""
        img, txt = self.image_features(images_BHWC), self.text_features(prompts)
        if img.shape[0] != txt.shape[0]:
            raise ValueError(f"{img.shape[0]} images but {txt.shape[0]} prompts")
        return np.sum(img.astype(np.float64) * txt.astype(np.float64), axis=-1)

    def __call__(self, images_BHWC: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """CLIP scores (B,) in [0, 100]: max(100 * cos, 0)."""
        return scores_from_cosine(self.cosine(images_BHWC, prompts))
