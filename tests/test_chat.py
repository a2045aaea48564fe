"""The completion that is scored: the chat template's assistant turn, found the same way with and without
torch (the torch-free count in the pairs summary says what the Encoder cuts)."""
import os
import shutil

import pytest

import micro_specs as specs
from cwdpo.chat import CompletionCounter, assistant_affixes, chat_template
from cwdpo.logprobs import Encoder, assistant_turn
from cwdpo.models import QWEN2_5_VL_CHAT_TEMPLATE, load_processor

TEXTS = ["a red circle", "A man riding a horse on the beach.", "", "two  spaces and\nnewline",
         "Gentle yellow triangle above a small blue square to the left of it, on a white background"]


@pytest.fixture(scope="module")
def qwen_template_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with the published Qwen2.5-VL chat template (a default system turn)."""
    out = tmp_path_factory.mktemp("qwen_template")
    for name in os.listdir(tiny_model_dir):
        shutil.copy(os.path.join(tiny_model_dir, name), out / name)
    (out / "chat_template.jinja").write_text(QWEN2_5_VL_CHAT_TEMPLATE)
    return str(out)


@pytest.mark.parametrize("which", ["tiny", "qwen"])
def test_torch_free_turn_equals_the_processors(which, tiny_model_dir, qwen_template_dir):
    folder = tiny_model_dir if which == "tiny" else qwen_template_dir
    proc = load_processor(folder)
    if which == "qwen":
        assert "You are a helpful assistant." in Encoder(proc, specs.PROMPT).prompt_text
    assert assistant_turn(proc, specs.PROMPT) == ("", "<|im_end|>\n")
    assert assistant_affixes(chat_template(folder), specs.PROMPT) == assistant_turn(proc, specs.PROMPT)
    enc = Encoder(proc, specs.PROMPT, max_response_tokens=8)
    counter = CompletionCounter(folder, specs.PROMPT, 8)
    full = enc.full_completion_ids(TEXTS)
    assert [counter.tokens(t) for t in TEXTS] == [len(ids) for ids in full]
    assert [counter.truncated(t) for t in TEXTS] == enc.truncated(TEXTS)
    assert any(enc.truncated(TEXTS)) and not all(enc.truncated(TEXTS))
    # the cut keeps the first tokens of the turn (TRL's keep_start): a long response loses its end of turn
    cut = enc.response_ids(TEXTS)
    for ids, whole in zip(cut, full):
        assert ids == whole[:8]
