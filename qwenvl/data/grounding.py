"""Grounding: the ``objects`` field of an annotation, rendered in each model family's convention (torch-free).

An annotation (any format: the normalisers pass ``objects`` through) may carry::

    "objects": [{"label": "cat", "bbox": [x1, y1, x2, y2]}, {"label": "nose", "point": [x, y], "image": 1}]

in the dataset's ``"bbox_format"`` (dictionary key): ``pixel`` (original image pixels, the default), ``norm1000``
(0-1000 of the original image) or ``norm1`` (0-1). ``image`` is the index of the sample's image the object is on
(required when the sample has more than one image; default 0). Placeholders in the turns' text say where objects
are rendered (any turn):

* ``<bbox>`` / ``<point>``: the next object (in list order; its kind must match), consumed;
* ``<ref>``: the label of the next object (the one the following ``<bbox>``/``<point>`` renders), not consumed;
* ``<objects>``: every object in the family's answer form (Qwen2.5-VL/Qwen3-VL: a ```json list of
  ``{"bbox_2d": [...], "label": ...}`` / ``{"point_2d": [...], "label": ...}``; Qwen2-VL: ref + box tokens).

When ``<bbox>``/``<point>`` are used they must consume every object exactly once.

Conventions (:func:`convert`), computed with the resize the image gets (``smart_resize`` with the run's
``min_pixels``/``max_pixels``; at build time the processor's own grid, which is the same numbers):

=============  ===================  =========================================  ==========================================
family         convention           coordinates                                text of ``<ref>`` + ``<bbox>``
=============  ===================  =========================================  ==========================================
Qwen2-VL       ``box-tokens-1000``  0-1000 of the image                        ``<|object_ref_start|>cat<|object_ref_end|>``
                                                                               ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``
Qwen2.5-VL     ``resized-pixels``   absolute pixels of the *resized* image     ``cat`` ``[x1, y1, x2, y2]``
Qwen3-VL (+)   ``json-1000``        0-1000 of the image                        ``cat`` ``[x1, y1, x2, y2]``
=============  ===================  =========================================  ==========================================

(the family's convention is its :attr:`qwenvl.families.Family.grounding`)

Rounding (stated, tested in ``tests/test_grounding.py``): each coordinate is mapped exactly (float), then rounded
to the nearest integer with halves rounded up (``floor(v + 0.5)``; never Python's half-to-even), then clamped to
``[0, W]`` / ``[0, H]`` (resized pixels) or ``[0, 1000]``. So the right edge of the image (x = W) renders as the
resized width (Qwen2.5-VL) or 1000. Normalised grids do not depend on the resize: changing ``max_pixels`` moves
only Qwen2.5-VL coordinates.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

BBOX_FORMATS = ("pixel", "norm1000", "norm1")
_PH_RE = re.compile(r"(<ref>|<bbox>|<point>|<objects>)")
# literal boxes a Qwen2.5-VL answer text holds: "bbox_2d": [x1, y1, x2, y2]
_LITERAL_BOX = re.compile(r'"bbox_2d"\s*:\s*\[\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\]')


# the conventions (qwenvl.families.Family.grounding)
PIXELS, BOX_TOKENS, JSON_1000 = "resized-pixels", "box-tokens-1000", "json-1000"


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """``(height, width)`` of the image the model sees (the Qwen2-VL image processor's resize, same formula)."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


MAX_COORD = 1e7  # no image is ten million pixels across: a larger coordinate is a bad sample, not a clamp


def _num(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _turn_texts(rec: dict):
    """The text of each turn of an official-shaped record (``from``/``value`` or ``role``/``content``)."""
    for t in rec.get("conversations") or ():
        if type(t) is dict:
            v = t.get("content") if "role" in t and "content" in t else t.get("value")
            if type(v) is str:
                yield v


def object_problems(rec: dict, out: list, n_images: int) -> None:
    """Problems of ``rec["objects"]`` that need no image (structure, placeholders, x2 < x1, zero area), appended
    as sample-rule items ``(severity, kind, code, message, key, hint)``; errors are of kind ``bad_objects``.
    ms-swift's ``{"ref", "bbox", ...}`` dict: :func:`swift_problems`."""
    objs = rec.get("objects")
    if objs is None:
        return

    def err(code: str, message: str, hint: str, key: str = "objects") -> None:
        out.append(("error", "bad_objects", code, message, key, hint))

    if type(objs) is dict:
        return swift_problems(rec, objs, err, n_images)
    if type(objs) is not list:
        return err("objects_type", "'objects' must be a list of {\"label\", \"bbox\"|\"point\"} (or ms-swift's "
                   "{\"ref\", \"bbox\"})", 'write "objects": [{"label": "cat", "bbox": [x1, y1, x2, y2]}]')
    if not objs:
        return
    if n_images == 0:
        return err("objects_no_image", "'objects' in a sample without an image", "boxes are positions in an "
                   "image: add the image, or drop 'objects'")
    kinds = _each_object(objs, err, n_images, lambda k: f"object {k} ({objs[k]['label']!r})", "objects")
    if kinds is None:
        return
    seq = []
    for v in _turn_texts(rec):
        if "<" in v:
            seq += _PH_RE.findall(v)
    if not any(s != "<ref>" for s in seq):
        return err("objects_unplaced", f"{len(objs)} object(s) but no <bbox>, <point> or <objects> placeholder in "
                   "the text", "write <ref>/<bbox>/<point> where each object goes, or <objects> for all of them")
    taken = [s for s in seq if s in ("<bbox>", "<point>")]
    if taken:
        if len(taken) != len(kinds):
            return err("objects_count", f"{len(taken)} <bbox>/<point> placeholder(s) for {len(kinds)} object(s)",
                       "each <bbox>/<point> renders the next object, in order: one per object")
        for k, (want, got) in enumerate(zip(kinds, taken, strict=True)):
            if want != got:
                return err("objects_kind", f"placeholder {got} takes object {k}, which has a "
                           f"{'bbox' if want == '<bbox>' else 'point'}", f"write {want} for it")
    i = 0
    for s in seq:
        if s == "<ref>" and i >= len(objs):
            return err("objects_count", "a <ref> placeholder after the last object", "each <ref> names the "
                       "object the next <bbox>/<point> renders")
        if s in ("<bbox>", "<point>"):
            i += 1


def _each_object(objs: list, err, n_images: int, who, key: str) -> list[str] | None:
    """Each object's own problems (``who(k)`` names object k, ``key`` the user's key); the placeholder each takes
    (``<bbox>`` / ``<point>``), or None after an error."""
    def bad(code: str, message: str, hint: str) -> None:
        return err(code, message, hint, key)

    kinds = []
    for k, o in enumerate(objs):
        if type(o) is not dict or type(o.get("label")) is not str:
            return bad("object_shape", f"object {k} must be an object with a string 'label'",
                       '{"label": "cat", "bbox": [x1, y1, x2, y2]} or {"label": "cat", "point": [x, y]}')
        box, pt = o.get("bbox"), o.get("point")
        if (box is None) == (pt is None):
            return bad("object_shape", f"{who(k)} needs exactly one of 'bbox' and 'point'",
                       '"bbox": [x1, y1, x2, y2] or "point": [x, y]')
        if box is not None and (type(box) is not list or len(box) != 4 or not all(_num(v) for v in box)):
            return bad("object_shape", f"{who(k)}: 'bbox' must be 4 numbers [x1, y1, x2, y2]",
                       "write the box as its top-left and bottom-right corners")
        if pt is not None and (type(pt) is not list or len(pt) != 2 or not all(_num(v) for v in pt)):
            return bad("object_shape", f"{who(k)}: 'point' must be 2 numbers [x, y]", "write [x, y]")
        if o.get("bbox_format", "pixel") not in BBOX_FORMATS:
            return bad("object_shape", f"{who(k)}: unknown 'bbox_format' {o['bbox_format']!r}",
                       f"write one of {', '.join(BBOX_FORMATS)} (or drop it: the dataset's bbox_format applies)")
        far = next((v for v in (box if box is not None else pt) if abs(v) > MAX_COORD), None)
        if far is not None:  # e.g. 1e308: the conversion would overflow (the trainer crashed on it)
            return bad("object_range", f"{who(k)}: coordinate {far!r} is out of range (more than {MAX_COORD:.0e} "
                       "in size)", "write the coordinate in the dictionary's bbox_format (pixel, norm1000 or norm1)")
        img = o.get("image", 0)
        if type(img) is not int or not 0 <= img < n_images:
            return bad("object_image", f"{who(k)}: 'image' {img!r} is not an image index of this sample "
                       f"(0..{n_images - 1})", "name the 0-based index of the image the object is on")
        if n_images > 1 and "image" not in o:
            return bad("object_image", f"{who(k)} has no 'image' in a sample with {n_images} images",
                       "add \"image\": <0-based index> so the box is converted with its image's size")
        if box is not None:
            x1, y1, x2, y2 = box
            if x2 < x1 or y2 < y1:
                return bad("box_order", f"{who(k)}: box {box} has x2 < x1 or y2 < y1",
                           "write [x1, y1, x2, y2] = top-left then bottom-right (swapped corners?)")
            if x2 == x1 or y2 == y1:
                return bad("box_degenerate", f"{who(k)}: box {box} has zero width or height",
                           "a box needs an area; use \"point\" for a single position" if key == "objects" else
                           "a box needs an area; write a single position as [x, y]")
        kinds.append("<bbox>" if box is not None else "<point>")
    return kinds


# ---------------------------------------------------------------------------------------------- ms-swift
#: ms-swift's grounding "objects": {"ref": [texts], "bbox": [[x1, y1, x2, y2] | [x, y]], "bbox_type", "image_id"}
SWIFT_KEYS = ("ref", "bbox", "bbox_type", "image_id")
#: ms-swift's bbox_type -> vlsft's bbox_format (no bbox_type: the dataset's bbox_format, by default pixel = 'real')
SWIFT_BBOX_TYPES = {"real": "pixel", "norm1": "norm1"}
_SWIFT_RE = re.compile(r"(<ref-object>|<bbox>)")


class Objects(list):
    """A sample's objects in vlsft's shape; ``refs``: the texts of ms-swift's ``ref``, which its ``<ref-object>``
    placeholders take in order, independently of the boxes (None: vlsft's own placeholders)."""

    refs: list | None = None


def read_swift(d: dict) -> tuple[Objects | None, tuple[str, str, str, str] | None]:
    """ms-swift's objects dict as vlsft objects (``(objects, None)``) or ``(None, (code, message, key, hint))``.
    Each ``bbox`` item becomes an object (2 numbers: a point) on image ``image_id[k]`` (default 0), its label the
    ``ref`` of the same index (only shown); reversed corners are swapped, as ms-swift does."""
    extra = next((k for k in d if k not in SWIFT_KEYS), None)
    if extra is not None:
        return None, ("objects_type", f"'objects' is ms-swift's {{ref, bbox, bbox_type, image_id}} or vlsft's list, "
                      f"found the key {extra!r} in it", "objects", 'write [{"label": "cat", "bbox": [x1, y1, x2, y2]}] or '
                      '{"ref": ["cat"], "bbox": [[x1, y1, x2, y2]]}')
    refs, boxes, btype, ids = (d.get(k) for k in SWIFT_KEYS)
    refs, boxes, ids = refs or [], boxes or [], ids or []
    if type(refs) is not list or not all(type(r) is str for r in refs):
        return None, ("object_shape", "'objects.ref' must be a list of strings", "objects.ref",
                      'write "ref": ["cat", "dog"]: the texts the <ref-object> placeholders take, in order')
    if type(boxes) is not list:
        return None, ("object_shape", "'objects.bbox' must be a list of boxes", "objects.bbox",
                      'write "bbox": [[x1, y1, x2, y2], ...] ([x, y] for a point)')
    for k, b in enumerate(boxes):
        if type(b) is not list or len(b) not in (2, 4) or not all(_num(v) for v in b):
            return None, ("object_shape", f"'objects.bbox' item {k} must be 4 numbers [x1, y1, x2, y2] or 2 [x, y], found "
                          f"{json.dumps(b)[:60]}", "objects.bbox", "write each box as two corners, a point as [x, y]")
    if btype not in (None, "", *SWIFT_BBOX_TYPES):
        return None, ("bbox_type", f"unknown 'objects.bbox_type' {btype!r} (ms-swift reads 'real' and 'norm1')",
                      "objects.bbox_type", "'real' = pixels of the original image, 'norm1' = 0-1; for 0-1000 drop it "
                      "and set the dataset's \"bbox_format\": \"norm1000\"")
    if type(ids) is not list or not all(type(i) is int for i in ids) or (ids and len(ids) != len(boxes)):
        return None, ("object_image", f"'objects.image_id' must be a list of {len(boxes)} integers (one per bbox), found "
                      f"{json.dumps(ids)[:60]}", "objects.image_id", "name the 0-based image of each bbox, in order "
                      "(or drop image_id: every bbox is then on image 0)")
    out = Objects()
    out.refs = refs
    for k, b in enumerate(boxes):
        o: dict = {"label": refs[k] if k < len(refs) else "", "image": ids[k] if ids else 0}
        if len(b) == 4:
            o["bbox"] = [min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])]
        else:
            o["point"] = list(b)
        if btype:
            o["bbox_format"] = SWIFT_BBOX_TYPES[btype]
        out.append(o)
    return out, None


def as_objects(value: Any) -> list:
    """A record's ``objects`` as vlsft's list (ms-swift's dict mapped; an unreadable dict or value: no objects)."""
    if type(value) is dict:
        return read_swift(value)[0] or []
    return value if type(value) is list else []


def swift_problems(rec: dict, d: dict, err, n_images: int) -> None:
    """ms-swift's objects dict: its shape, each box (as vlsft's objects), ``image_id`` against the images and the
    placeholders: as many ``<ref-object>`` as ``ref`` items and ``<bbox>`` as ``bbox`` items."""
    objs, bad = read_swift(d)
    if bad is not None:
        code, message, key, hint = bad
        return err(code, message, hint, key)
    seq = [s for v in _turn_texts(rec) if "<" in v for s in _SWIFT_RE.findall(v)]
    n_ref, n_box = seq.count("<ref-object>"), seq.count("<bbox>")
    if objs or objs.refs:  # (none: a text-only row of a dataset with an objects column, {"ref": [], "bbox": []})
        if n_images == 0:
            return err("objects_no_image", "'objects' in a sample without an image", "boxes are positions in an "
                       "image: add the image, or drop 'objects'")
        far = next((o["image"] for o in objs if not 0 <= o["image"] < n_images), None)
        if far is not None:
            return err("object_image", f"'objects.image_id' {far} is not an image index of this sample "
                       f"(0..{n_images - 1})", "name the 0-based index of the image each bbox is on", "objects.image_id")
        if _each_object(objs, err, n_images, lambda k: f"'objects.bbox' item {k}", "objects.bbox") is None:
            return
    if n_ref != len(objs.refs):
        return err("objects_count", f"'objects.ref' has {len(objs.refs)} item(s) for {n_ref} <ref-object> placeholder(s)",
                   "each <ref-object> takes the next 'ref', in order: one per ref", "objects.ref")
    if n_box != len(objs):
        return err("objects_count", f"'objects.bbox' has {len(objs)} item(s) for {n_box} <bbox> placeholder(s)",
                   "each <bbox> takes the next 'bbox', in order: one per bbox", "objects.bbox")


def _half_up(v: float) -> int:
    return int(math.floor(v + 0.5))


def convert(values: list, orig: tuple[int, int], resized: tuple[int, int], bbox_format: str,
            convention: str) -> list[int]:
    """Coordinates ``[x, y, ...]`` given in ``bbox_format`` on an image of ``orig`` = (width, height) as the
    family's integers (``resized`` = (width, height) the model sees). Rounding: see the module docstring."""
    ow, oh = orig
    rw, rh = resized
    out = []
    for j, v in enumerate(values):
        size = ow if j % 2 == 0 else oh
        top = (rw if j % 2 == 0 else rh) if convention == PIXELS else 1000
        # multiply before dividing: 5 px of 2000 -> 5 * 1000 / 2000 = 2.5 exactly (then half up: 3)
        exact = v * top / size if bbox_format == "pixel" else v * top / 1000 if bbox_format == "norm1000" else v * top
        out.append(min(max(_half_up(exact), 0), top))
    return out


def _box_text(vals: list[int], convention: str) -> str:
    if convention == BOX_TOKENS:
        pairs = ",".join(f"({vals[i]},{vals[i + 1]})" for i in range(0, len(vals), 2))
        return f"<|box_start|>{pairs}<|box_end|>"
    return "[" + ", ".join(str(v) for v in vals) + "]"


def _ref_text(label: str, convention: str) -> str:
    return f"<|object_ref_start|>{label}<|object_ref_end|>" if convention == BOX_TOKENS else label


def rendered_objects(objs: list | dict, sizes: list[tuple[tuple[int, int], tuple[int, int]]], bbox_format: str,
                     convention: str) -> Objects:
    """Each object with its family's coordinates: ``{"label", "kind" ("bbox"|"point"), "image", "values"}``.
    ``sizes[k]`` = ((orig w, h), (resized w, h)) of image k; an object's own ``bbox_format`` (ms-swift's
    ``bbox_type``) before the dataset's. ms-swift's objects keep their ``refs`` (for :func:`render_texts`)."""
    objs = as_objects(objs)
    out = Objects()
    out.refs = getattr(objs, "refs", None)
    for o in objs:
        kind = "bbox" if o.get("bbox") is not None else "point"
        img = o.get("image", 0)
        orig, resized = sizes[img]
        out.append({"label": o["label"], "kind": kind, "image": img,
                    "values": convert(o[kind], orig, resized, o.get("bbox_format", bbox_format), convention)})
    return out


def answer_form(rendered: list[dict], convention: str) -> str:
    """Every object in the family's own answer form (the ``<objects>`` placeholder)."""
    if convention == BOX_TOKENS:
        return "".join(_ref_text(r["label"], convention) + _box_text(r["values"], convention) for r in rendered)
    rows = []
    for r in rendered:
        key = "bbox_2d" if r["kind"] == "bbox" else "point_2d"
        rows.append("  " + json.dumps({key: r["values"], "label": r["label"]}, ensure_ascii=False))
    return "```json\n[\n" + ",\n".join(rows) + "\n]\n```"


def render_texts(texts: list[str], rendered: list[dict], convention: str) -> list[str]:
    """The turns' texts with their placeholders replaced (objects checked by :func:`object_problems`); ms-swift's
    objects (``rendered.refs`` set): ``<ref-object>`` takes the next ref, ``<bbox>`` the next box or point."""
    refs = getattr(rendered, "refs", None)
    if refs is not None:
        return _render_swift(texts, rendered, refs, convention)
    state = {"i": 0}
    form = None

    def sub(m: re.Match) -> str:
        nonlocal form
        tag = m.group(0)
        i = state["i"]
        if tag == "<objects>":
            if form is None:
                form = answer_form(rendered, convention)
            return form
        if tag == "<ref>":
            return _ref_text(rendered[i]["label"], convention)
        state["i"] = i + 1
        return _box_text(rendered[i]["values"], convention)

    return [_PH_RE.sub(sub, t) if "<" in t else t for t in texts]


def _render_swift(texts: list[str], rendered: list[dict], refs: list[str], convention: str) -> list[str]:
    """ms-swift's placeholders, each kind taken in its own order (a placeholder past the last item stays text, as
    in ms-swift; the checks refuse such samples)."""
    at = {"<ref-object>": 0, "<bbox>": 0}

    def sub(m: re.Match) -> str:
        tag = m.group(0)
        i = at[tag]
        items = refs if tag == "<ref-object>" else rendered
        if i >= len(items):
            return tag
        at[tag] = i + 1
        return _ref_text(refs[i], convention) if tag == "<ref-object>" else _box_text(rendered[i]["values"], convention)

    return [_SWIFT_RE.sub(sub, t) if "<" in t else t for t in texts]


# ---------------------------------------------------------------------------------------------- deep check
def image_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the image file's header (PIL opens lazily: no decoding); None when unreadable."""
    try:
        from PIL import Image

        from qwenvl import storage

        if storage.is_url(path):
            import io

            with Image.open(io.BytesIO(storage.read_bytes(path))) as im:
                return im.size
        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001 - the media checks report unreadable files
        return None


def check_sample(rec: dict, sizes: list[tuple[int, int] | None], bbox_format: str, min_pixels: int,
                 max_pixels: int, factor: int = 28) -> tuple[list[tuple[str, str, str, str]], dict]:
    """Deep checks of one sample's boxes with its images' header sizes: ``([(severity, code, message, hint)],
    counts)``; counts = boxes, rescaled (Qwen2.5-VL coordinates differ from the given ones), suspicious."""
    out: list[tuple[str, str, str, str]] = []
    counts = {"boxes": 0, "rescaled": 0, "suspicious": 0}
    objs = as_objects(rec.get("objects"))
    swift = getattr(objs, "refs", None) is not None
    resized_of = {}
    for k, s in enumerate(sizes):
        if s is not None:
            h, w = smart_resize(s[1], s[0], factor, min_pixels, max_pixels)
            resized_of[k] = (w, h)
    for k, o in enumerate(objs):
        if type(o) is not dict:
            continue
        vals = o.get("bbox") if o.get("bbox") is not None else o.get("point")
        if type(vals) is not list or not all(_num(v) for v in vals):
            continue
        counts["boxes"] += 1
        img = o.get("image", 0)
        size = sizes[img] if type(img) is int and 0 <= img < len(sizes) else None
        if size is None:
            continue
        fmt = o.get("bbox_format", bbox_format)
        found = _box_warnings(f"'objects.bbox' item {k}" if swift else f"object {k} ({o.get('label')!r})", vals, size, fmt, swift)
        out += found
        resized = resized_of.get(img if type(img) is int else 0)
        if resized is not None and (fmt != "pixel" or resized != size):
            counts["rescaled"] += 1
        counts["suspicious"] += bool(found)
    # boxes written literally in the answer text (Qwen2.5-VL: pixels of the resized image)
    resized0 = resized_of.get(0)
    if resized0 is not None:
        rw, rh = resized0
        for t in rec.get("conversations") or ():
            if type(t) is not dict:
                continue
            v = t.get("content") if "role" in t and "content" in t else t.get("value")
            if type(v) is not str or "bbox_2d" not in v:
                continue
            for m in _LITERAL_BOX.finditer(v):
                try:
                    x1, y1, x2, y2 = (float(g) for g in m.groups())
                except ValueError:
                    continue
                counts["boxes"] += 1
                if max(x1, x2) > rw or max(y1, y2) > rh:
                    counts["suspicious"] += 1
                    box = [g for g in m.groups()]
                    out.append(("warning", "answer_box_outside", f"the answer's bbox_2d [{', '.join(box)}] exceeds the "
                                f"{rw}x{rh} image Qwen2.5-VL sees (max_pixels {max_pixels})", "Qwen2.5-VL boxes are "
                                "pixels of the resized image: use 'objects' with <bbox>/<objects> so vlsft rescales "
                                "them (0-1000 would be right for Qwen3-VL)"))
                    break
    return out, counts


def _box_warnings(who: str, vals: list, size: tuple[int, int], fmt: str, swift: bool) -> list[tuple]:
    """The deep check's warnings about one box / point given in ``fmt`` on an image of ``size`` (``swift``: the
    hints name ms-swift's ``bbox_type``)."""
    w, h = size
    out = []
    said = ("bbox_type " + {"pixel": "real"}.get(fmt, fmt)) if swift else f"bbox_format {fmt}"
    norm1 = '"bbox_type": "norm1" in objects' if swift else '"bbox_format": "norm1"'
    norm1000 = 'drop bbox_type and set the dataset\'s "bbox_format": "norm1000"' if swift else \
        'set "bbox_format": "norm1000"'
    lim = (w, h) if fmt == "pixel" else (1000, 1000) if fmt == "norm1000" else (1, 1)
    if any(v < 0 or v > lim[j % 2] for j, v in enumerate(vals)):
        what = f"the {w}x{h} image" if fmt == "pixel" else f"the {fmt} range"
        hint = "check the coordinates and " + ("'bbox_type'" if swift else "the dataset's \"bbox_format\"")
        if fmt == "pixel" and max(vals) <= 1000 and max(w, h) < 1000:
            hint = "these look like 0-1000 coordinates: " + norm1000
        out.append(("warning", "box_outside", f"{who}: {vals} lies outside {what} (it is clamped to the edge)", hint))
    if fmt == "pixel" and max(vals) <= 1 and max(w, h) > 1:
        out.append(("warning", "box_convention", f"{who}: {vals} are all <= 1 with {said}",
                    "these look like 0-1 coordinates: set " + norm1))
    elif fmt == "norm1" and max(vals) > 1:
        out.append(("warning", "box_convention", f"{who}: {vals} exceed 1 with {said}",
                    ("drop 'bbox_type' (pixels)" if swift else 'set "bbox_format": "pixel" or "norm1000"') +
                    " to match the data"))
    return out


# ---------------------------------------------------------------------------------------------- preview
def to_resized_pixels(values: list[int], resized: tuple[int, int], convention: str) -> list[float]:
    """A family's coordinates back on the resized image (what ``preview --draw`` draws: the model's reading)."""
    if convention == PIXELS:
        return [float(v) for v in values]
    rw, rh = resized
    return [v / 1000.0 * (rw if j % 2 == 0 else rh) for j, v in enumerate(values)]


def preview_objects(internal: dict, images: list, grids: list, patch_size: int, bbox_format: str,
                    model_type: str) -> tuple[list[dict], list[tuple[tuple[int, int], tuple[int, int]]]]:
    """``(rendered objects, sizes)`` of a built sample for ``vlsft datasets preview``: ``images`` are the opened
    PIL images (as the builder opens them), ``grids`` their ``image_grid_thw`` rows."""
    sizes = [(im.size, (int(g[2]) * patch_size, int(g[1]) * patch_size)) for im, g in zip(images, grids, strict=True)]
    objs = internal.get("objects") or []
    from qwenvl.families import family

    return rendered_objects(objs, sizes, bbox_format, family(model_type).grounding), sizes


def draw(images: list, sizes: list, rendered: list[dict], convention: str, out_path: str) -> None:
    """The images as the model sees them (resized, side by side) with each object drawn in red: a box outline
    (2 px) or a point (a filled dot), from the family's own coordinates. Writes a PNG to ``out_path``."""
    from PIL import Image, ImageDraw

    resized = [im.resize(rs, Image.Resampling.BICUBIC) for im, (_, rs) in zip(images, sizes, strict=True)]
    width = sum(r.size[0] for r in resized) + 8 * (len(resized) - 1)
    canvas = Image.new("RGB", (width, max(r.size[1] for r in resized)), (255, 255, 255))
    offsets, x = [], 0
    for r in resized:
        canvas.paste(r, (x, 0))
        offsets.append(x)
        x += r.size[0] + 8
    pen = ImageDraw.Draw(canvas)
    for obj in rendered:
        k = obj["image"]
        vals = to_resized_pixels(obj["values"], sizes[k][1], convention)
        dx = offsets[k]
        if obj["kind"] == "bbox":
            x1, y1, x2, y2 = vals
            pen.rectangle([dx + x1, y1, dx + x2 - 1, y2 - 1], outline=(255, 0, 0), width=2)
        else:
            px, py = vals
            pen.ellipse([dx + px - 3, py - 3, dx + px + 3, py + 3], fill=(255, 0, 0))
    canvas.save(out_path, format="PNG")


# ---------------------------------------------------------------------------------------------- predictions
_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_PAIR_BOX = re.compile(rf"\({_NUM},{_NUM}\)\s*,\s*\({_NUM},{_NUM}\)")  # Qwen2-VL (x1,y1),(x2,y2)
_JSON_BOX = re.compile(rf'"bbox_2d"\s*:\s*\[{_NUM},{_NUM},{_NUM},{_NUM}\]')
_BARE_BOX = re.compile(rf"\[{_NUM},{_NUM},{_NUM},{_NUM}\]")


def parse_boxes(text: str, convention: str) -> list[list[float]]:
    """The boxes of a generated answer, in the family's own numbers: Qwen2-VL ``(x1,y1),(x2,y2)`` (with or without
    the box tokens), else ``"bbox_2d": [...]`` entries, else bare ``[x1, y1, x2, y2]`` lists."""
    if convention == BOX_TOKENS:
        found = _PAIR_BOX.findall(text)
    else:
        found = _JSON_BOX.findall(text) or _BARE_BOX.findall(text)
    return [[float(v) for v in m] for m in found]


def to_original(values: list[float], orig: tuple[int, int], resized: tuple[int, int], convention: str) -> list[float]:
    """A family's coordinates mapped back to original-image pixels (the inverse of :func:`convert`, unrounded)."""
    ow, oh = orig
    rw, rh = resized
    if convention == PIXELS:
        return [v * (ow / rw if j % 2 == 0 else oh / rh) for j, v in enumerate(values)]
    return [v / 1000.0 * (ow if j % 2 == 0 else oh) for j, v in enumerate(values)]


def to_pixels(values: list[float], orig: tuple[int, int], bbox_format: str) -> list[float]:
    """Annotation coordinates in ``bbox_format`` as original-image pixels."""
    if bbox_format == "pixel":
        return [float(v) for v in values]
    scale = 1000.0 if bbox_format == "norm1000" else 1.0
    return [v / scale * (orig[0] if j % 2 == 0 else orig[1]) for j, v in enumerate(values)]


def iou(a: list[float], b: list[float]) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes (0 for empty or disjoint boxes)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_ious(references: list[list[float]], predictions: list[list[float]]) -> list[float]:
    """Per reference box, the IoU of the prediction it is matched to (greedy by IoU, each prediction used once;
    0 when none is left): the basis of IoU@0.5 and mean IoU."""
    pairs = sorted(((iou(r, p), i, j) for i, r in enumerate(references) for j, p in enumerate(predictions)),
                   reverse=True)
    best = [0.0] * len(references)
    used_r: set = set()
    used_p: set = set()
    for v, i, j in pairs:
        if i in used_r or j in used_p or v <= 0:
            continue
        best[i] = v
        used_r.add(i)
        used_p.add(j)
    return best


def grounding_metrics(per_box_ious: list[float]) -> dict:
    """``{"boxes", "iou@0.5", "mean_iou"}`` over every reference box of a dataset."""
    n = len(per_box_ious)
    return {"boxes": n, "iou@0.5": round(sum(v >= 0.5 for v in per_box_ious) / n, 4) if n else 0.0,
            "mean_iou": round(sum(per_box_ious) / n, 4) if n else 0.0}


class PredictGrounding:
    """Grounding for ``vlsft predict``: the prompt and reference rendered in the model's convention (with the resize
    its saved processor applies, sizes from image headers) and IoU of the predicted boxes against the ``objects``
    (both in original-image pixels; each sample's predictions are mapped back with its first object's image)."""

    def __init__(self, convention: str, bbox_format: str, min_pixels: int, max_pixels: int, factor: int):
        self.convention, self.bbox_format = convention, bbox_format
        self.min_pixels, self.max_pixels, self.factor = min_pixels, max_pixels, factor

    @classmethod
    def for_model(cls, folder, bbox_format: str | None) -> PredictGrounding:
        from pathlib import Path

        folder = Path(folder)
        from qwenvl.families import family_at

        convention = family_at(folder).grounding
        pre = {}
        if (folder / "preprocessor_config.json").is_file():
            pre = json.loads((folder / "preprocessor_config.json").read_text(encoding="utf-8"))
        size = pre.get("size") or {}
        lo = int(size.get("shortest_edge") or pre.get("min_pixels") or 56 * 56)
        hi = int(size.get("longest_edge") or pre.get("max_pixels") or 28 * 28 * 16384)
        factor = int(pre.get("patch_size") or 14) * int(pre.get("merge_size") or 2)
        return cls(convention, bbox_format or "pixel", lo, hi, factor)

    def _sizes(self, image_paths: list[str]) -> list[tuple[tuple[int, int], tuple[int, int]]] | None:
        out = []
        for p in image_paths:
            s = image_size(p)
            if s is None:
                return None
            h, w = smart_resize(s[1], s[0], self.factor, self.min_pixels, self.max_pixels)
            out.append((s, (w, h)))
        return out

    def render(self, conv: list[dict], internal: dict, image_paths: list[str]) -> None:
        """Render the placeholders of ``conv`` (``{"role", "content"}`` turns) in place."""
        sizes = self._sizes(image_paths)
        objs = as_objects(internal.get("objects"))
        if not sizes or not (objs or getattr(objs, "refs", None)):
            return
        rendered = rendered_objects(objs, sizes, self.bbox_format, self.convention)
        texts = render_texts([str(t.get("content") or "") for t in conv], rendered, self.convention)
        for t, text in zip(conv, texts, strict=True):
            t["content"] = text

    def ious(self, internal: dict, image_paths: list[str], prediction: str) -> list[float] | None:
        """Per reference box of the sample, the IoU of its matched predicted box (None: no boxes to score)."""
        objs = [o for o in as_objects(internal.get("objects")) if type(o) is dict and o.get("bbox") is not None]
        sizes = self._sizes(image_paths) if objs else None
        if not objs or not sizes:
            return None
        refs = [to_pixels(o["bbox"], sizes[o.get("image", 0)][0], o.get("bbox_format", self.bbox_format)) for o in objs]
        orig, resized = sizes[objs[0].get("image", 0)]
        preds = [to_original(b, orig, resized, self.convention) for b in parse_boxes(prediction, self.convention)]
        return match_ious(refs, preds)
