"""CLIP score against transformers' own CLIP pipeline (CLIPImageProcessorPil, the tokenizer,
CLIPModel.forward's normalised embeddings) on a tiny random CLIP saved to disk; the folder
and prompts-file checks."""

import json
import shutil

import numpy as np
import pytest

from snapjax.eval.clip_score import ClipScorer, check_folder
from snapjax.eval.prompts import read_prompts

WORDS = ("a", "red", "blue", "green", "circle", "square", "on", "the", "left", "right", "photo")
PROMPTS = ["a red circle", "a blue square on the left", "photo", "the green circle on the right"]


def tiny_clip_folder(folder, image_size=32, seed=0):
    """A random CLIPModel (1-layer towers, width 16, 8x8 patches) with its tokenizer, saved
    with save_pretrained like a real CLIP folder (no preprocessor config: tests add one)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from snapjax.models.tokenizer import write_clip_vocab
    vocab = write_clip_vocab(folder.parent / f"{folder.name}-vocab", WORDS)
    tokenizer = CLIPTokenizer.from_pretrained(str(vocab))
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=image_size, patch_size=8),
        projection_dim=8)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return tiny_clip_folder(tmp_path_factory.mktemp("clip") / "clip")


def _with_preprocessor(src, dst, kind):
    shutil.copytree(src, dst)
    if kind == "dict":  # transformers 5's format, custom statistics
        from transformers import CLIPImageProcessorPil
        CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                              image_mean=[0.5, 0.4, 0.3],
                              image_std=[0.2, 0.3, 0.25]).save_pretrained(str(dst))
    elif kind == "int":  # openai/clip-vit-large-patch14's (older) format
        (dst / "preprocessor_config.json").write_text(json.dumps({
            "crop_size": 32, "do_center_crop": True, "do_normalize": True, "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.45, 0.45, 0.4],
            "image_std": [0.27, 0.26, 0.28], "resample": 3, "size": 36}))
    return dst


def _reference(folder, images, prompts):
    """(cosine, score) per image from transformers' processor and CLIPModel.forward."""
    import torch
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(str(folder)).eval()
    if (folder / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessorPil.from_pretrained(str(folder))
    else:  # CLIP's defaults (transformers' constants) at the vision tower's size
        side = model.config.vision_config.image_size
        processor = CLIPImageProcessorPil(size={"shortest_edge": side},
                                          crop_size={"height": side, "width": side})
    pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
    tokens = CLIPTokenizer.from_pretrained(str(folder))(prompts, padding=True,
                                                         return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                    pixel_values=pixels)
    cos = (out.image_embeds * out.text_embeds).sum(-1).double().numpy()
    return cos, np.maximum(100 * cos, 0)


@pytest.mark.parametrize("kind, shape", [("none", (4, 8, 8, 3)), ("dict", (4, 24, 40, 3)),
                                         ("int", (4, 50, 30, 3))])
def test_scores_equal_transformers_clip(clip_folder, tmp_path, kind, shape):
    folder = clip_folder if kind == "none" else _with_preprocessor(clip_folder, tmp_path / kind,
                                                                   kind)
    images = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    scorer = ClipScorer.from_folder(folder, batch_size=3)  # 3: the batching is exercised too
    cos_ref, score_ref = _reference(folder, images, PROMPTS)
    np.testing.assert_allclose(scorer.cosine(images, PROMPTS), cos_ref, rtol=0, atol=1e-6)
    scores = scorer(images, PROMPTS)
    np.testing.assert_allclose(scores, score_ref, rtol=0, atol=1e-5)
    assert scores.shape == (4,) and np.all(scores >= 0) and np.all(scores <= 100)
    assert np.abs(cos_ref).max() > 1e-3  # a real comparison, not zeros against zeros


def test_text_features_are_unit_and_per_prompt(clip_folder):
    scorer = ClipScorer.from_folder(clip_folder)
    feats = scorer.text_features(PROMPTS)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=-1), 1.0, atol=1e-6)
    # Padding to the batch's longest prompt does not change a prompt's embedding.
    np.testing.assert_allclose(scorer.text_features(PROMPTS[2:3]), feats[2:3], atol=1e-6)
    with pytest.raises(ValueError, match="4 images but 3 prompts"):
        scorer.cosine(np.zeros((4, 8, 8, 3), np.uint8), PROMPTS[:3])
    with pytest.raises(ValueError, match="uint8 images"):
        scorer(np.zeros((4, 8, 8, 3), np.float32), PROMPTS)


def test_missing_or_incomplete_folder_says_what_belongs_there(clip_folder, tmp_path):
    with pytest.raises(ValueError, match=r"nowhere does not exist.*transformers CLIP model "
                                         r"folder.*clip-vit-large-patch14"):
        ClipScorer.from_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty has no config.json.*save_pretrained"):
        check_folder(tmp_path / "empty")
    no_tok = tmp_path / "no_tok"
    shutil.copytree(clip_folder, no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"no_tok has no tokenizer"):
        check_folder(no_tok)
    assert check_folder(clip_folder) == clip_folder


def test_prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("  first prompt \n\nsecond\n   \nthird\nfourth\nfifth\n", encoding="utf-8")
    assert read_prompts(path) == ["first prompt", "second", "third", "fourth", "fifth"]
    subset = read_prompts(path, 3, seed=7)
    assert subset == read_prompts(path, 3, seed=7)  # seeded
    lines = read_prompts(path)
    assert len(subset) == 3 and subset == sorted(subset, key=lines.index)  # in file order
    rng = np.random.default_rng(7)
    assert subset == [lines[i] for i in np.sort(rng.choice(5, size=3, replace=False))]
    assert read_prompts(path, 5) == lines
    with pytest.raises(ValueError, match=r"prompts.txt has 5 prompts, fewer than the 6"):
        read_prompts(path, 6)


def test_bad_prompts_files_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"missing.txt does not exist"):
        read_prompts(tmp_path / "missing.txt")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    with pytest.raises(ValueError, match=r"blank.txt has no prompts"):
        read_prompts(blank)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.txt is not UTF-8"):
        read_prompts(latin)
