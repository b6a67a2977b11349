"""A multipart/form-data body -> the bytes of its uploaded files, with python-multipart's streaming parser.

Starlette's ``request.form()`` spools every file to a ``SpooledTemporaryFile`` and wraps it in an
``UploadFile``: a tenth of the server's time per 28x28 upload (measured with py-spy). The body is in memory
already (the body limit bounds it), so here the parser's callbacks collect the file parts as bytes directly.
"""

from __future__ import annotations

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from .handlers import BadRequest, Unprocessable

MAX_OTHER_PARTS = 8  # parts that are not the wanted files (text fields, other names): ignored, but not unbounded


class _FileCollector:
    """Parser callbacks keeping the contents of the file parts named ``field``."""

    def __init__(self, field: bytes, max_files: int) -> None:
        self.field, self.max_files = field, max_files
        self.files: list[bytes] = []
        self.others = 0
        self.header_name = self.header_value = self.disposition = b""
        self.chunks: list[bytes] | None = None  # the current part's data, when it is a wanted file

    def on_part_begin(self) -> None:
        self.disposition, self.chunks = b"", None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_name = self.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        if options.get(b"name") == self.field and b"filename" in options:
            if len(self.files) >= self.max_files:
                raise BadRequest(f"too many files: at most {self.max_files} per request")
            self.chunks = []
        else:
            self.others += 1
            if self.others > MAX_OTHER_PARTS:
                raise BadRequest(f"too many form fields: at most {MAX_OTHER_PARTS} besides the files")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.chunks is not None:
            self.chunks.append(data[start:end])

    def on_part_end(self) -> None:
        if self.chunks is not None:
            self.files.append(b"".join(self.chunks))
            self.chunks = None


def uploaded_files(body: bytes, content_type: str, field: str = "file", max_files: int = 1) -> list[bytes]:
    """The files uploaded in form field ``field`` (at most ``max_files``), in order. A body that cannot be
    parsed is a ``BadRequest``; one without such a file an ``Unprocessable``."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("malformed multipart body (no boundary in its Content-Type)")
    collector = _FileCollector(field.encode(), max_files)
    callbacks = {name: getattr(collector, name) for name in (
        "on_part_begin", "on_header_field", "on_header_value", "on_header_end", "on_headers_finished",
        "on_part_data", "on_part_end")}
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except (FormParserError, ValueError) as exc:
        raise BadRequest(f"malformed multipart body ({str(exc)[:120] or type(exc).__name__})") from None
    if not collector.files:
        raise Unprocessable(f"multipart body needs a file field named '{field}'")
    return collector.files
