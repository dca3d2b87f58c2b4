"""Mesh shapes, logical-axis rules and batch checks (snapjax/sharding.py).

The rule logic is checked on abstract meshes (no devices needed); placing real arrays on
8 fake CPU devices runs in a subprocess so that this process keeps its single device.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from snapjax.sharding import MESH_AXES, MeshConfig, logical_axes, partition_spec, per_batch_shard


def mesh(data=1, fsdp=1, tensor=1):
    return AbstractMesh((data, fsdp, tensor), MESH_AXES)


def test_resolved_shape_fills_the_rest_and_rejects_bad_sizes():
    assert MeshConfig(data=-1, fsdp=4).resolved_shape(8) == (2, 4, 1)
    assert MeshConfig(data=2, fsdp=-1, tensor=2).resolved_shape(16) == (2, 4, 2)
    with pytest.raises(ValueError, match=r"8 devices cannot be split as data=-1, fsdp=3"):
        MeshConfig(data=-1, fsdp=3).resolved_shape(8)
    with pytest.raises(ValueError, match=r"= 4 devices, but 8 are available"):
        MeshConfig(data=2, fsdp=2).resolved_shape(8)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="names mesh axis 'model'"):
        MeshConfig(rules=(("embed", "model"),))


def test_logical_axes_by_kind():
    assert logical_axes(("conv_in", "kernel"), (3, 3, 4, 320)) == (None, None, "embed", "mlp")
    assert logical_axes(("to_q", "kernel"), (320, 320)) == ("embed", "mlp")
    assert logical_axes(("token_embedding", "embedding"), (49408, 768)) == ("vocab", "embed")
    assert logical_axes(("norm", "scale"), (320,)) == (None,)


def test_partition_spec_rules_threshold_and_divisibility():
    cfg = MeshConfig(min_shard_size=1000)
    m = mesh(data=2, fsdp=4)
    # conv kernel: input channels over fsdp; mlp -> tensor, which has size 1: not named.
    assert partition_spec(("k",), (3, 3, 64, 128), m, cfg) == P(None, None, "fsdp")
    # small: replicated, whatever its shape.
    assert partition_spec(("k",), (3, 3, 4, 8), m, cfg) == P()
    # input dim 6 not divisible by 4: the rules shard nothing, the fallback takes the largest
    # divisible dim (1280) over fsdp.
    assert partition_spec(("k",), (6, 1280), m, cfg) == P(None, "fsdp")
    # tensor parallelism: out dim over tensor, in dim over fsdp, never one axis twice.
    m2 = mesh(fsdp=2, tensor=4)
    assert partition_spec(("k",), (64, 128), m2, cfg) == P("fsdp", "tensor")
    both = MeshConfig(min_shard_size=1000, rules=(("embed", "fsdp"), ("mlp", "fsdp")))
    assert partition_spec(("k",), (64, 128), m, both) == P("fsdp")
    # no fsdp axis: nothing to shard over, stays replicated (data parallel).
    assert partition_spec(("k",), (64, 128), mesh(data=8), cfg) == P()


def _run_8_devices(code: str) -> str:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_mesh_params_and_batch_on_8_devices():
    out = _run_8_devices("""
        import jax, numpy as np
        from snapjax import sharding
        from snapjax.sharding import MeshConfig
        cfg = MeshConfig(data=2, fsdp=-1, min_shard_size=1000)
        mesh = sharding.make_mesh(cfg)
        assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}, mesh.shape
        params = {"conv": {"kernel": np.ones((3, 3, 64, 32), np.float32)},
                  "norm": {"scale": np.ones((64,), np.float32)}}
        placed = sharding.shard_params(params, mesh, cfg)
        k = placed["conv"]["kernel"]
        assert k.sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp"), k.sharding.spec
        assert k.addressable_shards[0].data.shape == (3, 3, 16, 32)
        assert placed["norm"]["scale"].sharding.is_fully_replicated
        batch = sharding.global_batch({"x": np.arange(16.0).reshape(16, 1)}, mesh, cfg)
        assert batch["x"].shape == (16, 1)
        assert batch["x"].addressable_shards[0].data.shape == (2, 1)
        np.testing.assert_array_equal(np.asarray(batch["x"]), np.arange(16.0).reshape(16, 1))
        for bad in (12, 6):
            try:
                sharding.check_batch_size(bad, mesh, cfg)
            except ValueError as e:
                print("ERR", e)
        try:
            sharding.check_batch_size(16, mesh, cfg, microbatches=4)
        except ValueError as e:
            print("ERR", e)
        sharding.check_batch_size(32, mesh, cfg, microbatches=4)
        print("OK")
    """)
    errors = [line for line in out.splitlines() if line.startswith("ERR")]
    assert out.strip().endswith("OK")
    assert len(errors) == 3, out
    assert "batch size 12 cannot be split over the mesh's batch axes (data=2 x fsdp=4 = 8 ways)" \
        in errors[0]
    assert "batch size 16 (4 microbatches of 4) cannot be split" in errors[2]
    assert jax.device_count() == 1  # this process was left alone


def test_per_batch_shard_wraps_kernels_in_shard_map_over_the_batch_axes():
    def rowwise(x):
        return x * 2.0

    x = jax.ShapeDtypeStruct((8, 3), jax.numpy.float32)
    assert per_batch_shard(rowwise, 8) is rowwise  # no mesh: nothing to split
    with jax.sharding.use_abstract_mesh(mesh(tensor=2)):
        assert per_batch_shard(rowwise, 8) is rowwise  # batch axes of size 1
    with jax.sharding.use_abstract_mesh(mesh(data=2, fsdp=4)):
        assert per_batch_shard(rowwise, 6) is None  # 6 rows over 8 shards: caller falls back
        jaxpr = str(jax.make_jaxpr(per_batch_shard(rowwise, 8))(x))
    assert "shard_map" in jaxpr and "('data', 'fsdp')" in jaxpr, jaxpr


def test_per_batch_shard_on_8_devices_equals_the_whole_batch():
    out = _run_8_devices("""
        import jax, jax.numpy as jnp, numpy as np
        from snapjax import sharding
        from snapjax.models.attention import dot_product_attention
        cfg = sharding.MeshConfig(data=2, fsdp=4)
        mesh = sharding.make_mesh(cfg)
        q, k, v = (jax.device_put(jax.random.normal(key, (8, 16, 2, 4)),
                                  sharding.batch_sharding(mesh, cfg))
                   for key in jax.random.split(jax.random.key(0), 3))
        want = jax.jit(dot_product_attention)(q, k, v)
        with jax.set_mesh(mesh):
            got = jax.jit(sharding.per_batch_shard(dot_product_attention, 8))(q, k, v)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
        assert got.sharding.spec[0] == ("data", "fsdp"), got.sharding
        print("OK")
    """)
    assert out.strip().endswith("OK")
