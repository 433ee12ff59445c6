"""Incremental server-sent events (text/event-stream) parsing, bounded for hostile upstreams.

Streamed LLM answers (OpenAI, Anthropic, most gateways) and MCP's streamable HTTP speak SSE. The proxy sees
them as arbitrary byte chunks, cut anywhere (inside a UTF-8 character, between `\\r` and `\\n`), and has to
understand them while forwarding, on the event loop, for every chunk. So the parser:

- keeps only the unfinished line between chunks and splits with `bytes` methods, never byte by byte;
- follows the WHATWG rules that matter (`\\n`, `\\r\\n` and `\\r` line ends, `:` comments, multi-line `data:`
  joined with `\\n`, one leading space after the colon dropped, a BOM at stream start ignored, no dispatch of an
  event without data);
- never buffers more than `max_event` bytes: a longer line or event is skipped and `overflowed` is set;
- is lenient at the end: `close()` returns a last event whose blank line never came (servers often omit it).
"""

from __future__ import annotations

from dataclasses import dataclass

_BOM = "\ufeff"


@dataclass(slots=True)
class SseEvent:
    """One dispatched event: its type (`message` unless the stream named one), its data and the last event id
    (which, as in browsers, carries over to later events until an `id:` line changes it)."""

    event: str = "message"
    data: str = ""
    id: str | None = None


class SseParser:
    """Turns a byte stream into `SseEvent`s, chunk by chunk. Not thread-safe; one instance per stream."""

    __slots__ = (
        "_data", "_event", "_event_size", "_last_id", "_pending", "_pending_cr", "_pending_size",
        "_skip_event", "_skip_line", "_started", "max_event", "overflowed",
    )

    def __init__(self, max_event: int = 1 << 20) -> None:
        self.max_event = max_event
        self.overflowed = False
        self._pending: list[bytes] = []   # the unfinished last line, as received
        self._pending_size = 0
        self._pending_cr = False          # the previous chunk ended in `\r`: a leading `\n` belongs to it
        self._skip_line = False           # the unfinished line grew past max_event: drop it when it ends
        self._skip_event = False          # the current event grew past max_event: drop it when it ends
        self._started = False             # the first line (where a BOM may sit) was seen
        self._data: list[str] = []
        self._event = ""
        self._event_size = 0
        self._last_id: str | None = None

    @property
    def idle(self) -> bool:
        """Between events: nothing held (no unfinished line or event). A chunk of whole events fed now could be
        skipped by a caller that knows it holds nothing of interest, without upsetting what follows (only an
        `id:` line in it would be lost)."""
        return self._started and self._holds_nothing()

    def _holds_nothing(self) -> bool:
        return not (self._pending or self._data or self._event or self._pending_cr or self._skip_event
                    or self._skip_line)

    def lone_data(self, chunk: bytes) -> str | None:
        """The data of `chunk` if it is exactly one event of one `data:` line (`data: ...` and a blank line,
        no CR, no other line end) and the parser is idle; None otherwise, and nothing is consumed. The chunk
        is then taken as `feed` would take it (an event named `message`, with the last id seen), without
        splitting lines or building an event: the usual chunk of a streamed model answer, read the short way."""
        end = len(chunk) - 2
        if not (0 <= end <= self.max_event and chunk.startswith(b"data:") and chunk.find(b"\n") == end
                and chunk[-1] == 0x0A and chunk.find(b"\r") < 0):
            return None
        if not self._holds_nothing():
            return None   # not idle (before the first line it may be: a chunk starting `data:` has no BOM)
        self._started = True
        return chunk[6 if chunk[5:6] == b" " else 5:end].decode("utf-8", "replace")

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """The events completed by this chunk (possibly none)."""
        if not chunk:
            return []
        if self._pending_cr:
            self._pending_cr = False
            if chunk[0] == 0x0A:
                chunk = chunk[1:]
                if not chunk:
                    return []
        if chunk.find(b"\r") >= 0:   # (`in` is several times slower than find for bytes)
            self._pending_cr = chunk[-1] == 0x0D
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        last_newline = chunk.rfind(b"\n")
        if last_newline < 0:
            self._keep_unfinished(chunk)
            return []
        head = chunk[:last_newline]
        if self._pending:
            self._pending.append(head)
            head = b"".join(self._pending)
            self._pending = []
            self._pending_size = 0
        lines = head.decode("utf-8", "replace").split("\n")
        if self._skip_line:   # the first line is the end of the one too long to keep
            self._skip_line = False
            del lines[0]
        events: list[SseEvent] = []
        self._take_lines(lines, events)
        if last_newline + 1 < len(chunk):
            self._keep_unfinished(chunk[last_newline + 1:])
        return events

    def close(self) -> list[SseEvent]:
        """End of stream: the events still held, including an unterminated last one."""
        events: list[SseEvent] = []
        if self._pending and not self._skip_line:
            self._take_lines([b"".join(self._pending).decode("utf-8", "replace")], events)
        self._pending = []
        self._pending_size = 0
        self._skip_line = False
        self._take_lines([""], events)
        return events

    def _keep_unfinished(self, tail: bytes) -> None:
        if not tail or self._skip_line:
            return
        if self._pending_size + len(tail) > self.max_event:
            self._pending = []
            self._pending_size = 0
            self._skip_line = True
            self._skip_event = True
            self._data = []
            self.overflowed = True
            return
        self._pending.append(tail)
        self._pending_size += len(tail)

    def _take_lines(self, lines: list[str], events: list[SseEvent]) -> None:
        """Complete lines, in order. The per-line loop is the parser's hot path: `data:` lines take the short way."""
        if not self._started and lines:
            self._started = True
            lines[0] = lines[0].removeprefix(_BOM)
        data = self._data
        for line in lines:
            if not line:
                if data and not self._skip_event:
                    events.append(SseEvent(self._event or "message", "\n".join(data), self._last_id))
                self._data = data = []
                self._event = ""
                self._event_size = 0
                self._skip_event = False
            elif line[0] == ":" or self._skip_event:
                continue
            elif (size := self._event_size + len(line)) > self.max_event:
                self._skip_event = True
                self.overflowed = True
                self._data = data = []
            else:
                self._event_size = size
                if line.startswith("data:"):
                    data.append(line[6:] if line[5:6] == " " else line[5:])
                else:
                    self._take_field(line)

    def _take_field(self, line: str) -> None:
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._last_id = value
