"""Our pairs file is read by TRL's DPOTrainer unchanged (TRL 1.16, the `bench`/`test` extra)."""
import math

import pytest

import micro_specs as specs
from cwdpo.negatives import build_pairs, write_pairs


@pytest.mark.train
def test_trl_dpo_trainer_reads_our_pairs_file(tiny_model_dir, shapes_records, tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets is in the test extra")
    trl = pytest.importorskip("trl", reason="trl is in the test extra")
    from transformers import AutoModelForImageTextToText
    from cwdpo.models import load_processor
    recs = [r for r in shapes_records if r.split == "finetune"][:4]
    pairs, _ = build_pairs(recs, specs.negatives(pairs_per_image=2), rho=1.0, seed=0, scorer=lambda t, r: 0.0)
    path = str(tmp_path / "pairs.jsonl")
    write_pairs(path, pairs, "Describe the image.")
    ds = datasets.load_dataset("json", data_files=path, split="train")
    ds = ds.cast_column("images", datasets.Sequence(datasets.Image()))
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    cfg = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=1,
                        learning_rate=1e-4, beta=0.1, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                        logging_steps=1, remove_unused_columns=False, gradient_checkpointing=False,
                        dataloader_num_workers=0, seed=0, max_length=None)
    trainer = trl.DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=load_processor(tiny_model_dir))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # policy == reference on the first step: TRL's DPO loss is log 2 on our pairs too
    assert losses and math.isclose(losses[0], math.log(2), abs_tol=1e-3)


def test_our_reference_logps_equal_trls_dpo_evaluation_on_the_same_pairs(tiny_model_dir, shapes_records, tmp_path):
    """The cached reference pass (`cwdpo ref-logps`) scores what TRL 1.16's DPOTrainer scores: on the same
    pairs file, model and length limit, TRL's own per-pair log-probs (its eval collator + its reference
    forward) and its `evaluate()` means equal ours. The limit cuts some long off-topic negatives, and the
    summed log-probs include the `<|im_end|>\\n` that closes each assistant turn."""
    datasets = pytest.importorskip("datasets", reason="datasets is in the test extra")
    trl = pytest.importorskip("trl", reason="trl is in the test extra")
    import torch
    from transformers import AutoModelForImageTextToText
    from cwdpo.logprobs import Encoder
    from cwdpo.models import load_processor
    from cwdpo.negatives import read_pairs
    from cwdpo.reference import reference_logps
    limit = 12
    recs = [r for r in shapes_records if r.split == "finetune"][:6]
    neg = specs.negatives(pairs_per_image=2, p_easy=1.0, easy_kinds=["off_topic", "shuffled"])
    pairs, _ = build_pairs(recs, neg, rho=1.0, seed=0, scorer=lambda t, r: 0.0)
    path = str(tmp_path / "pairs.jsonl")
    write_pairs(path, pairs, specs.PROMPT)
    vlm = specs.vlm(dtype="float64", max_response_tokens=limit)
    ours = reference_logps(tiny_model_dir, path, str(tmp_path / "ref.json"), vlm, batch_size=5)
    processor = load_processor(tiny_model_dir)
    enc = Encoder(processor, specs.PROMPT, max_response_tokens=limit)
    items = read_pairs(path)
    cut = sum(enc.truncated([p["chosen"] for p in items] + [p["rejected"] for p in items]))
    assert 0 < cut < 2 * len(items)  # the limit matters for some responses, not all
    prompt_len = len(enc.prompt_ids(enc.encode_images([items[0]["image"]])[1][0])[0])

    ds = datasets.load_dataset("json", data_files=path, split="train")
    ds = ds.cast_column("images", datasets.Sequence(datasets.Image()))
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float64)
    cfg = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_eval_batch_size=4, report_to=[], use_cpu=True,
                        bf16=False, remove_unused_columns=False, dataloader_num_workers=0, seed=0,
                        max_length=prompt_len + limit)  # = our limit on the completion (all prompts are equal)
    trainer = trl.DPOTrainer(model=model, args=cfg, train_dataset=ds, eval_dataset=ds, processing_class=processor)
    trl_c, trl_r = [], []
    for batch in trainer.get_eval_dataloader():
        c, r = trainer.compute_ref_log_probs(trainer.model, batch)
        trl_c += c.tolist()
        trl_r += r.tolist()
    assert len(trl_c) == len(items) == len(ours["ref_chosen_logps"])
    # equal to float32 rounding: TRL's fused LM head returns float32 log-probs, ours are float64 here
    assert ours["ref_chosen_logps"] == pytest.approx(trl_c, rel=1e-6)
    assert ours["ref_rejected_logps"] == pytest.approx(trl_r, rel=1e-6)
    metrics = trainer.evaluate()
    n = len(items)
    assert metrics["eval_logps/chosen"] == pytest.approx(sum(ours["ref_chosen_logps"]) / n, rel=1e-6)
    assert metrics["eval_logps/rejected"] == pytest.approx(sum(ours["ref_rejected_logps"]) / n, rel=1e-6)
