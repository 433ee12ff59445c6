"""Which chunks of a streamed model answer can pass unread: the tests behind `LlmResponseObserver`'s holding.

A long answer is mostly content deltas, one small event per chunk, and once the model, the answer's id and the
first token are known none of them can change the facts. Looking at each chunk as it passes would cost a
Python call and a regex search per chunk, several times what forwarding it costs, so the observer holds such
chunks (references to bytes already sent on) and looks at a run of them at once, with calls that stay in C
over the whole run. Two tests, both exact: each says "quiet" only when no chunk of the run could change the
facts, and anything unusual says "look", after which the chunks are tested one by one.

- `ChunkTemplate`: servers send every content delta in the same bytes but for the text (vLLM, llama.cpp,
  Ollama, Anthropic's `text_delta`s) and, for api.openai.com, a random `obfuscation` string. The template is
  learned from a delta the observer parsed: the fixed bytes around those strings. A chunk made of the same
  fixed bytes, whose strings hold no bare quote or control character (escapes are fine), is that same event
  with other words: nothing to read.
- `chat_run_quiet` / `anthropic_run_quiet`: substring counts for streams whose deltas differ in other ways:
  a chat run is quiet when every fact key in it has a null value; an Anthropic run when no event type that
  carries facts appears in it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from itertools import accumulate, repeat
from operator import add, eq, sub

HOLD_CHUNKS = 32
"""Chunks held before they are looked at together."""
HOLD_CHUNK_BYTES = 2048
"""Only chunks this small are held (a content delta is a few hundred bytes), so at most 64 KiB per answer."""

_CONTROL = bytes(range(0x20))
"""Bytes that may not occur in a template's varying strings: a CR or LF would start another SSE line, the
others make the JSON invalid. Deleted in one pass over the run (`bytes.translate`) to count them."""


_QUOTE = 0x22


def _flat(data: bytes) -> bytes:
    """`data` with every escaped backslash and escaped quote blanked out, same length: the quotes left are the
    ones that open and close JSON strings. (`bytes.replace` pairs backslashes from the left, as JSON does.)"""
    if data.find(b"\\") < 0:   # (memchr: the usual run has no escape at all, and costs no copy)
        return data
    return data.replace(b"\\\\", b"__").replace(b'\\"', b"__")


ESCAPED_ASCII = re.compile(rb"\\u00[4-7]")
"""A JSON escape of an ASCII letter or `_` (`\\u0073` for `s`). Encoders escape quotes, backslashes, control
characters, non-ASCII and (Go's) `<>&`, never letters; one that does could spell a key or an event type that a
byte search would not see."""


def bytes_show_every_name(events: bytes) -> bool:
    """Whether byte searches over these whole events see every key and event type in them: no JSON escape
    spells a letter, and no event's data spans lines (a key on one `data:` line and its colon on the next
    join into valid JSON), so no CR and every `data:` line but the first starts an event. Chat streams only:
    Anthropic's events open with an `event:` line, and their names cannot span lines."""
    return (events.find(b"\r") < 0 and events.count(b"\ndata:") == events.count(b"\n\ndata:")
            and ESCAPED_ASCII.search(events) is None)

# Keys whose non-null value is a fact (OpenAI chat and legacy completions), each with its null forms as the
# OpenAI SDK's and Python's JSON encoders write them.
_CHAT_NULLABLE = tuple((key, (key + b":null", key + b": null", *extra)) for key, extra in (
    (b'"usage"', ()), (b'"finish_reason"', ()), (b'"tool_calls"', (b'"tool_calls":[]',)),
    (b'"function_call"', ()), (b'"error"', ())))
_CHAT_ALWAYS = (b"[DONE]", b"event:")
# What every Anthropic event carrying a fact names: message_start/_delta/_stop, content_block_start/_stop, tool
# input deltas and errors. Text deltas and pings name none of these.
_ANTHROPIC_MARKERS = (b"message_", b"content_block_st", b"input_json_delta", b"error")


class ChunkTemplate:
    """One content delta's bytes around the strings that vary from delta to delta (the text, and padding where
    the server adds some): `head` (up to and including the opening quote of the first), `middles` (from the
    closing quote of one to the opening quote of the next) and `tail` (from the last closing quote on)."""

    __slots__ = ("controls", "head", "middles", "quotes", "tail")

    def __init__(self, pieces: list[bytes]) -> None:
        self.head, *middles, self.tail = pieces
        self.middles = [_flat(middle) for middle in middles]   # as they show in a run with escapes blanked out
        fixed = b"".join(pieces)
        self.quotes = _flat(fixed).count(b'"')
        self.controls = len(fixed) - len(fixed.translate(None, _CONTROL))

    @classmethod
    def learn(cls, chunk: bytes, keys: tuple[bytes, ...]) -> ChunkTemplate | None:
        """The template of `chunk`, a whole single event (ending with a blank line, no CR) whose varying strings
        are the members named `keys`: the first (the text) must be there, the others may; each at most once.
        None when the chunk has another shape."""
        if not chunk.endswith(b"\n\n") or chunk.find(b"\n\n") != len(chunk) - 2 or chunk.find(b"\r") >= 0:
            return None
        flat = _flat(chunk)
        spans: list[tuple[int, int]] = []
        for i, key in enumerate(keys):
            marker = b'"' + key + b'":"'
            start = chunk.find(marker)
            if start < 0:
                if i == 0:
                    return None
                continue
            if chunk.find(marker, start + 1) >= 0:
                return None
            begin = start + len(marker)
            end = flat.find(b'"', begin)   # the string's closing quote
            if end < 0 or len(chunk[begin:end].translate(None, _CONTROL)) != end - begin:
                return None
            spans.append((begin, end))
        pieces, position = [], 0
        for begin, end in sorted(spans):
            pieces.append(chunk[position:begin])
            position = end
        pieces.append(chunk[position:])
        return cls(pieces)

    def fits(self, chunk: bytes) -> bool:
        return self.fits_all([chunk], chunk)

    def fits_all(self, chunks: list[bytes], run: bytes) -> bool:
        """Does every chunk have this template's shape? `run` is the chunks joined.

        Each chunk must start with `head` and end with `tail`. In the run with its escaped quotes blanked out
        (`_flat`), each string's closing quote is the first quote after its start: a middle must begin there,
        and the tail's quote must be one too (not escaped by the string before it). Then each chunk holds at
        least the template's quotes and control bytes, and the run exactly that many per chunk only if no
        varying string holds a bare quote or a control byte: each string then ends where the template says,
        and the chunk is the same event with other text (escapes and all; one with a broken escape is no valid
        JSON, which reads as nothing either way)."""
        if not (all(map(bytes.startswith, chunks, repeat(self.head)))
                and all(map(bytes.endswith, chunks, repeat(self.tail)))):
            return False
        flat = _flat(run)
        if flat is run:   # no escape anywhere: positions within each chunk will do
            starts: Iterable[int] = repeat(len(self.head))
            for middle in self.middles:
                closes = list(map(bytes.find, chunks, repeat(b'"'), starts))
                if not all(map(bytes.startswith, chunks, repeat(middle), closes)):
                    return False
                starts = list(map(add, closes, repeat(len(middle))))
            return (min(map(sub, map(len, chunks), starts)) >= len(self.tail)
                    and run.count(b'"') == self.quotes * len(chunks)
                    and len(run) - len(run.translate(None, _CONTROL)) == self.controls * len(chunks))
        tails: list[int] | None = None
        if self.middles:   # positions in the run: where each chunk ends, where its next string starts
            ends = list(accumulate(map(len, chunks)))
            starts = list(map(add, (0, *ends[:-1]), repeat(len(self.head))))
            for middle in self.middles:
                # (no quote found: -1, where a middle, two quotes at least, cannot start)
                closes = list(map(flat.find, repeat(b'"'), starts, ends))
                if not all(map(flat.startswith, repeat(middle), closes)):
                    return False
                starts = list(map(add, closes, repeat(len(middle))))
            tails = list(map(sub, ends, repeat(len(self.tail))))
            if min(map(sub, tails, starts)) < 0:
                return False
        elif min(map(len, chunks)) < len(self.head) + len(self.tail):
            return False
        if tails is None:
            tails = list(map(sub, accumulate(map(len, chunks)), repeat(len(self.tail))))
        if not all(map(eq, map(flat.__getitem__, tails), repeat(_QUOTE))):
            return False   # the tail's quote is escaped
        return (flat.count(b'"') == self.quotes * len(chunks)
                and len(run) - len(run.translate(None, _CONTROL)) == self.controls * len(chunks))


def chat_run_quiet(run: bytes) -> bool:
    """Held chat chunks in which `llm._CHAT_CHUNK_FACTS` would find nothing, and would be right to: every fact
    key there is null, no named event, no end of stream, and nothing hidden from byte searches."""
    for marker in _CHAT_ALWAYS:
        if run.find(marker) >= 0:
            return False
    for key, nulls in _CHAT_NULLABLE:
        n = run.count(key)
        if n and n != sum(map(run.count, nulls)):
            return False
    return bytes_show_every_name(run)


def anthropic_run_quiet(run: bytes) -> bool:
    """Held Anthropic chunks in which `llm._ANTHROPIC_CHUNK_FACTS` would find nothing, no name escaped."""
    return all(run.find(marker) < 0 for marker in _ANTHROPIC_MARKERS) and ESCAPED_ASCII.search(run) is None
