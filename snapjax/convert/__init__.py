"""Import diffusers checkpoints into snapjax (no torch needed)."""

from snapjax.convert.unet import load_unet
from snapjax.convert.vae import load_vae
from snapjax.convert.text_encoder import load_text_encoder
