"""Model folders and tokenizers as objectives load them (shapes only in abstract mode)."""

from __future__ import annotations

from snapjax import pretrained


def load_tokenizer(path: str, max_length: int):
    """A CLIP tokenizer folder; "" is the embedded world's vocabulary."""
    from snapjax.data.world import world_tokenizer_folder
    from snapjax.models.tokenizer import Tokenizer
    return Tokenizer.from_folder(path or world_tokenizer_folder(), max_length=max_length)


def load_component(path: str, kind: str, dtype, abstract: bool):
    """(module, params) of a model folder; params as ShapeDtypeStructs in abstract mode."""
    if abstract:
        spec = pretrained.read_spec(path, kind)
        return pretrained.build_module(kind, spec, dtype), pretrained.abstract_params(kind, spec)
    return pretrained.load_component(path, kind, dtype=dtype)
