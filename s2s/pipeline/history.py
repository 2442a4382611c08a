"""A session's conversation history, bounded by turns and by tokens (pure)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypedDict

INTERRUPTED_MARK = " …"
"""Appended to a reply the user cut off, so the model sees it was not finished."""
SETTLED_KEYS_KEPT = 16
"""Outcomes of speculative turns remembered for a reply recorded after its outcome."""

SpeculationKey = tuple[int, int]
"""(turn id, generation) of a speculative reply."""


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


@dataclass
class _Exchange:
    turn_id: int
    user: str
    reply: str


class ChatHistory:
    """Exchanges so far; ``prompt()`` builds the messages for the next reply.

    Thread-safe: the LLM stage records replies, the session amends them with what the user
    actually heard when a reply is interrupted (that report may arrive before or after the
    LLM stage records the reply: an amendment that comes first waits for its exchange).
    """

    def __init__(self, options: HistoryOptions, count_tokens: Callable[[str], int]) -> None:
        self._options = options
        self._system_prompt = options.system_prompt
        self._count_tokens = count_tokens
        self._exchanges_lock = threading.Lock()  # guards _exchanges, _heard, _system_prompt
        self._exchanges: list[_Exchange] = []
        self._heard: dict[int, str] = {}
        self._pending: dict[SpeculationKey, _Exchange] = {}  # speculative, not yet settled
        self._settled: dict[SpeculationKey, bool] = {}  # settled before their record came

    def prompt(self, user_text: str) -> list[ChatMessage]:
        with self._exchanges_lock:
            messages: list[ChatMessage] = [{"role": "system", "content": self._system_prompt}]
            for exchange in self._exchanges:
                messages.append({"role": "user", "content": exchange.user})
                messages.append({"role": "assistant", "content": exchange.reply})
        messages.append({"role": "user", "content": user_text})
        return messages

    def set_system_prompt(self, text: str) -> None:
        """From the next reply on (the client's instructions)."""
        with self._exchanges_lock:
            self._system_prompt = text

    def record(
        self, user_text: str, reply_text: str, interrupted: bool = False, turn_id: int = -1
    ) -> None:
        """Keep one exchange, marked if cut off; if the user was reported to have heard only
        part of this turn's reply, only that part is kept."""
        with self._exchanges_lock:
            heard = self._heard.pop(turn_id, None)
            if heard is not None:
                reply_text, interrupted = heard, True
            reply = reply_text.strip() + (INTERRUPTED_MARK if interrupted else "")
            self._exchanges.append(_Exchange(turn_id, user_text.strip(), reply))
            self._trim()

    def record_speculative(
        self, key: SpeculationKey, user_text: str, reply_text: str, interrupted: bool = False
    ) -> None:
        """Like ``record``, for a reply speculated at a pause: it joins the history only once
        ``settle(key, keep=True)`` is called (before or after this)."""
        with self._exchanges_lock:
            keep = self._settled.pop(key, None)
            if keep is None:
                reply = reply_text.strip() + (INTERRUPTED_MARK if interrupted else "")
                self._pending[key] = _Exchange(key[0], user_text.strip(), reply)
                return
        if keep:
            self.record(user_text, reply_text, interrupted, turn_id=key[0])

    def settle(self, key: SpeculationKey, keep: bool) -> None:
        """The speculative reply ``key`` was confirmed (``keep``) or thrown away."""
        with self._exchanges_lock:
            exchange = self._pending.pop(key, None)
            if exchange is None:
                self._settled[key] = keep
                while len(self._settled) > SETTLED_KEYS_KEPT:
                    del self._settled[next(iter(self._settled))]
                return
        if keep:
            interrupted = exchange.reply.endswith(INTERRUPTED_MARK)
            reply = exchange.reply.removesuffix(INTERRUPTED_MARK) if interrupted else exchange.reply
            self.record(exchange.user, reply, interrupted, turn_id=exchange.turn_id)

    def amend_heard(self, turn_id: int, heard_text: str) -> None:
        """The user heard only ``heard_text`` of turn ``turn_id``'s reply (it was interrupted)."""
        with self._exchanges_lock:
            for exchange in reversed(self._exchanges):
                if exchange.turn_id == turn_id:
                    exchange.reply = heard_text.strip() + INTERRUPTED_MARK
                    return
            self._heard[turn_id] = heard_text
            while len(self._heard) > SETTLED_KEYS_KEPT:  # for turns never recorded
                del self._heard[next(iter(self._heard))]

    def _trim(self) -> None:
        # A slice from -0 would keep everything: no turns kept means none.
        keep = max(0, self._options.max_turns)
        self._exchanges = self._exchanges[len(self._exchanges) - keep :] if keep else []
        while self._exchanges and self._tokens() > self._options.max_history_tokens:
            self._exchanges.pop(0)

    def _tokens(self) -> int:
        return sum(
            self._count_tokens(e.user) + self._count_tokens(e.reply) for e in self._exchanges
        )

    def __len__(self) -> int:
        with self._exchanges_lock:
            return len(self._exchanges)
