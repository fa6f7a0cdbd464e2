"""The detokenizer: token ids to the text a reader sees, piece by piece, ending at a stop string."""

from __future__ import annotations


class IncrementalText:
    """The text of a growing list of tokens, handed out piece by piece (streaming), ending at the first stop string
    (not returned, as OpenAI's `stop`). Decoded whole each time: a multi-byte character split over tokens is held
    back until it is complete, and the last len(longest stop) - 1 characters until they cannot start a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer, self.stop, self.tokens, self.shown, self.stopped = tokenizer, stop, [], 0, False
        self.hold = max((len(x) for x in stop), default=1) - 1

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token: (the new text that is safe to show, whether a stop string ended the text)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        found = [i for i in (text.find(x, max(0, self.shown - len(x) + 1)) for x in self.stop) if i >= 0]
        if found:
            self.stopped = True
            return self._take(text, min(found)), True
        if text.endswith("\ufffd"):
            return "", False
        return self._take(text, len(text) - self.hold), False

    def flush(self) -> str:
        """What was held back, at the end."""
        if self.stopped or not self.tokens:
            return ""
        text = self.tokenizer.decode(self.tokens)
        return "" if text.endswith("\ufffd") else self._take(text, len(text))

    def _take(self, text: str, upto: int) -> str:
        piece = text[self.shown:max(upto, self.shown)]
        self.shown = max(upto, self.shown)
        return piece
