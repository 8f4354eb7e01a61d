"""Incremental detokenization with exact token accounting.

The engine hands over token ids one by one; clients want text. :class:`IncrementalDetokenizer`
turns ids into text pieces such that

- every piece carries the ids of exactly the tokens whose text it contains, so the concatenation
  of all pieces' ids is the whole completion and the concatenation of their texts is its text
  (the gateway resumes a broken stream from those ids);
- a token that ends inside a multi-byte UTF-8 character (its text ends with ``"\\ufffd"``) is held
  back until the character is complete;
- text that could be the beginning of a stop string is held back until it is known not to be
  one; when a stop string appears, the text is cut just before it and :attr:`stopped` is set.

Pieces always end on token boundaries: text is never split inside one token's text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

REPLACEMENT_CHAR = "\ufffd"


@dataclass
class DetokenizedPiece:
    """New text and the ids of exactly the tokens it came from."""

    text: str
    token_ids: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.text) or bool(self.token_ids)


class IncrementalDetokenizer:
    """Turns one request's generated ids into text pieces (see the module docstring).

    ``max_held_tokens`` bounds how long an undecodable tail is held: a token whose own text is a
    literal U+FFFD would otherwise hold everything after it.

    Work per token is bounded by what is held back, which is at most the longest stop string (plus
    an incomplete character): each token costs one decode of the held ids, and the text of every
    shorter run of them is remembered rather than decoded again.
    """

    def __init__(
        self,
        tokenizer: Any,
        stop: Sequence[str] = (),
        *,
        skip_special_tokens: bool = True,
        max_held_tokens: int = 8,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.skip_special_tokens = skip_special_tokens
        self.max_held_tokens = max_held_tokens
        self.text = ""  # everything emitted so far
        self.token_ids: list[int] = []  # every id emitted so far
        self.pending: list[int] = []  # ids whose text is not emitted yet
        self._pending_texts: list[str] = []  # [k] = decode(pending[:k + 1])
        self.stopped = False  # a stop string was found; nothing more is accepted
        self.stop_string: str | None = None

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(
            list(ids), skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _emit(self, k: int) -> DetokenizedPiece:
        """Release the first ``k`` pending tokens (their text is ``_pending_texts[k - 1]``)."""
        text, ids = self._pending_texts[k - 1], self.pending[:k]
        rest_ids, rest_texts = self.pending[k:], self._pending_texts[k:]
        self.pending = rest_ids
        if text and not text.endswith(REPLACEMENT_CHAR) and all(t.startswith(text) for t in rest_texts):
            # The held tokens' text goes on where the released text ends: no decode again.
            self._pending_texts = [t[len(text):] for t in rest_texts]
        else:
            self._pending_texts = [self._decode(rest_ids[:j]) for j in range(1, len(rest_ids) + 1)]
        self.text += text
        self.token_ids.extend(ids)
        return DetokenizedPiece(text, ids)

    def _stop_holdback(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            # Only suffixes that begin with the stop string's first character can match.
            lo = max(0, len(text) - (len(s) - 1))
            i = text.find(s[0], lo)
            while i >= 0:
                n = len(text) - i
                if n <= best:
                    break
                if s.startswith(text[i:]):
                    best = n
                    break
                i = text.find(s[0], i + 1)
        return best

    def add(self, token_id: int) -> DetokenizedPiece:
        """Take one generated id; return what can be released now (possibly empty)."""
        if self.stopped:
            return DetokenizedPiece("")
        self.pending.append(int(token_id))
        pending_text = self._decode(self.pending)
        self._pending_texts.append(pending_text)
        if self.stop:
            cut = self._find_stop(pending_text)
            if cut is not None:
                self.stopped = True
                self.stop_string = next(x for x in self.stop if pending_text.startswith(x, cut))
                ids, self.pending, self._pending_texts = self.pending, [], []
                self.text += pending_text[:cut]
                self.token_ids.extend(ids)
                return DetokenizedPiece(pending_text[:cut], ids)
        # An incomplete character at the end may still complete a stop string's prefix: judge
        # the prefix on the text before it.
        complete = pending_text.rstrip(REPLACEMENT_CHAR)
        safe_len = len(complete) - self._stop_holdback(complete) if self.stop else len(pending_text)
        force = len(self.pending) > self.max_held_tokens
        # The longest run of whole pending tokens whose text is complete and safe to show.
        for k in range(len(self.pending), 0, -1):
            text_k = self._pending_texts[k - 1]
            if len(text_k) > safe_len:
                continue
            if text_k.endswith(REPLACEMENT_CHAR) and not force:
                continue
            if not text_k:
                # Only special tokens so far (skipped as empty text): let their ids ride along
                # with the next visible text rather than sending an empty delta, for a while.
                if len(self.pending) <= self.max_held_tokens:
                    return DetokenizedPiece("")
                return self._emit(len(self.pending))
            return self._emit(k)
        return DetokenizedPiece("")

    def _find_stop(self, pending_text: str) -> int | None:
        """Where in the pending text the earliest stop string begins, if any. Emitted text never
        holds one, and a possible beginning was held back, so only the pending text is searched."""
        cut: int | None = None
        for s in self.stop:
            i = pending_text.find(s)
            if i >= 0 and (cut is None or i < cut):
                cut = i
        return cut

    def flush(self) -> DetokenizedPiece:
        """The request ended: release whatever is held (text and ids)."""
        if self.stopped or not self.pending:
            return DetokenizedPiece("")
        ids, self.pending, self._pending_texts = self.pending, [], []
        text = self._decode(ids)
        self.text += text
        self.token_ids.extend(ids)
        return DetokenizedPiece(text, ids)


__all__ = ["DetokenizedPiece", "IncrementalDetokenizer"]
