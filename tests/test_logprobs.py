"""Per-token log-probs: masks cover exactly the caption tokens; one forward equals the stock HF forward."""
import os

import pytest
import torch
from PIL import Image

from cwdpo.logprobs import completion_logps, hf_forward_logps, mrope_positions
from cwdpo.models import load_model


@pytest.fixture(scope="module")
def model64(tiny_model_dir):
    return load_model(tiny_model_dir, dtype="float64")


def test_completion_mask_covers_exactly_the_caption_tokens(encoder, shapes_records):
    tok = encoder.tokenizer
    recs = shapes_records[:3]
    rows = [(0, recs[0].captions[0]), (1, recs[1].captions[3]), (2, "a red")]
    b = encoder.build([r.path for r in recs], rows)
    for r, (_, text) in enumerate(rows):
        ids = b.input_ids[r][b.completion_mask[r]].tolist()
        # the assistant turn as the chat template renders it: the text, <|im_end|> and the newline
        assert ids == tok(text, add_special_tokens=False)["input_ids"] + [encoder.eos_id] + tok("\n")["input_ids"]
        assert tok.decode(ids[:-2]) == text and tok.decode(ids[-2:]) == "<|im_end|>\n"
        # nothing before the response (prompt, image tokens) and nothing after it (padding) is marked
        first = int(b.completion_mask[r].nonzero()[0])
        assert not b.completion_mask[r, :first].any()
        assert int(b.attention_mask[r].sum()) == first + len(ids)
        # the image's placeholder expanded to its merged patches (grid t·h·w / 2²)
        assert (b.input_ids[r, :first] == encoder.image_token_id).sum() == int(b.image_grid_thw[r].prod()) // 4


def test_prompt_ids_and_positions_match_the_processor_and_model(encoder, processor, model64, shapes_records):
    im = Image.open(shapes_records[0].path).convert("RGB")
    p = processor(text=[encoder.prompt_text], images=[im], return_tensors="pt")
    ids, pos = encoder.prompt_ids(p["image_grid_thw"][0])
    assert ids == p["input_ids"][0].tolist()
    ref, _ = model64.model.get_rope_index(p["input_ids"], p["mm_token_type_ids"], p["image_grid_thw"])
    assert torch.equal(pos, ref[:, 0])
    # a non-square image grid (text after the image resumes at start + max(h, w))
    grid = torch.tensor([[1, 4, 8]])
    seq = [5, 6, encoder.image_token_id] + [encoder.image_token_id] * 7 + [7, 8]
    mm = torch.tensor([[1 if t == encoder.image_token_id else 0 for t in seq]])
    ref, _ = model64.model.get_rope_index(torch.tensor([seq]), mm, grid)
    assert torch.equal(mrope_positions(seq, grid, encoder.image_token_id, 2), ref[:, 0])


def test_one_forward_equals_the_stock_hf_forward(encoder, model64, processor, shapes_records):
    recs = shapes_records[:3]
    rows = [(0, recs[0].captions[0]), (1, recs[1].captions[0]), (0, recs[2].captions[1]), (2, "a red")]
    b = encoder.build([r.path for r in recs], rows)
    out = completion_logps(model64, b, encoder.image_token_id)
    images = [Image.open(recs[i].path).convert("RGB") for i, _ in rows]
    ref = hf_forward_logps(model64, processor, encoder.prompt, images, [t for _, t in rows])
    torch.testing.assert_close(out.sums, ref, atol=1e-9, rtol=0)
    counts = [len(encoder.tokenizer(t, add_special_tokens=False)["input_ids"]) + 2 for _, t in rows]
    assert out.counts.tolist() == counts
    torch.testing.assert_close(out.means, out.sums / out.counts)


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 2e-5)])
def test_batch_size_and_padding_invariance(tiny_model_dir, encoder, shapes_records, dtype, tol):
    model = load_model(tiny_model_dir, dtype=dtype)
    recs = shapes_records[:4]
    short = (0, "a red circle")
    alone = completion_logps(model, encoder.build([recs[0].path], [short]), encoder.image_token_id)
    long_rows = [(1, recs[1].captions[0] + " and a very long tail of words to pad the batch"),
                 (2, recs[2].captions[2]), (0, short[1]), (3, recs[3].captions[4])]
    batch = completion_logps(model, encoder.build([r.path for r in recs], long_rows), encoder.image_token_id)
    assert abs(float(alone.sums[0]) - float(batch.sums[2])) < tol * max(1.0, abs(float(alone.sums[0])))
    assert abs(float(alone.means[0]) - float(batch.means[2])) < tol


def test_gradients_flow_to_vision_and_language_parameters(tiny_model_dir, encoder, shapes_records):
    model = load_model(tiny_model_dir, trainable=True)
    b = encoder.build([shapes_records[0].path], [(0, shapes_records[0].captions[0])])
    completion_logps(model, b, encoder.image_token_id).sums.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "visual" in n)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "language_model" in n)


def test_processor_type_is_asserted_and_model_reloads_offline(tiny_model_dir, tmp_path):
    from transformers import AutoModelForImageTextToText
    from cwdpo.models import load_processor
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    proc = load_processor(tiny_model_dir)
    assert type(proc).__name__ in ("Qwen2_5_VLProcessor", "Qwen2_5_VLImageOnlyProcessor")
    assert proc.image_processor is not None
    m = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    assert type(m).__name__ == "Qwen2_5_VLForConditionalGeneration"
    # a folder with only the tokenizer would make AutoProcessor return a bare tokenizer: refused
    import shutil
    tok_only = tmp_path / "tok"
    tok_only.mkdir()
    for name in os.listdir(tiny_model_dir):
        if name.startswith("tokenizer") or name == "config.json":
            shutil.copy(os.path.join(tiny_model_dir, name), tok_only / name)
    with pytest.raises((TypeError, OSError, ValueError)):
        load_processor(str(tok_only))


def test_length_groups_split_only_when_it_saves_padding():
    from cwdpo.logprobs import length_groups
    # 3 rows of 10 and 3 of 40: all padded to 40 = 240 positions; split: 3·10 + 3·40 = 150 (37.5% fewer)
    assert length_groups([40, 10, 40, 10, 10, 40]) == [[1, 3, 4], [0, 2, 5]]
    # every split pads more than 85% of N·max: one forward
    assert length_groups([38, 40, 39, 40]) is None
    assert length_groups([12]) is None
    # the best split point, not the first: [5, 6, 30, 31, 32] → {5, 6} / {30, 31, 32} = 2·6 + 3·32 = 108 of 160
    assert length_groups([30, 5, 31, 6, 32]) == [[1, 3], [0, 2, 4]]
    assert length_groups([30, 5, 31, 6, 32], min_saving=0.5) is None


def test_a_forward_split_by_length_gives_the_same_log_probs_and_gradients(tiny_model_dir, encoder, shapes_records,
                                                                        monkeypatch):
    """Question–answer prompts are ≈ 20 tokens longer than the caption prompt: a batch mixing them runs the
    language model on two groups, each padded to its own longest row — the same log-probs and gradients as
    one forward over all rows padded to the longest."""
    import cwdpo.logprobs as lp
    recs = shapes_records[:4]
    long_prompt = "Which shape is in the image?\nA. circle\nB. square\nC. star\nD. cross\nAnswer with the letter."
    enc_long = encoder.for_prompt(long_prompt)
    px, grids = encoder.encode_images([r.path for r in recs])
    prompts = [enc_long.prompts([recs[0].path], grids[0:1])[0], enc_long.prompts([recs[1].path], grids[1:2])[0]] + \
        [encoder.prompts([r.path], grids[k:k + 1])[0] for k, r in enumerate(recs[2:], start=2)]
    rows = [(0, "A. circle"), (1, "B. square"), (2, recs[2].captions[0]), (3, recs[3].captions[1]),
            (2, "a red")]
    batch = encoder.build_encoded(px, grids, rows, prompts=prompts)
    lengths = batch.attention_mask.sum(-1).tolist()
    assert lp.length_groups(lengths) is not None  # this batch is split
    results = []
    for saving in (lp.LENGTH_GROUP_SAVING, 2.0):  # split; one forward (no split saves 200%)
        monkeypatch.setattr(lp, "LENGTH_GROUP_SAVING", saving)
        model = load_model(tiny_model_dir, dtype="float64", trainable=True)
        out = completion_logps(model, batch, encoder.image_token_id)
        out.sums.sum().backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (split, g_split), (whole, g_whole) = results
    torch.testing.assert_close(split.sums, whole.sums, atol=1e-10, rtol=0)
    torch.testing.assert_close(split.token_logps, whole.token_logps, atol=1e-10, rtol=0)
    assert torch.equal(split.row, whole.row) and torch.equal(split.counts, whole.counts)
    assert g_split.keys() == g_whole.keys() and any("visual" in n for n in g_split)
    for n in g_whole:
        torch.testing.assert_close(g_split[n], g_whole[n], atol=1e-9, rtol=1e-7)


def test_the_patch_embedding_as_a_matrix_product_equals_torchs_conv3d(tiny_model_dir, encoder, shapes_records):
    """On a CPU `load_model` runs the vision patch embedding (a Conv3d with kernel = stride) as x @ Wᵀ: the
    same features and weight gradients as the stock Conv3d forward, and the same weights and state dict."""
    from transformers import AutoModelForImageTextToText
    from cwdpo.logprobs import image_features
    from cwdpo.models import patch_embeds_as_matmul
    ours = load_model(tiny_model_dir, dtype="float64", trainable=True)
    stock = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float64)
    assert ours.model.visual.patch_embed._patches_as_matmul  # load_model changed it; stock is the Conv3d
    assert patch_embeds_as_matmul(ours) == 0  # once
    assert ours.state_dict().keys() == stock.state_dict().keys()
    assert ours.model.visual.patch_embed.proj.weight.shape == stock.model.visual.patch_embed.proj.weight.shape
    px, grids = encoder.encode_images([r.path for r in shapes_records[:3]])
    feats = []
    for model in (ours, stock):
        out = torch.cat(image_features(model, px.double(), grids))
        out.pow(2).sum().backward()
        feats.append((out, model.model.visual.patch_embed.proj.weight.grad.clone()))
    torch.testing.assert_close(feats[0][0], feats[1][0], atol=1e-10, rtol=0)
    torch.testing.assert_close(feats[0][1], feats[1][1], atol=1e-9, rtol=1e-9)
