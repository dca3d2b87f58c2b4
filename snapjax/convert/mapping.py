"""Declarative name maps between Flax parameter trees and PyTorch state dicts.

A model's map is a dict from a Flax module path (``"down_0_0_res/conv1"``) to a PyTorch module
prefix (``"down_blocks.0.resnets.0.conv1"``). Leaves translate by name and rank:

  Flax ``kernel`` 4-D (H W I O)  <->  torch ``weight`` (O I H W)
  Flax ``kernel`` 2-D (I O)      <->  torch ``weight`` (O I)
  Flax ``scale`` / ``embedding`` <->  torch ``weight``
  Flax ``bias``                  <->  torch ``bias``

The same map serves import (:func:`params_from_state_dict`) and export
(:func:`state_dict_from_params`), and both are strict: every tensor used once, every parameter
filled, every shape checked, with errors that name the tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from snapjax.convert.state_dict import WeightsError

ModuleMap = Mapping[str, str]


def _leaf_to_torch(leaf: str) -> str:
    return {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)


def _to_flax(leaf: str, a: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and a.ndim == 4:
        return np.transpose(a, (2, 3, 1, 0))
    if leaf == "kernel" and a.ndim == 2:
        return a.T
    return a


def _to_torch(leaf: str, a: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and a.ndim == 4:
        return np.transpose(a, (3, 2, 0, 1))
    if leaf == "kernel" and a.ndim == 2:
        return a.T
    return a


def _torch_name(module_map: ModuleMap, flax_path: tuple[str, ...], where: str) -> str:
    module, leaf = "/".join(flax_path[:-1]), flax_path[-1]
    if module not in module_map:
        raise WeightsError(f"{where}: no PyTorch name for parameter {module}/{leaf} "
                           "(the name map does not cover this module)")
    return f"{module_map[module]}.{_leaf_to_torch(leaf)}"


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], module_map: ModuleMap,
                           abstract_params: Any, where: str) -> dict:
    """Build a Flax param tree shaped like ``abstract_params`` (e.g. from ``jax.eval_shape``).

    Raises :class:`WeightsError` naming the first missing, extra or mis-shaped tensor.
    """
    flat = traverse_util.flatten_dict(abstract_params)
    out, used, problems = {}, set(), []
    for path, abstract in flat.items():
        name = _torch_name(module_map, path, where)
        if name not in state_dict:
            problems.append(f"missing tensor {name!r} (for {'/'.join(path)})")
            continue
        value = _to_flax(path[-1], np.asarray(state_dict[name]))
        if tuple(value.shape) != tuple(abstract.shape):
            problems.append(
                f"tensor {name!r} has shape {tuple(np.asarray(state_dict[name]).shape)}; the model "
                f"expects {tuple(_to_torch(path[-1], np.zeros(abstract.shape)).shape)}")
            continue
        out[path] = value.astype(abstract.dtype)
        used.add(name)
    extra = [n for n in sorted(set(state_dict) - used)
             if not any(repr(n) in p for p in problems)]
    if extra:
        shown = ", ".join(repr(n) for n in extra[:5])
        problems.append(f"{len(extra)} unexpected tensor(s) the model has no place for: {shown}"
                        + (" ..." if len(extra) > 5 else ""))
    if problems:
        raise WeightsError(f"{where}: " + "; ".join(problems[:6])
                           + (f"; and {len(problems) - 6} more" if len(problems) > 6 else ""))
    return traverse_util.unflatten_dict(out)


def state_dict_from_params(params: Any, module_map: ModuleMap, where: str = "params"
                           ) -> dict[str, np.ndarray]:
    """The inverse of :func:`params_from_state_dict`: PyTorch names and layouts, numpy arrays."""
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        out[_torch_name(module_map, path, where)] = np.ascontiguousarray(
            _to_torch(path[-1], np.asarray(value, dtype=np.float32)))
    return out
