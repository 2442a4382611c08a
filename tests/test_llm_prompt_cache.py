"""CTranslate2's static prompt: the system prompt is cached, at most a bounded number of them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from s2s.models.llm import Ctranslate2Chat, LlmOptions
from s2s.pipeline.history import ChatMessage

CACHED = 3


class TemplateTokenizer:
    """Renders each message as ``<role> content </>`` tokens, like a chat template."""

    def apply_chat_template(
        self, messages: list[ChatMessage], add_generation_prompt: bool, tokenize: bool
    ) -> list[int]:
        ids: list[int] = []
        for message in messages:
            ids += [1, *map(ord, message["role"]), *map(ord, message["content"]), 2]
        return ids + ([3] if add_generation_prompt else [])

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [f"<{i}>" for i in ids]


class RecordingGenerator:
    """Records what each generation was given, and generates nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str] | None, list[str]]] = []

    def generate_tokens(
        self, prompt: list[str], static_prompt: list[str] | None = None, **_: Any
    ) -> Iterator[Any]:
        self.calls.append((static_prompt, prompt))
        return iter([])


def chat() -> tuple[Ctranslate2Chat, RecordingGenerator]:
    generator = RecordingGenerator()
    options = LlmOptions(cached_system_prompts=CACHED)
    return Ctranslate2Chat(generator, TemplateTokenizer(), [], options), generator


def ask(backend: Ctranslate2Chat, system: str | None, question: str) -> None:
    messages: list[ChatMessage] = [{"role": "user", "content": question}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    list(backend.stream(messages, lambda: False))


def whole(system: str, question: str) -> list[str]:
    return TemplateTokenizer().convert_ids_to_tokens(
        TemplateTokenizer().apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": question}],
            add_generation_prompt=True,
            tokenize=True,
        )
    )


def test_the_system_prompt_goes_as_the_static_prompt_and_the_rest_as_the_prompt() -> None:
    """Static prompt plus prompt is the whole rendered conversation, split after the system."""
    backend, generator = chat()
    ask(backend, "Be brief.", "Why?")
    static, prompt = generator.calls[0]
    assert static is not None
    assert static + prompt == whole("Be brief.", "Why?")
    assert static[-1] == "<2>" and prompt[0] == "<1>"  # the system message ends, the user's begins


def test_no_system_message_means_no_static_prompt() -> None:
    """A conversation without a system message goes whole."""
    backend, generator = chat()
    ask(backend, None, "Why?")
    assert generator.calls[0][0] is None


def test_only_the_first_few_distinct_system_prompts_are_cached() -> None:
    """Past the limit a new system prompt goes whole (CTranslate2 would keep it forever);
    the ones cached before stay cached."""
    backend, generator = chat()
    for index in range(CACHED + 2):
        ask(backend, f"prompt {index}", "Why?")
    assert [static is not None for static, _ in generator.calls] == [True] * CACHED + [False] * 2
    assert generator.calls[-1][1] == whole(f"prompt {CACHED + 1}", "Why?")
    ask(backend, "prompt 0", "Why?")
    assert generator.calls[-1][0] is not None
