"""A session's conversation history, bounded by turns and by tokens (pure)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypedDict

INTERRUPTED_MARK = " …"
"""Appended to a reply the user cut off, so the model sees it was not finished."""


class ChatMessage(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True, slots=True)
class HistoryOptions:
    system_prompt: str = "You are a helpful assistant. Answer in English in one short sentence."
    max_turns: int = 8
    """User/assistant exchanges kept; older ones are forgotten first."""
    max_history_tokens: int = 1024
    """Token budget for the kept exchanges (the system prompt and new question not counted)."""


class ChatHistory:
    """Exchanges so far; ``prompt()`` builds the messages for the next reply. Not thread-safe:
    one session's LLM stage owns it."""

    def __init__(self, options: HistoryOptions, count_tokens: Callable[[str], int]) -> None:
        self._options = options
        self._count_tokens = count_tokens
        self._exchanges: list[tuple[str, str]] = []

    def prompt(self, user_text: str) -> list[ChatMessage]:
        messages: list[ChatMessage] = [{"role": "system", "content": self._options.system_prompt}]
        for user, assistant in self._exchanges:
            messages.append({"role": "user", "content": user})
            messages.append({"role": "assistant", "content": assistant})
        messages.append({"role": "user", "content": user_text})
        return messages

    def record(self, user_text: str, reply_text: str, interrupted: bool = False) -> None:
        """Keep one exchange: only what the user heard of the reply, marked if cut off."""
        reply = reply_text.strip() + (INTERRUPTED_MARK if interrupted else "")
        self._exchanges.append((user_text.strip(), reply))
        self._exchanges = self._exchanges[-self._options.max_turns :]
        while self._exchanges and self._tokens() > self._options.max_history_tokens:
            self._exchanges.pop(0)

    def _tokens(self) -> int:
        return sum(self._count_tokens(u) + self._count_tokens(a) for u, a in self._exchanges)

    def __len__(self) -> int:
        return len(self._exchanges)
