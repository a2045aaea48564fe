"""Shared-prefix forward: same log-probs and the same parameter gradients as the plain one-forward path.

In float64 the stock Qwen2.5-VL RMSNorm computes in float32, so once a prefix feeds two completions the
order in which its gradient contributions are summed shows at float32 precision (~1e-7 relative). The
`exact64` fixture makes RMSNorm keep float64, and then both paths agree to ~1e-15; one test keeps the
stock norm with a 1e-5 relative gradient tolerance.
"""
import pytest
import torch
from PIL import Image

from cwdpo.logprobs import Encoder, completion_logps
from cwdpo.models import load_model, load_processor
from cwdpo.bench.prefix_cache import HIDDEN, bench_shared_prefix, completion_logps_prefix_cache
from cwdpo.prefix import completion_logps_shared_prefix, prefix_groups

METHODS = ["packed", "cache"]  # production's packed single pass; the benchmark's two-pass cache variant
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture()
def exact64(monkeypatch):
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as qwen

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(qwen.Qwen2_5_VLRMSNorm, "forward", forward)


@pytest.fixture(scope="module")
def model64(tiny_model_dir):
    return load_model(tiny_model_dir, dtype="float64", trainable=True)


@pytest.fixture(scope="module")
def lora64(tiny_model_dir):
    torch.manual_seed(1)
    model = load_model(tiny_model_dir, dtype="float64", trainable=True, lora=LORA)
    with torch.no_grad():  # peft initialises lora_B to zero: make the adapter change the outputs
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def mixed_encoder(tiny_model_dir):
    """An encoder whose processor keeps image sizes between 56x56 and 112x112 px (4 to 16 tokens)."""
    proc = load_processor(tiny_model_dir, min_pixels=56 * 56, max_pixels=112 * 112)
    return Encoder(proc, "Describe the image.", max_response_tokens=40)


def run(model, fn, weights):
    """fn() → CompletionLogps; backward of a DPO-like scalar; returns (output, {param: grad})."""
    model.zero_grad(set_to_none=True)
    out = fn()
    w = weights.to(out.sums.dtype)
    ((w * out.sums).sum() + (0.3 * w.flip(0) * out.means).sum() + 0.05 * out.token_logps.sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


def check(model, batch, image_token_id, method, grad_rtol=0.0, atol=1e-10, keep_logits=True):
    """Assert the shared-prefix output and gradients equal completion_logps'; return the worst differences."""
    weights = torch.linspace(-1.0, 1.5, batch.n_rows, dtype=torch.float64)
    ref, g_ref = run(model, lambda: completion_logps(model, batch, image_token_id, keep_logits), weights)
    out, g = run(model, lambda: completion_logps_shared_prefix(model, batch, image_token_id, keep_logits,
                                                               hidden=HIDDEN[method]), weights)
    assert torch.equal(out.row, ref.row)
    assert torch.equal(out.counts, ref.counts)
    for name in ("token_logps", "sums", "means"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), atol=atol, rtol=0)
    if keep_logits:
        assert torch.equal(out.targets, ref.targets)
        torch.testing.assert_close(out.logits, ref.logits, atol=atol, rtol=0)
    assert set(g) == set(g_ref) and g_ref
    worst = 0.0
    for n, gr in g_ref.items():
        scale = float(gr.abs().max())
        torch.testing.assert_close(g[n], gr, atol=atol + grad_rtol * scale, rtol=0, msg=lambda m: f"{n}: {m}")
        worst = max(worst, float((g[n] - gr).abs().max()) / max(scale, 1e-30))
    assert any("visual" in n for n in g_ref) or any("lora" in n for n in g_ref)
    return float((out.sums - ref.sums).detach().abs().max()), worst


def pair_rows(recs, n):
    """[chosen_0..n-1; rejected_0..n-1] with rows i and n+i sharing image i; one empty rejected (only <|im_end|>)."""
    chosen = [(i, recs[i].captions[0]) for i in range(n)]
    rejected = [(i, recs[(i + 1) % n].captions[1]) for i in range(n)]
    rejected[-1] = (n - 1, "")
    return chosen + rejected


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_pair_batch_equals_plain_forward(model64, encoder, shapes_records, exact64, method):
    recs = shapes_records[:3]
    b = encoder.build([r.path for r in recs], pair_rows(recs, 3))
    grp = prefix_groups(b)
    assert grp.members == [[0, 3], [1, 4], [2, 5]]
    check(model64, b, encoder.image_token_id, method)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_groups_of_three_interleaved(model64, encoder, shapes_records, exact64, method):
    recs = shapes_records[3:5]
    rows = [(k % 2, recs[k % 2].captions[k // 2]) for k in range(6)]
    b = encoder.build([r.path for r in recs], rows)
    assert prefix_groups(b).members == [[0, 2, 4], [1, 3, 5]]
    check(model64, b, encoder.image_token_id, method)


@pytest.mark.parametrize("method", METHODS)
def test_images_of_different_sizes(model64, mixed_encoder, shapes_records, exact64, method):
    recs = shapes_records[5:8]
    images = [Image.open(r.path).convert("RGB").resize(size) for r, size in
              zip(recs, [(112, 112), (84, 56), (56, 84)])]
    b = mixed_encoder.build(images, pair_rows(recs, 3))
    grp = prefix_groups(b)
    assert grp.members == [[0, 3], [1, 4], [2, 5]]
    n_img = [int((b.input_ids[r] == mixed_encoder.image_token_id).sum()) for r in range(3)]
    assert n_img == [16, 6, 6] and len(set(grp.prefix_len)) == 2
    assert b.image_grid_thw[1].tolist() != b.image_grid_thw[2].tolist()  # 4x6 vs 6x4 patches
    check(model64, b, mixed_encoder.image_token_id, method)


@pytest.mark.parametrize("method", METHODS)
def test_no_shared_prefix(model64, encoder, shapes_records, exact64, method):
    recs = shapes_records[8:12]
    b = encoder.build([r.path for r in recs], [(i, recs[i].captions[i]) for i in range(4)])
    assert prefix_groups(b).members == [[0], [1], [2], [3]]
    check(model64, b, encoder.image_token_id, method)


@pytest.mark.parametrize("method", METHODS)
def test_same_image_different_prompt_and_empty_rows(model64, encoder, shapes_records, exact64, method):
    recs = shapes_records[:2]
    b = encoder.build([r.path for r in recs], [(0, recs[0].captions[0]), (1, recs[1].captions[0]),
                                                (0, recs[0].captions[2]), (1, recs[1].captions[3]),
                                                (0, recs[1].captions[1])])
    c0 = int(b.completion_mask[2].nonzero()[0])
    b.input_ids[2, c0 - 3] = b.input_ids[2, c0 - 4]   # a different prompt token, same image: its own group
    b.completion_mask[3] = False                      # a row without any scored token
    grp = prefix_groups(b)
    assert grp.members == [[0, 4], [1], [2]] and grp.group[3] == -1
    check(model64, b, encoder.image_token_id, method)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_only_end_of_turn_completions(model64, encoder, processor, shapes_records, exact64, method):
    from cwdpo.logprobs import Encoder
    recs = shapes_records[:2]
    b = encoder.build([r.path for r in recs], [(0, ""), (1, ""), (0, ""), (1, "")])
    assert b.completion_mask.sum(1).tolist() == [2, 2, 2, 2]  # <|im_end|> and the newline
    check(model64, b, encoder.image_token_id, method)
    # one-token completions: the turn cut to its first token
    one = Encoder(processor, encoder.prompt, max_response_tokens=1)
    b = one.build([r.path for r in recs], [(0, ""), (1, "a red"), (0, ""), (1, "")])
    assert b.completion_mask.sum(1).tolist() == [1, 1, 1, 1]
    check(model64, b, encoder.image_token_id, method)


@pytest.mark.parametrize("method", METHODS)
def test_lora_adapter(lora64, encoder, shapes_records, exact64, method):
    recs = shapes_records[2:6]
    b = encoder.build([r.path for r in recs], pair_rows(recs, 4))
    check(lora64, b, encoder.image_token_id, method)
    trainable = {n for n, p in lora64.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_stock_float32_rmsnorm_within_1e5(model64, encoder, shapes_records):
    """Without the exact64 patch the gradients agree to float32 precision (the norm's internal dtype)."""
    recs = shapes_records[:3]
    b = encoder.build([r.path for r in recs], pair_rows(recs, 3))
    for method in METHODS:
        diff_sums, worst = check(model64, b, encoder.image_token_id, method, grad_rtol=1e-5)
        assert diff_sums < 1e-10 and worst < 1e-5


def test_gradient_checkpointing(tiny_model_dir, encoder, shapes_records, exact64):
    model = load_model(tiny_model_dir, dtype="float64", trainable=True)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
    assert all(layer.gradient_checkpointing for layer in model.model.language_model.layers)
    recs = shapes_records[:2]
    b = encoder.build([r.path for r in recs], pair_rows(recs, 2))
    check(model, b, encoder.image_token_id, "packed")
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        completion_logps_prefix_cache(model, b, encoder.image_token_id)


def test_rejects_batches_that_are_not_right_padded(model64, encoder, shapes_records):
    b = encoder.build([shapes_records[0].path], [(0, shapes_records[0].captions[0])])
    c0 = int(b.completion_mask[0].nonzero()[0])
    b.completion_mask[0, c0 + 1] = False
    with pytest.raises(ValueError, match="contiguous"):
        completion_logps_shared_prefix(model64, b, encoder.image_token_id)


def test_bench_runs(tiny_model_dir):
    out = bench_shared_prefix(tiny_model_dir, image_size=112, batch_pairs=2, steps=1, warmup=0)
    assert out["image_tokens"] == 16 and out["rows"] == 4
    assert out["concat_s"] > 0 and out["shared_prefix_s"] > 0
    assert out["shared_prefix_over_concat"] == pytest.approx(out["shared_prefix_s"] / out["concat_s"])
    assert out["max_abs_diff_sums"] < 1e-3  # float32


@pytest.mark.parametrize("method", METHODS)
def test_eager_attention(tiny_model_dir, encoder, shapes_records, exact64, method):
    """The additive-mask path (eager attention; its softmax runs in float32, hence the looser tolerance)."""
    model = load_model(tiny_model_dir, dtype="float64", trainable=True, attn_implementation="eager")
    assert model.model.language_model.config._attn_implementation == "eager"
    recs = shapes_records[:2]
    b = encoder.build([r.path for r in recs], pair_rows(recs, 2))
    check(model, b, encoder.image_token_id, method, grad_rtol=1e-5, atol=1e-6)
