"""Prompts: the model's own chat template plus a mode (``fast``: answer directly, ``slow``: reason first).

Modes are config. For hybrid thinking models whose template takes ``enable_thinking`` (Qwen3 style), the mode maps
to the model's own switch; elsewhere it is an instruction appended to the question.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kvprobe.tasks import LETTERS, Item
from kvprobe.typecheck import check_fields

MODES = ("fast", "slow")


@dataclass
class PromptSpec:
    """How a question becomes a prompt.

    Args:
        mode: ``fast`` (answer directly) or ``slow`` (reason step by step first).
        system: system message; ``None`` keeps the template's default.
        fast: instruction appended to math questions in fast mode.
        slow: instruction appended to math questions in slow mode.
        choice_fast: instruction for multiple choice in fast mode. A bare "answer with a letter" makes small models
            print one letter for everything; asking for the letter *and* the text makes them name a choice.
        choice_slow: instruction for multiple choice in slow mode.
        thinking_switch: ``auto`` uses the template's ``enable_thinking`` when it has one, ``template`` requires
            it, ``instruction`` always uses the instructions above.
    """

    mode: str = "slow"
    system: str | None = None
    fast: str = "Reply with only the final answer, no explanation."
    slow: str = "Think step by step, then write the final answer on the last line as 'Answer: <answer>'."
    choice_fast: str = "Reply with the letter and the text of the correct choice, for example 'B. <text of B>'."
    choice_slow: str = (
        "Think step by step, then write the final answer on the last line as 'Answer: <letter>'."
    )
    thinking_switch: str = "auto"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"prompt mode {self.mode!r} is not one of {MODES}")
        if self.thinking_switch not in ("auto", "template", "instruction"):
            raise ValueError(f"thinking_switch {self.thinking_switch!r} is not auto, template or instruction")
        check_fields(self, "prompt")

    def to_dict(self) -> dict:
        return asdict(self)


def check_token_caps(caps, name: str = "max_new_tokens") -> dict[str, int]:
    """``caps`` as ``{mode: positive int}``, or a ValueError naming ``name`` and what it takes."""
    ok = isinstance(caps, dict) and caps and not set(caps) - set(MODES) and all(
        type(v) is int and v >= 1 for v in caps.values())
    if not ok:
        raise ValueError(f"{name} maps modes {MODES} to positive whole numbers of tokens (e.g. {{fast: 32, slow: 256}}), "
                         f"not {caps!r}")
    return dict(caps)


def uses_template_switch(spec: PromptSpec, tokenizer) -> bool:
    has_switch = "enable_thinking" in (getattr(tokenizer, "chat_template", None) or "")
    if spec.thinking_switch == "template" and not has_switch:
        raise ValueError("thinking_switch='template' but this tokenizer's chat template has no enable_thinking")
    return has_switch and spec.thinking_switch != "instruction"


def messages(item: Item, spec: PromptSpec, template_switch: bool = False) -> list[dict]:
    if item.choices:
        listed = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
        body, instruction = f"{item.question}\n\n{listed}", getattr(spec, f"choice_{spec.mode}")
    else:
        body, instruction = item.question, getattr(spec, spec.mode)
    if template_switch and not item.choices:
        instruction = spec.fast if spec.mode == "fast" else "Write the final answer on the last line as 'Answer: <answer>'."
    msgs = [{"role": "system", "content": spec.system}] if spec.system else []
    return msgs + [{"role": "user", "content": f"{body}\n\n{instruction}"}]


def prompt_ids(item: Item, spec: PromptSpec, tokenizer) -> list[int]:
    """Token ids of the full prompt, ending where the assistant's answer begins."""
    switch = uses_template_switch(spec, tokenizer)
    return chat_ids(messages(item, spec, switch), spec, tokenizer)


def chat_ids(msgs: list[dict], spec: PromptSpec, tokenizer) -> list[int]:
    """Token ids of chat ``msgs`` (already carrying the mode's instruction) with the generation prompt appended."""
    kwargs = {"enable_thinking": spec.mode == "slow"} if uses_template_switch(spec, tokenizer) else {}
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False, **kwargs)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def with_instruction(msgs: list[dict], spec: PromptSpec, tokenizer) -> list[dict]:
    """A user's own chat with the mode's instruction appended to its last user message (what ``messages`` does
    for a task item), so live chats and captured questions are prompted alike."""
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"chat message {i} must be a dict with string 'role' and 'content', not {m!r}")
    users = [i for i, m in enumerate(msgs) if m.get("role") == "user"]
    if not users:
        raise ValueError("a chat prompt needs at least one message with role 'user'")
    out = [dict(m) for m in msgs]
    last = out[users[-1]]
    instruction = getattr(spec, spec.mode)
    if uses_template_switch(spec, tokenizer):
        instruction = spec.fast if spec.mode == "fast" else "Write the final answer on the last line as 'Answer: <answer>'."
    last["content"] = f"{last['content']}\n\n{instruction}"
    if spec.system and not any(m.get("role") == "system" for m in out):
        out.insert(0, {"role": "system", "content": spec.system})
    return out
