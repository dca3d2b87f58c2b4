"""`snapjax prepare`: shards round-trip what the encoders computed, the output appears
atomically, and the CLI with real (tiny, random) diffusers / transformers folders stores what
PyTorch computes. Tolerances: float32 storage exact; float16 storage within fp16 rounding
(rtol 1e-3); JAX encoders vs PyTorch max abs error / max abs reference < 1e-4."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from snapjax.cli import main as cli_main
from snapjax.data import images, sources
from snapjax.data.pipeline import DataConfig, make_train_iterator
from snapjax.data.prepare import Encoders, prepare
from snapjax.data.world import WorldSpec

R = 8
SCALE = 0.5


def _stand_in_images(x_BRRC):
    """mean: 2x2 average pool [B, R/2, R/2, 3]; logvar: a function of the mean."""
    b, r = x_BRRC.shape[:2]
    mean = x_BRRC.reshape(b, r // 2, 2, r // 2, 2, 3).mean(axis=(2, 4))
    return mean, -1.0 - np.abs(mean)


def _stand_in_text(captions):
    """context [B, 6, 2]: the first 6 character codes / 100 and the caption length."""
    out = np.zeros((len(captions), 6, 2), np.float32)
    for i, c in enumerate(captions):
        codes = [ord(ch) / 100 for ch in c[:6]]
        out[i, :len(codes), 0] = codes
        out[i, :, 1] = len(c)
    return out


STAND_IN = Encoders(_stand_in_images, _stand_in_text, SCALE, {"kind": "stand-in"})


def _reference(rec):
    mean, logvar = _stand_in_images(images.to_model_range(rec["image"][None]))
    return mean[0], logvar[0], _stand_in_text([rec["caption"]])[0]


def _png(pixels) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _image_folder(root, n=6, bad=(2,)):
    root.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        name = f"{i:03d}.png"
        data = b"broken" if i in bad else _png(rng.integers(0, 256, (R, R + 4, 3), dtype=np.uint8))
        (root / name).write_bytes(data)
        lines.append(json.dumps({"file_name": name, "text": f"caption number {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines))
    return sources.ImageFolderSource(root, R)


def test_round_trip_float32_with_skips_and_shards(tmp_path):
    src = _image_folder(tmp_path / "imgs", n=8, bad=(2, 5))
    index = prepare(src, tmp_path / "out", STAND_IN, batch_size=3, shard_size=2, dtype="float32",
                    resolution=R, progress=False)
    assert index["count"] == 6 and index["skipped"] == 2 and index["read"] == 8
    assert any("002.png" in s for s in index["skipped_examples"])
    assert [s["count"] for s in index["shards"]] == [2, 2, 2]
    assert index["latent_shape"] == [R // 2, R // 2, 3] and index["context_shape"] == [6, 2]
    assert json.loads((tmp_path / "out" / "index.json").read_text()) == index
    assert not (tmp_path / "out.tmp").exists()
    prepared = sources.PreparedSource(tmp_path / "out")
    assert len(prepared) == 6 and prepared.scaling_factor == SCALE
    kept = [i for i in range(8) if i not in (2, 5)]
    for k, i in enumerate(kept):
        rec = prepared[k]
        assert rec["index"] == i and rec["caption"] == f"caption number {i}"
        mean, logvar, context = _reference(src[i])
        np.testing.assert_array_equal(rec["latent_mean"], mean)
        np.testing.assert_array_equal(rec["latent_logvar"], logvar)
        np.testing.assert_array_equal(rec["context"], context)


def test_float16_storage_and_training_reads_it(tmp_path):
    world = sources.WorldSource(WorldSpec(resolution=R), size=10)
    prepare(world, tmp_path / "out", STAND_IN, batch_size=4, dtype="float16", limit=7,
            resolution=R, progress=False)
    prepared = sources.PreparedSource(tmp_path / "out")
    assert len(prepared) == 7
    for i in range(7):
        mean, logvar, context = _reference(world[i])
        rec = prepared[i]
        assert rec["latent_mean"].dtype == np.float32
        np.testing.assert_allclose(rec["latent_mean"], mean, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(rec["context"], context, rtol=1e-3)

    cfg = DataConfig(source="prepared", path=str(tmp_path / "out"), resolution=R, shuffle=False)
    kw = dict(global_batch_size=4, seed=0, process_index=0, process_count=1)
    batch = next(make_train_iterator(cfg, **kw))
    assert set(batch) == {"latent", "context"}
    np.testing.assert_allclose(batch["latent"], SCALE * np.stack([prepared[i]["latent_mean"] for i in range(4)]),
                               rtol=1e-6)
    np.testing.assert_array_equal(batch["context"], np.stack([prepared[i]["context"] for i in range(4)]))

    # Posterior draws: deterministic, and (latent / scale - mean) / std is standard normal.
    sampled = DataConfig(source="prepared", path=str(tmp_path / "out"), resolution=R,
                         shuffle=False, sample_latents=True)
    a = [next(it) for it in [make_train_iterator(sampled, **kw)] for _ in range(5)]
    b = [next(it) for it in [make_train_iterator(sampled, **kw)] for _ in range(5)]
    np.testing.assert_array_equal(np.stack([x["latent"] for x in a]), np.stack([x["latent"] for x in b]))
    order = [i % 7 for i in range(20)]
    mean = np.stack([prepared[i]["latent_mean"] for i in order])
    std = np.exp(0.5 * np.stack([prepared[i]["latent_logvar"] for i in order]))
    noise = (np.concatenate([x["latent"] for x in a]) / SCALE - mean) / std
    assert abs(noise.mean()) < 0.15 and abs(noise.std() - 1) < 0.1, (noise.mean(), noise.std())

    with pytest.raises(ValueError, match=f"made at resolution {R}"):
        make_train_iterator(DataConfig(source="prepared", path=str(tmp_path / "out"), resolution=16), **kw)


def test_output_is_atomic_and_guarded(tmp_path):
    src = _image_folder(tmp_path / "imgs", n=4, bad=())
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty; pass --overwrite"):
        prepare(src, out, STAND_IN, progress=False)

    calls = []

    def failing_text(captions):
        calls.append(len(captions))
        if len(calls) == 2:
            raise RuntimeError("encoder crashed")
        return _stand_in_text(captions)

    (tmp_path / "out.tmp").mkdir()  # left over by a killed run: cleaned, not an error
    with pytest.raises(RuntimeError, match="encoder crashed"):
        prepare(src, out, Encoders(_stand_in_images, failing_text, 1.0), batch_size=2,
                overwrite=True, progress=False)
    assert (out / "keep.txt").read_text() == "user data" and not (tmp_path / "out.tmp").exists()

    prepare(src, out, STAND_IN, batch_size=2, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and len(sources.PreparedSource(out)) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "out"]


def test_prepared_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        sources.PreparedSource(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no index.json"):
        sources.PreparedSource(tmp_path / "empty")
    src = _image_folder(tmp_path / "imgs", n=2, bad=())
    prepare(src, tmp_path / "out", STAND_IN, progress=False)
    (tmp_path / "out" / "data-00000.array_record").unlink()
    with pytest.raises(FileNotFoundError, match="shard file"):
        sources.PreparedSource(tmp_path / "out")
    with pytest.raises(sources.DataError, match="no readable images"):
        prepare(_image_folder(tmp_path / "bad", n=2, bad=(0, 1)), tmp_path / "out2", STAND_IN,
                progress=False)
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out2.tmp").exists()


# ---------------------------------------------------------------- the command, real encoders


def _tiny_models(root):
    """A random diffusers AutoencoderKL and transformers CLIPTextModel saved as folders."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                        latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2).eval()
    te = CLIPTextModel(CLIPTextConfig(vocab_size=700, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      max_position_embeddings=77)).eval()
    with torch.no_grad():
        for p in list(vae.parameters()) + list(te.parameters()):
            p.add_(0.05 * torch.randn_like(p))  # move norms off (1, 0) so mapping slips show
    vae.save_pretrained(root / "vae")
    te.save_pretrained(root / "text_encoder")
    return vae, te


def _rel(ours, ref) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_cli_end_to_end_matches_pytorch(tmp_path, capsys):
    import torch

    from snapjax.data.world import world_tokenizer_folder
    from snapjax.models.tokenizer import Tokenizer

    src = _image_folder(tmp_path / "imgs", n=5, bad=(3,))
    vae, te = _tiny_models(tmp_path / "models")
    out = tmp_path / "prepared"
    options = {"--source": "imagefolder", "--path": str(tmp_path / "imgs"), "--resolution": str(R),
               "--vae": str(tmp_path / "models" / "vae"),
               "--text-encoder": str(tmp_path / "models" / "text_encoder"), "--tokenizer": "world",
               "--out": str(out), "--dtype": "float32", "--batch-size": "3", "--shard-size": "2"}

    def argv(**changes):
        opts = {**options, **{"--" + k.replace("_", "-"): v for k, v in changes.items()}}
        return ["prepare"] + [x for kv in opts.items() for x in kv]

    assert cli_main(argv()) == 0
    assert "wrote 4 records in 2 shard(s)" in capsys.readouterr().out

    prepared = sources.PreparedSource(out)
    assert prepared.index["skipped"] == 1 and prepared.scaling_factor == pytest.approx(0.18215)
    recs = [prepared[k] for k in range(4)]
    x = np.stack([src[r["index"]]["image"] for r in recs])
    ids = Tokenizer.from_folder(world_tokenizer_folder())([r["caption"] for r in recs])
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(images.to_model_range(x)).permute(0, 3, 1, 2)).latent_dist
        hidden = te(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    mean, logvar = (t.permute(0, 2, 3, 1).numpy() for t in (dist.mean, dist.logvar))
    errors = (_rel(np.stack([r["latent_mean"] for r in recs]), mean),
              _rel(np.stack([r["latent_logvar"] for r in recs]), logvar),
              _rel(np.stack([r["context"] for r in recs]), hidden))
    assert max(errors) < 1e-4, errors

    # Bad input: answered with exit code 2 and a message naming the problem.
    assert cli_main(argv()) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert cli_main(argv(path=str(tmp_path / "no_such_dir"), out=str(tmp_path / "x"))) == 2
    assert str(tmp_path / "no_such_dir") in capsys.readouterr().err
    assert cli_main(["prepare", "--resolution", "8", "--out", str(tmp_path / "w"), "--model",
                     str(tmp_path / "models")]) == 2
    assert "give --limit" in capsys.readouterr().err
