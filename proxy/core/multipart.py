"""Reading a multipart/form-data body (audio transcriptions and translations), enough to meter it.

Pure. The body is forwarded as the client sent it; this only finds the form's text fields (the
model, the response format) and its file part (whose duration is what together bills).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from proxy.errors import InvalidField

_BOUNDARY_RE = re.compile(r'boundary="?([^";]{1,200})"?', re.IGNORECASE)
_NAME_RE = re.compile(rb'\bname="([^"]*)"', re.IGNORECASE)
_FILENAME_RE = re.compile(rb'\bfilename="([^"]*)"', re.IGNORECASE)
MAX_FIELD_BYTES = 4096  # a text field longer than this is not one we read


@dataclass(frozen=True, slots=True)
class FilePart:
    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, FilePart] = field(default_factory=dict)


def boundary_of(content_type: str) -> str:
    """The boundary of a multipart/form-data Content-Type, or InvalidField."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise InvalidField("This route takes a multipart/form-data body (a file and form fields).")
    found = _BOUNDARY_RE.search(content_type)
    if found is None:
        raise InvalidField("The multipart/form-data Content-Type has no boundary.")
    return found.group(1)


def parse_form(raw: bytes, content_type: str) -> Form:
    """The text fields and file parts of a multipart/form-data body; InvalidField if malformed."""
    delimiter = b"--" + boundary_of(content_type).encode("latin-1")
    parts = raw.split(delimiter)
    if len(parts) < 3 or not parts[-1].startswith(b"--"):
        raise InvalidField("The multipart/form-data body is malformed (no closing boundary).")
    form = Form()
    for part in parts[1:-1]:
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            raise InvalidField("A part of the multipart/form-data body has no header block.")
        content = content.removesuffix(b"\r\n")
        name = _NAME_RE.search(head)
        if name is None:
            continue
        key = name.group(1).decode("utf-8", "replace")
        filename = _FILENAME_RE.search(head)
        if filename is not None:
            form.files[key] = FilePart(filename.group(1).decode("utf-8", "replace"), _type_of(head), content)
        elif len(content) <= MAX_FIELD_BYTES:
            form.fields[key] = content.decode("utf-8", "replace")
    return form


def _type_of(head: bytes) -> str:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-type":
            return value.strip().decode("latin-1").lower()
    return "application/octet-stream"
