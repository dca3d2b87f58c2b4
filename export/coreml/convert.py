"""PyTorch mirror -> Core ML ``.mlpackage`` (mlprogram, iOS16+), with Apple's names and shapes.

Tracing uses ``torch.jit.trace(..., check_trace=False)``: attention's float rounding differs
between the trace and its re-run check, which is not an error (DESIGN §8). Input dtypes follow
Apple's converter: the TextEncoder takes float32 ids; the Unet and VAEDecoder take fp16 tensors
when the model computes in fp16 (Core ML converts the Swift pipeline's float32 arrays).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from typing import Any

import numpy as np
import torch

from export.coreml.manifest import GUIDANCE_INPUT
from export.coreml.wrappers import TextEncoderWrapper, UnetWrapper, VAEDecoderWrapper

# Our component kind -> Apple's package / compiled model name.
PACKAGE_NAMES = {"text_encoder": "TextEncoder", "unet": "Unet", "vae_decoder": "VAEDecoder"}
OUTPUT_NAMES = {"text_encoder": ("last_hidden_state", "pooled_outputs"),
                "unet": ("noise_pred",), "vae_decoder": ("image",)}
PRECISIONS = ("float16", "float32")


@dataclasses.dataclass(frozen=True)
class TensorIO:
    name: str
    shape: tuple[int, ...]
    dtype: type  # np.float16 or np.float32


def input_specs(kind: str, spec: Any, *, batch: int, latent_size: int, context_length: int,
                precision: str) -> list[TensorIO]:
    """Apple's input names and shapes for ``kind`` (and, for a guidance-conditioned UNet, the
    guidance features :data:`~export.coreml.manifest.GUIDANCE_INPUT`)."""
    io_dtype = np.float16 if precision == "float16" else np.float32
    if kind == "text_encoder":
        return [TensorIO("input_ids", (1, spec.max_length), np.float32)]
    if kind == "unet":
        inputs = [TensorIO("sample", (batch, spec.in_channels, latent_size, latent_size), io_dtype),
                  TensorIO("timestep", (batch,), io_dtype),
                  TensorIO("encoder_hidden_states", (batch, spec.context_dim, 1, context_length),
                           io_dtype)]
        if spec.guidance_embed_dim:
            inputs.append(TensorIO(GUIDANCE_INPUT, (batch, spec.guidance_embed_dim), io_dtype))
        return inputs
    if kind == "vae_decoder":
        return [TensorIO("z", (1, spec.latent_channels, latent_size, latent_size), io_dtype)]
    raise ValueError(f"unknown component kind {kind!r}")


def wrap(kind: str, mirror: torch.nn.Module, schedule=None) -> torch.nn.Module:
    if kind == "text_encoder":
        return TextEncoderWrapper(mirror).eval()
    if kind == "unet":
        if schedule is None:
            raise ValueError("the Unet export needs the noise schedule (timestep -> alpha table)")
        return UnetWrapper(mirror, schedule).eval()
    if kind == "vae_decoder":
        return VAEDecoderWrapper(mirror).eval()
    raise ValueError(f"unknown component kind {kind!r}")


def example_tensors(inputs: list[TensorIO], kind: str, spec: Any) -> tuple[torch.Tensor, ...]:
    """float32 tracing inputs with valid values (token ids and timesteps in range)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for io in inputs:
        if io.name == "input_ids":
            out.append(torch.randint(0, spec.vocab_size, io.shape, generator=gen).float())
        elif io.name == "timestep":
            out.append(torch.full(io.shape, 981.0))
        else:
            out.append(torch.randn(io.shape, generator=gen))
    return tuple(out)


def to_coreml(kind: str, wrapper: torch.nn.Module, spec: Any, inputs: list[TensorIO], *,
              precision: str = "float16", metadata: dict | None = None):
    """Trace ``wrapper`` and convert it; returns an unloaded ``ct.models.MLModel`` (Linux-safe)."""
    model = convert_module(wrapper, inputs, OUTPUT_NAMES[kind],
                           example_tensors(inputs, kind, spec), precision=precision)
    model.author = "snapjax export"
    model.short_description = (f"snapjax {PACKAGE_NAMES[kind]} (Apple ml-stable-diffusion I/O "
                               "conventions)")
    model.user_defined_metadata["snapjax.kind"] = kind
    model.user_defined_metadata["snapjax.spec"] = spec.to_json()
    for key, value in (metadata or {}).items():
        model.user_defined_metadata[f"snapjax.{key}"] = (value if isinstance(value, str)
                                                         else json.dumps(value))
    return model


def convert_module(module: torch.nn.Module, inputs: list[TensorIO], output_names: tuple[str, ...],
                   examples: tuple[torch.Tensor, ...], *, precision: str = "float16"):
    """Trace ``module`` on ``examples`` and convert it to an mlprogram with these input and
    output names; returns an unloaded ``ct.models.MLModel`` (Linux-safe)."""
    import coremltools as ct

    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    with torch.no_grad():
        traced = torch.jit.trace(module, examples, check_trace=False)
    with _quiet("coremltools"):
        return ct.convert(
            traced,
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS16,
            inputs=[ct.TensorType(name=io.name, shape=io.shape, dtype=io.dtype) for io in inputs],
            # float32 outputs, as Apple's current converter writes them (Swift reads Float32).
            outputs=[ct.TensorType(name=name, dtype=np.float32) for name in output_names],
            compute_precision=(ct.precision.FLOAT16 if precision == "float16"
                               else ct.precision.FLOAT32),
            skip_model_load=True,
        )


@contextlib.contextmanager
def _quiet(logger_name: str):
    """coremltools warns once per untested torch version and per pass; keep the CLI readable."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def read_io(spec) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """{name: (shape, dtype name)} of a model spec's inputs and outputs."""
    from coremltools.proto import FeatureTypes_pb2

    def table(features):
        out = {}
        for f in features:
            arr = f.type.multiArrayType
            dtype = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(arr.dataType)
            out[f.name] = (tuple(int(d) for d in arr.shape), dtype)
        return out

    return table(spec.description.input), table(spec.description.output)


def compute_dtypes(spec) -> dict[str, int]:
    """How many ops of the mlprogram produce each float dtype (consts and casts excluded)."""
    from coremltools.proto import MIL_pb2

    counts: dict[str, int] = {}
    for function in spec.mlProgram.functions.values():
        block = function.block_specializations[function.opset]
        for op in block.operations:
            if op.type in ("const", "cast") or op.type.startswith("constexpr"):
                continue
            for o in op.outputs:
                name = MIL_pb2.DataType.Name(o.type.tensorType.dataType)
                if name.startswith("FLOAT"):
                    counts[name] = counts.get(name, 0) + 1
    return counts
