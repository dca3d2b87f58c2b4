"""The ``clip`` quality measure on a tiny random world pipeline and a tiny random CLIP: it is
the CLIP score of what TextToImage samples, deterministic, independent of the chunking, and
one compiled sampler serves every block mask."""

import ml_collections
import numpy as np
import pytest

from snapjax.diffusion import ddim
from snapjax.evolve.evolution import EvolveConfig
from snapjax.evolve.quality import ClipScoreQuality, build_measure
from tests.eval.test_clip_score import tiny_clip_folder
from tests.evolve.tiny_world import tiny_world_pipeline

PROMPTS = ["a red circle", "a blue square on the left", "a green circle on the right",
           "a red square", "a blue circle"]
STEPS, GUIDANCE = 3, 4.0


@pytest.fixture(scope="module")
def pipe():
    return tiny_world_pipeline()


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return tiny_clip_folder(tmp_path_factory.mktemp("clip") / "clip")


def clip_measure(pipe, clip_folder, batch_size=2, prompts=PROMPTS):
    return build_measure("clip", text_encoder=pipe.text_encoder,
                         text_params=pipe.text_encoder_params, vae=pipe.vae,
                         vae_params=pipe.vae_params, tokenizer=pipe.tokenizer,
                         schedule=pipe.schedule, num_prompts=len(prompts), num_steps=STEPS,
                         guidance_scale=GUIDANCE, seed=0, clip_model=str(clip_folder),
                         prompts=prompts, sample_size=pipe.sample_size, batch_size=batch_size)


def test_clip_measure_is_the_clip_score_of_the_pipelines_samples(pipe, clip_folder):
    from snapjax.eval.clip_score import ClipScorer

    measure = clip_measure(pipe, clip_folder)  # batch 2: chunks of 2, 2 and a padded 1
    assert isinstance(measure, ClipScoreQuality) and measure.key == "clip_score"
    ones = np.ones(pipe.unet.spec.num_blocks, np.float32)
    full = measure(pipe.unet, pipe.unet_params, ones)
    assert set(full) == {"clip_score", "clip_cosine"}
    assert np.isfinite(full["clip_score"]) and 0 <= full["clip_score"] <= 100

    images = pipe(PROMPTS, num_steps=STEPS, guidance_scale=GUIDANCE, seed=0)
    scorer = ClipScorer.from_folder(clip_folder)
    cos = scorer.cosine(images, PROMPTS)
    assert full["clip_cosine"] == pytest.approx(cos.mean(), abs=1e-5)
    assert full["clip_score"] == pytest.approx(np.maximum(100 * cos, 0).mean(), abs=1e-3)
    assert np.abs(cos).max() > 1e-3

    # One chunk of 5 (another compiled shape) gives the same score: noise goes by prompt index.
    whole = clip_measure(pipe, clip_folder, batch_size=5)(pipe.unet, pipe.unet_params, ones)
    assert whole["clip_cosine"] == pytest.approx(full["clip_cosine"], abs=1e-5)


def test_clip_measure_is_deterministic_and_one_sampler_serves_every_mask(pipe, clip_folder):
    measure = clip_measure(pipe, clip_folder)
    spec = pipe.unet.spec
    ones = np.ones(spec.num_blocks, np.float32)
    full = measure(pipe.unet, pipe.unet_params, ones)
    assert measure(pipe.unet, pipe.unet_params, ones) == full  # same prompts, noise, program

    compiled = ddim._ddim_loop_jit._cache_size()
    changed = 0
    for name in ("mid_attn", "up_0_1_attn"):
        mask = ones.copy()
        mask[spec.block_names().index(name)] = 0.0
        dropped = measure(pipe.unet, pipe.unet_params, mask)
        assert np.isfinite(dropped["clip_score"])
        changed += (abs(dropped["clip_score"] - full["clip_score"]) > 1e-2
                    and abs(dropped["clip_cosine"] - full["clip_cosine"]) > 1e-4)
    assert ddim._ddim_loop_jit._cache_size() == compiled  # masks are traced, nothing recompiled
    assert changed == 2  # dropping a block changes the images, so the score (by 0.3 here)


def test_clip_quality_needs_its_inputs(pipe, clip_folder):
    with pytest.raises(ValueError, match="needs clip_model"):
        clip_measure(pipe, "", prompts=PROMPTS)
    with pytest.raises(ValueError, match="needs clip_model"):
        clip_measure(pipe, clip_folder, prompts=[])
    with pytest.raises(ValueError, match="nowhere does not exist"):
        clip_measure(pipe, clip_folder.parent / "nowhere")
    with pytest.raises(ValueError, match=r"evolve.clip_model.*evolve.prompts_file.*missing: "
                                         r"evolve.prompts_file"):
        EvolveConfig(quality="clip", clip_model="models/clip")
    with pytest.raises(ValueError, match=r"missing: evolve.clip_model, evolve.prompts_file"):
        EvolveConfig(quality="clip")
    with pytest.raises(ValueError, match="batch_size"):
        EvolveConfig(batch_size=0)
    assert EvolveConfig(quality="clip", clip_model="c", prompts_file="p").batch_size == 16


def test_evolve_builds_the_clip_measure_for_any_data_and_refuses_world_measures_off_world(
        pipe, clip_folder, tmp_path):
    from snapjax.config import ConfigError, as_config
    from snapjax.data.pipeline import DataConfig
    from snapjax.evolve import run
    from snapjax.train.objectives import DiffusionConfig

    model = tmp_path / "model"
    pipe.save_pretrained(model)
    prompts_file = tmp_path / "captions.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    config = ml_collections.ConfigDict()
    config.diffusion = as_config(DiffusionConfig(
        unet_init=str(model / "unet"), text_encoder=str(model / "text_encoder"),
        vae=str(model / "vae"), tokenizer=str(model / "tokenizer")))
    data = DataConfig(source="prepared", path=str(tmp_path / "latents"), resolution=16)
    cfg = EvolveConfig(quality="clip", clip_model=str(clip_folder),
                       prompts_file=str(prompts_file), num_prompts=3, batch_size=2)
    prompts = run._clip_inputs(cfg)
    assert len(prompts) == 3 and set(prompts) <= set(PROMPTS)
    measure = run._measure(config, cfg, data, pipe.schedule, prompts)
    assert isinstance(measure, ClipScoreQuality)
    assert measure.sample_size == 16 // pipe.vae.spec.downsample_factor
    assert (measure.prompts, measure.batch_size, measure.num_steps) == (prompts, 2, 8)

    for quality in ("world", "denoise"):
        with pytest.raises(ConfigError, match=rf"evolve.quality='{quality}' scores on the "
                                              r"embedded world.*data.source='prepared'.*clip"):
            run._measure(config, EvolveConfig(quality=quality), data, pipe.schedule, None)
    missing = EvolveConfig(quality="clip", clip_model=str(tmp_path / "no_clip"),
                           prompts_file=str(prompts_file))
    with pytest.raises(ConfigError, match=r"evolve.clip_model.*no_clip does not exist"):
        run._clip_inputs(missing)
    too_few = EvolveConfig(quality="clip", clip_model=str(clip_folder),
                           prompts_file=str(prompts_file), num_prompts=2000)
    with pytest.raises(ConfigError, match=r"captions.txt has 5 prompts, fewer than the 2000"):
        run._clip_inputs(too_few)


def test_sd15_evolve_config_is_complete():
    from snapjax.config import from_config, load_config
    from tests.train.conftest import REPO

    config = load_config(f"{REPO}/configs/sd15_evolve.py", [])
    cfg = from_config(EvolveConfig, config.evolve, "evolve")
    assert (cfg.quality, cfg.num_prompts, cfg.sample_steps, cfg.guidance_scale) == \
        ("clip", 2000, 50, 7.5)
    assert cfg.clip_model and cfg.prompts_file and cfg.latency_source == "macs"
    assert config.robust.enabled and config.data.source == "prepared"
    assert config.diffusion.unet_init.endswith("sd15_robust/model/unet")
    gpu = load_config(f"{REPO}/configs/sd15_evolve.py:gpu", [])
    assert gpu.evolve.quality == "clip"
