"""Token ids to text as they are generated: whole characters only, stop sequences cut."""

from __future__ import annotations


class TextStream:
    """Token ids in, text pieces out: whole characters only, and stop sequences cut.

    Text that could be the start of a stop sequence is held back until it is clear it is not one,
    so a client never sees part of a stop sequence."""

    def __init__(self, model, stop: list[str]):  # model: anything with decode(ids) -> str (a Model)
        self.model, self.stop = model, stop
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far
        self.sent = 0  # how much of self.text has been handed out
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.model.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is still incomplete
            return ""
        self.text = text
        if not self.stop:
            return self._take(len(text))
        longest = max(len(s) for s in self.stop)
        start = max(0, self.sent - longest)
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self.text = text[: min(hits)]
            return self._take(len(self.text))
        # a prefix longer than the text cannot end it: k stops at len(text), so a long stop string costs
        # what the text costs, not its length squared on every token
        hold = max((k for s in self.stop for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])),
                   default=0)
        return self._take(len(text) - hold)

    def flush(self) -> str:
        """The rest, at the end: held-back text, and bytes that never formed a whole character."""
        if not self.stopped:
            self.text = self.model.decode(self.ids)
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        piece = self.text[self.sent: max(end, self.sent)]
        self.sent = max(end, self.sent)
        return piece
