"""Latency tables: the `macs` table adds up to `snapjax summary`'s UNet GFLOPs and removing a
block lowers the total by exactly its entry; `measured` times every block; JSON tables are
checked key by key."""

import dataclasses
import json

import pytest

from snapjax.evolve.latency import latency_table, skeleton, unet_cost
from snapjax.evolve.signature import block_signature
from snapjax.evolve.surgery import plan_duplicate, plan_remove
from snapjax.models.unet_spec import SD15, SNAPFUSION, TINY
from snapjax.summary import summarize

GRAMMAR = dataclasses.replace(
    TINY, down=(("RAA",), ("rRA",)), up=(("RA", "rAA"), ("R", "RR")), mid="rAAR")


def summary_unet_gflop(spec, resolution):
    return summarize({"unet": ("unet", spec)}, resolution)[0].gflops


@pytest.mark.parametrize("spec", [SD15, SNAPFUSION], ids=["sd15", "snapfusion"])
def test_macs_blocks_plus_fixed_equal_summary(spec):
    table = latency_table(spec, 512, "macs")
    assert set(table) == set(spec.block_names()) and table.unit == "GFLOP"
    # fixed is traced from the skeleton UNet, blocks one by one: the sum is not circular.
    assert table.total == pytest.approx(summary_unet_gflop(spec, 512), rel=1e-12)


@pytest.mark.parametrize("spec", [TINY, GRAMMAR], ids=["tiny", "grammar"])
def test_removing_a_block_lowers_the_cost_by_its_entry(spec):
    table = latency_table(spec, 64, "macs")
    total = summary_unet_gflop(spec, 64)
    assert table.total == pytest.approx(total, rel=1e-12)
    for name in spec.block_names():
        smaller = plan_remove(spec, name).spec
        assert summary_unet_gflop(smaller, 64) == pytest.approx(total - table[name], rel=1e-12)
        assert unet_cost(smaller, table) == pytest.approx(total - table[name], rel=1e-12)


def test_duplicates_are_priced_by_signature():
    table = latency_table(GRAMMAR, 64, "macs")
    edit = plan_duplicate(GRAMMAR, "down_0_0_attn")
    bigger = latency_table(edit.spec, 64, "macs")
    assert bigger[edit.insert[0]] == table["down_0_0_attn"]
    assert bigger.total == pytest.approx(table.total + table["down_0_0_attn"], rel=1e-12)
    assert bigger.fixed == table.fixed  # unit counts never change: same skeleton


def test_skeleton_has_no_blocks():
    assert skeleton(SD15).block_names() == ()
    assert skeleton(SD15).up[0] == ("r", "r", "r")


def test_measured_times_every_block_once_per_signature():
    table = latency_table(TINY, 32, "measured", repeats=3)
    assert table.unit == "ms" and set(table) == set(TINY.block_names())
    assert all(v >= 0 for v in table.values()) and table.fixed > 0
    sigs = {}
    for b in TINY.blocks():
        sigs.setdefault(block_signature(TINY, b, 8), set()).add(table[b.name])
    assert all(len(v) == 1 for v in sigs.values())  # same signature, same (one) measurement


def write_table(tmp_path, **changes):
    side = 8
    data = {"format": "snapjax-latency-v1", "unit": "ms", "device": "test", "latent_side": side,
            "blocks": {block_signature(TINY, b, side): 1.5 for b in TINY.blocks()},
            "fixed": 2.0}
    data.update(changes)
    path = tmp_path / "phone.json"
    path.write_text(json.dumps(data))
    return path, data


def test_json_table_prices_blocks_by_signature(tmp_path):
    path, _ = write_table(tmp_path)
    table = latency_table(TINY, 32, str(path), downsample_factor=4)
    assert table.fixed == 2.0 and table.total == 2.0 + 1.5 * TINY.num_blocks


@pytest.mark.parametrize("change, message", [
    (lambda d: d["blocks"].pop(next(iter(d["blocks"]))), r"no cost for block\(s\) down_0_0_res"),
    (lambda d: d["blocks"].update({k: -1 for k in list(d["blocks"])[:1]}), "is negative"),
    (lambda d: d["blocks"].update({k: "fast" for k in list(d["blocks"])[:1]}),
     "must be a finite number"),
    (lambda d: d.update(fixed=True), "fixed must be a finite number"),
    (lambda d: d.update(format="other"), "snapjax-latency-v1"),
    (lambda d: d.pop("fixed"), "missing key 'fixed'"),
    (lambda d: d.update(latent_side=64), "measured at latent side 64"),
])
def test_bad_json_tables_are_named(tmp_path, change, message):
    path, data = write_table(tmp_path)
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        latency_table(TINY, 32, str(path), downsample_factor=4)


def test_unknown_source_and_bad_resolution(tmp_path):
    with pytest.raises(ValueError, match="neither macs nor measured nor an existing JSON"):
        latency_table(TINY, 32, "fast", downsample_factor=4)
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable JSON"):
        latency_table(TINY, 32, str(tmp_path / "x.json"), downsample_factor=4)
    with pytest.raises(ValueError, match="multiple of the VAE's downsample factor 8"):
        latency_table(TINY, 30, "macs")
