"""Multiple-choice VQA evaluation (MMBench / MMMU style) of a Qwen2.5-VL-architecture model.

- `items`: the item, its images and prompts, option rotations (the conventions every mode shares);
- `parse`: the letter a generated answer picks;
- `loaders`: MMBench TSV/parquet, MMMU parquet and our JSONL from local files;
- `shapes_set`: a generated set answerable from the `shapes` attribute records;
- `scoring`: option log-likelihoods or parsed letters, plain and circular accuracy (imports torch; loaded
  on first use, so the torch-free parts stay light).
"""
from .items import ANSWER_INSTRUCTION, LETTERS, InvalidItem, MCQItem, compose_images, item_image, mcq_prompt, \
    open_rgb, option_responses, presentations, rotation_order
from .loaders import load_mcq
from .parse import parse_letter
from .shapes_set import shapes_mcq, shapes_questions

_SCORING = ("evaluate_mcq", "evaluate_set", "loglik_scores", "generate_answers", "concat_batches")


def __getattr__(name):
    if name in _SCORING:
        from . import scoring
        return getattr(scoring, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ANSWER_INSTRUCTION", "LETTERS", "InvalidItem", "MCQItem", "compose_images", "item_image", "mcq_prompt",
           "open_rgb", "option_responses", "presentations", "rotation_order", "load_mcq", "parse_letter",
           "shapes_mcq", "shapes_questions", *_SCORING]
