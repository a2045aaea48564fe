"""Our pairs file is read by TRL's DPOTrainer unchanged (TRL 1.16, the `bench`/`test` extra)."""
import math

import pytest

import specs
from cwdpo.negatives import build_pairs, write_pairs


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
