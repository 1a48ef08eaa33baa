"""Input readers for `pargo-dist convert`: raw files -> records -> validated MDS samples.

The work is split in two on purpose:

* `read_records` runs in the converter's parent process. It only *reads*: JSON Lines as raw
  byte lines, JSON arrays as items, parquet rows, webdataset tar groups. It never parses a
  line or decodes an image, so it cannot fail on one bad sample, and it streams (parquet in
  row batches, tar member by member) so a 100 GB input never sits in memory.
* `process_record` runs in the worker processes (or inline with one worker). It parses,
  loads the image (from the image root, base64, raw bytes or the tar member), decodes it
  fully with PIL, optionally resizes it, and builds the sample with `schema.make_sample`.
  Anything wrong with *one* sample becomes a `BadSample` with a countable reason, returned
  as a report entry rather than raised, so one sample can never stop a conversion.

Whole-input problems (a missing file, an unknown format, a JSON file that does not parse)
are raised at once with the file named: they are the user's to fix, not a sample to skip.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import tarfile
from dataclasses import dataclass
from typing import Any, Iterator

from PIL import Image

from pargo_dist.data.schema import IMAGE_MARKER, BadSample, make_sample, place_image_marker
from pargo_dist.errors import UserError

FORMATS = ("jsonl", "json", "parquet", "tar")
FORMAT_ALIASES = {"llava": "json", "webdataset": "tar", "wds": "tar", "ndjson": "jsonl"}

# Record keys, in order of preference.
IMAGE_PATH_KEYS = ("image", "image_path", "file_name", "path")
IMAGE_BYTES_KEYS = ("image_bytes", "image_base64")
CAPTION_KEYS = ("caption", "text", "description")
CONVERSATION_KEYS = ("conversations", "messages")

# webdataset member extensions (lower case) that hold an image.
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

PARQUET_BATCH = 256  # rows read at once: bounded memory with large image columns


class InputNotFoundError(FileNotFoundError, UserError):
    """An input file that is not there (a UserError: the CLI prints it as one line)."""


class InputFormatError(UserError):
    """A whole input that cannot be read (unknown format, unparsable JSON array...)."""


@dataclass(frozen=True)
class RawRecord:
    """One unparsed record and where it came from (pickled to the workers).

    kind:    how to parse `payload`: "jsonl" (bytes of one line), "json" (a parsed item),
             "parquet" (a row dict), "tar" (dict extension -> member bytes), "error" (the
             input broke off here; payload is the error text).
    source:  the input path as given (for the report).
    label:   the input's short name used in ids (its basename unless two inputs share one).
    line:    1-based line number (jsonl), 0-based item / row index (json / parquet), or the
             tar key.
    root:    directory that relative image paths are resolved against.
    """

    kind: str
    source: str
    label: str
    line: int | str
    root: str
    payload: Any

    @property
    def default_id(self) -> str:
        return f"{self.label}:{self.line}"


# --------------------------------------------------------------------------- format detection


def detect_format(path: str, requested: str = "auto") -> str:
    """The input's format: `requested` if given, else from the extension, else from content.

    A `.json` file starting with "{" whose first line is a whole JSON object is JSON Lines
    under the wrong extension (common in the wild) and is read as such.
    """
    if not os.path.exists(path):
        raise InputNotFoundError(f"input file not found: {path}")
    if os.path.isdir(path):
        raise InputFormatError(f"input is a directory, not a file: {path} (list its files instead)")
    fmt = FORMAT_ALIASES.get(requested, requested)
    if fmt != "auto":
        if fmt not in FORMATS:
            raise InputFormatError(f"unknown input format {requested!r} for {path}; "
                                   f"choose one of auto, {', '.join(FORMATS)}")
        return fmt
    name = path.lower()
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar"
    if name.endswith(".json"):
        return _sniff_json(path) or "json"
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PAR1"):
        return "parquet"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    sniffed = _sniff_json(path)
    if sniffed:
        return sniffed
    raise InputFormatError(f"cannot tell the format of {path} from its name or content; "
                           f"pass --format ({', '.join(FORMATS)})")


def _sniff_json(path: str) -> str | None:
    """"json" for a file starting with "[", "jsonl" for one whose first line is an object."""
    with open(path, "rb") as f:
        first = f.readline(1 << 20)
        while first and not first.strip():
            first = f.readline(1 << 20)
    stripped = first.lstrip(b"\xef\xbb\xbf \t\r\n")
    if stripped.startswith(b"["):
        return "json"
    if stripped.startswith(b"{"):
        try:
            return "jsonl" if isinstance(json.loads(stripped), dict) else None
        except ValueError:
            return "json"  # a pretty-printed single object: the JSON reader explains the error
    return None


# --------------------------------------------------------------------------- reading (parent)


def read_records(path: str, fmt: str, label: str, root: str) -> Iterator[RawRecord]:
    """Stream the raw records of one input. Raises only for a whole input that is unreadable
    from the start; an input that breaks off later yields one "error" record and stops."""
    readers = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "tar": _read_tar}
    it = readers[fmt](path)
    line: int | str | None = None
    while True:
        try:
            kind, line, payload = next(it)
        except StopIteration:
            return
        except InputFormatError:
            raise
        except Exception as err:  # the file broke off mid-way (truncated tar, bad row group...)
            if line is None:
                raise InputFormatError(f"cannot read {path} as {fmt}: {type(err).__name__}: {err}") from err
            yield RawRecord("error", path, label, f"after {line}", root, f"{type(err).__name__}: {err}")
            return
        yield RawRecord(kind, path, label, line, root, payload)


def _read_jsonl(path: str):
    with open(path, "rb") as f:  # bytes: a bad encoding is one bad line, not a crash here
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield "jsonl", lineno, raw


def _read_json(path: str):
    try:
        with open(path, "rb") as f:
            items = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise InputFormatError(f"{path} is not valid JSON ({err}); a .json input must hold one list "
                               f"of records (one object per line belongs in a .jsonl file)") from err
    if not isinstance(items, list):
        raise InputFormatError(f"{path} holds a JSON {type(items).__name__}, expected a list of records")
    for index, item in enumerate(items):
        yield "json", index, item


def _read_parquet(path: str):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:
        raise InputFormatError(f"cannot open {path} as parquet: {err}") from err
    index = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH):
        for row in batch.to_pylist():
            yield "parquet", index, row
            index += 1


def _tar_key(name: str) -> tuple[str, str]:
    """webdataset naming: "dir/000123.seg.jpg" -> key "dir/000123", extension "seg.jpg"."""
    head, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _read_tar(path: str):
    """Group consecutive members sharing a key (webdataset's contract: a sample's files are
    adjacent). Streamed: members are read in order, never the whole archive at once."""
    try:
        tar = tarfile.open(path, mode="r|*")
    except (tarfile.TarError, OSError) as err:
        raise InputFormatError(f"cannot open {path} as a tar archive: {err}") from err
    with tar:
        key, files = None, {}
        for member in tar:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            if base.startswith("."):  # macOS "._x.jpg" resource forks and other hidden files
                continue
            k, ext = _tar_key(member.name)
            if k != key and files:
                yield "tar", key, files
                files = {}
            key = k
            f = tar.extractfile(member)
            files[ext] = f.read() if f is not None else b""
        if files:
            yield "tar", key, files


# --------------------------------------------------------------------------- processing (workers)


def process_record(rec: RawRecord, max_side: int | None) -> tuple[dict | None, dict | None]:
    """-> (sample, None) for a good record, (None, report entry) for a bad one. Never raises
    for a bad sample: every failure is reported with a reason and the record's place."""
    sample_id = rec.default_id
    try:
        if rec.kind == "error":
            raise BadSample("truncated_input", f"the input broke off: {rec.payload}")
        if rec.kind == "tar":
            record, sample_id = _tar_record(rec)
        else:
            record = rec.payload
            if rec.kind == "jsonl":
                try:
                    record = json.loads(rec.payload)
                except (ValueError, UnicodeDecodeError) as err:
                    raise BadSample("malformed_json", str(err)) from None
            if not isinstance(record, dict):
                raise BadSample("malformed", f"record is a {type(record).__name__}, not an object")
            sample_id = _record_id(record, sample_id)
        return _sample(record, sample_id, rec, max_side), None
    except BadSample as bad:
        detail = str(bad)
        if detail.startswith(bad.reason + ": "):
            detail = detail[len(bad.reason) + 2:]
        return None, {"id": sample_id, "source": rec.source, "line": rec.line,
                      "reason": bad.reason, "detail": detail if detail != bad.reason else ""}


def _record_id(record: dict, default: str) -> str:
    value = record.get("id")
    return str(value) if value not in (None, "") else default


def _tar_record(rec: RawRecord) -> tuple[dict, str]:
    """A tar group -> a caption/conversation record with the image bytes in it."""
    files: dict[str, bytes] = rec.payload
    images = [ext for ext in files if ext in TAR_IMAGE_EXTS]
    record: dict[str, Any] = {}
    sample_id = rec.default_id
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except (ValueError, UnicodeDecodeError) as err:
            raise BadSample("malformed_json", f"{rec.line}.json: {err}") from None
        if not isinstance(meta, dict):
            raise BadSample("malformed", f"{rec.line}.json is a {type(meta).__name__}, not an object")
        sample_id = _record_id(meta, sample_id)
        record = {k: v for k, v in meta.items() if k not in IMAGE_PATH_KEYS + IMAGE_BYTES_KEYS}
    has_text = any(k in record for k in CAPTION_KEYS + CONVERSATION_KEYS)
    if not has_text and "txt" in files:
        try:
            record["caption"] = files["txt"].decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadSample("malformed", f"{rec.line}.txt is not UTF-8: {err}") from None
    if len(images) > 1:
        raise BadSample("several_images", f"members {', '.join(images)}; one image per sample")
    if images:
        record["image_bytes"] = files[images[0]]
    elif not any(k in record for k in CONVERSATION_KEYS):
        raise BadSample("missing_image", f"no image member among {sorted(files)}")
    return record, sample_id


def _first(record: dict, keys: tuple[str, ...]) -> tuple[str | None, Any]:
    for key in keys:
        if record.get(key) is not None:
            return key, record[key]
    return None, None


def _sample(record: dict, sample_id: str, rec: RawRecord, max_side: int | None) -> dict:
    """Validate text first (cheap), then load and fully decode the image."""
    conv_key, turns = _first(record, CONVERSATION_KEYS)
    if conv_key is not None:
        if isinstance(turns, str):  # parquet / CSV exports often store the list as a JSON string
            try:
                turns = json.loads(turns)
            except ValueError as err:
                raise BadSample("malformed_conversation", f"{conv_key} is not JSON: {err}") from None
        caption, messages = None, turns
    else:
        _, caption = _first(record, CAPTION_KEYS)
        if caption is None:
            raise BadSample("no_text", f"no caption ({'/'.join(CAPTION_KEYS)}) or conversations field")
        if not isinstance(caption, str):
            raise BadSample("malformed", f"caption is a {type(caption).__name__}, not a string")
        messages = None

    image = _load_image(record, rec)
    if image is None and messages is None:
        raise BadSample("no_image", f"caption record without an image field "
                        f"({'/'.join(IMAGE_PATH_KEYS + IMAGE_BYTES_KEYS)})")
    sample = make_sample(sample_id, image, caption=caption, messages=messages)  # text checks
    _check_marker(sample, image is not None)
    if image is not None:
        sample["image"] = check_image(image, max_side)
    return sample


def _check_marker(sample: dict, has_image: bool) -> None:
    """Enforce now what the training prompt builder would reject later: at most one image
    marker, none without an image; an image without one gets it in the first user turn."""
    if sample["caption"]:
        if IMAGE_MARKER in sample["caption"]:
            raise BadSample("marker_in_caption", f"the caption contains {IMAGE_MARKER}")
        return
    sample["messages"] = place_image_marker(sample["messages"], has_image)


def _load_image(record: dict, rec: RawRecord) -> bytes | None:
    """The record's encoded image bytes, or None when it has no image field at all."""
    for key in IMAGE_BYTES_KEYS + IMAGE_PATH_KEYS:
        value = record.get(key)
        if value is None:
            continue
        if isinstance(value, dict):  # HF datasets parquet: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
            if value is None:
                continue
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        if isinstance(value, list):
            raise BadSample("several_images", f"{key} holds {len(value)} images; one image per sample")
        if not isinstance(value, str):
            raise BadSample("malformed", f"{key} is a {type(value).__name__}")
        if key in IMAGE_BYTES_KEYS:
            try:
                return base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError) as err:
                raise BadSample("bad_image", f"{key} is not valid base64: {err}") from None
        if not value.strip():
            raise BadSample("missing_image", f"empty {key}")
        path = os.path.join(rec.root, value)  # an absolute `value` wins over the root
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise BadSample("missing_image", f"no file {path}") from None
        except OSError as err:
            raise BadSample("unreadable_image", f"{path}: {err}") from None
    return None


def check_image(data: bytes, max_side: int | None) -> bytes:
    """Fully decode `data` (so truncated or corrupt files are caught here, not in training);
    return it untouched, or resized to `max_side` and re-encoded when larger.

    EXIF orientation is not applied: the training decoder ignores it too, so the pixels the
    model sees are the same whether or not the image was resized here.
    """
    if not data:
        raise BadSample("bad_image", "empty image data")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if not img.width or not img.height:
                raise BadSample("bad_image", f"empty image {img.size}")
            if max_side and max(img.size) > max_side:
                return _resize(img, max_side)
    except BadSample:
        raise
    except Exception as err:  # PIL raises many types for bad data (OSError, SyntaxError, ...)
        raise BadSample("bad_image", f"{type(err).__name__}: {err}") from None
    return data


def _resize(img: Image.Image, max_side: int) -> bytes:
    """Keep the aspect ratio, longest side exactly `max_side`; JPEG q95 for JPEG sources (no
    generation of lossless bloat), PNG for everything else (no new lossy artefacts)."""
    fmt = img.format
    w, h = img.size
    size = (max_side, max(1, round(h * max_side / w))) if w >= h else (max(1, round(w * max_side / h)), max_side)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "1":
        img = img.convert("L")
    elif img.mode not in ("L", "LA", "RGB", "RGBA", "CMYK", "I", "F", "I;16"):
        img = img.convert("RGBA" if "A" in img.mode else "RGB")
    img = img.resize(size, Image.LANCZOS)
    buf = io.BytesIO()
    if fmt == "JPEG" and img.mode in ("L", "RGB", "CMYK"):
        img.save(buf, format="JPEG", quality=95)
    else:
        if img.mode not in ("L", "LA", "RGB", "RGBA", "I", "I;16"):
            img = img.convert("RGB")
        img.save(buf, format="PNG")
    return buf.getvalue()
