"""The assistant turn as a model's chat template renders it, without torch or transformers.

`cwdpo.logprobs.Encoder` scores a response as the tokens of its rendered assistant turn (Qwen:
`response<|im_end|>\\n`), found with the processor's `apply_chat_template`, and cuts it to
`model.max_response_tokens` tokens. The torch-free jobs (`make-pairs`) count how many responses that limit
cuts: they read the same chat template and `tokenizer.json` from the model folder (or its Hugging Face
cache snapshot) and render with jinja2 the way transformers does (sandboxed, `trim_blocks`,
`lstrip_blocks`). tests/test_logprobs.py checks that both give the same completions.
"""
from __future__ import annotations

import json
import os

MARKER = "CWDPOMARKER7f3a"  # a response text no chat template alters (the same as cwdpo.logprobs uses)


def model_folder(source: str) -> str:
    """A local folder as is; a hub id resolved to its snapshot in the Hugging Face cache (offline)."""
    if os.path.isdir(source):
        return source
    from .hub import snapshot_path
    return snapshot_path(source)


def chat_template(folder: str) -> str:
    """The chat template of a model folder: chat_template.jinja, chat_template.json, then
    tokenizer_config.json's `chat_template` (the order transformers' processors read them)."""
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                template = json.load(f).get("chat_template")
            if isinstance(template, str):
                return template
    raise FileNotFoundError(f"{folder}: no chat template (chat_template.jinja / .json / tokenizer_config.json)")


def _special_tokens(folder: str) -> dict:
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    out = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        v = cfg.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            out[key] = v
    return out


def render(template: str, messages: list, add_generation_prompt: bool = False, **kwargs) -> str:
    """`template` rendered as transformers renders chat templates (jinja2 sandbox, trim/lstrip blocks)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):  # `{% generation %}` blocks (assistant masks) render their body as is
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **kwargs)


def user_turn(prompt: str) -> list:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def assistant_affixes(template: str, prompt: str, **kwargs) -> tuple[str, str]:
    """(before, after) the assistant's text in the turn that follows `prompt` (cwdpo.logprobs.assistant_turn)."""
    prompt_text = render(template, user_turn(prompt), add_generation_prompt=True, **kwargs)
    full = render(template, user_turn(prompt) + [{"role": "assistant", "content": [{"type": "text", "text": MARKER}]}],
                  **kwargs)
    if not full.startswith(prompt_text) or full[len(prompt_text):].count(MARKER) != 1:
        raise ValueError("the chat template does not render the prompt as a prefix of the prompt + assistant turn")
    before, after = full[len(prompt_text):].split(MARKER)
    return before, after


class CompletionCounter:
    """Tokens of a response's rendered assistant turn under a model's tokenizer and chat template, and
    whether `limit` cuts it (what `Encoder.truncated` says, without torch)."""

    def __init__(self, source: str, prompt: str, limit: int):
        from tokenizers import Tokenizer
        folder = model_folder(source)
        self.tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        self.before, self.after = assistant_affixes(chat_template(folder), prompt, **_special_tokens(folder))
        self.limit = int(limit)

    def tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(self.before + text + self.after, add_special_tokens=False).ids)

    def truncated(self, text: str) -> bool:
        return self.tokens(text) > self.limit
