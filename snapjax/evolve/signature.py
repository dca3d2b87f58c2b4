"""What a block's cost depends on, as a string: the key of every latency table.

Two blocks with the same signature cost the same (same module, same input and output shapes),
so a table measured once per signature (on this backend, or on a phone) prices every block of
every spec evolution can reach, duplicates included. Signatures:

  ``res:{in}->{out}@{h}x{w}``                            a ResNet's residual branch
  ``attn:{c}@{h}x{w}:heads{n}:layers{k}:ctx{L}x{D}``      a cross-attention transformer

at batch 1, ``h x w`` the block's latent side and ``L x D`` the text context (77 x 768 for
SD-v1.5). A ResNet's entry is its residual branch only: its 1x1 shortcut (where channels change)
stays when the block is removed, so it belongs to the fixed part of the UNet.
"""

from __future__ import annotations

from snapjax.models.unet_spec import Block, UNetSpec

CONTEXT_LENGTH = 77  # CLIP's token count: SD-v1.5's context, the default for cost tables


def block_side(spec: UNetSpec, block: Block, latent_side: int) -> int:
    factor = 2 ** (spec.num_stages - 1)
    if latent_side % factor:
        raise ValueError(f"latent side {latent_side} is not a multiple of {factor} "
                         f"({spec.num_stages} stages)")
    return latent_side // 2 ** block.stage


def block_signature(spec: UNetSpec, block: Block, latent_side: int,
                    context_length: int = CONTEXT_LENGTH) -> str:
    side = block_side(spec, block, latent_side)
    if block.kind == "res":
        return f"res:{block.in_channels}->{block.out_channels}@{side}x{side}"
    s = block.stage
    return (f"attn:{block.out_channels}@{side}x{side}:heads{spec.num_heads[s]}"
            f":layers{spec.transformer_layers[s]}:ctx{context_length}x{spec.context_dim}")
