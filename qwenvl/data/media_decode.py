"""``vlsft datasets check --deep --decode``: open every image and video header, in parallel (torch-free).

What the trainer would trip over, found before it starts: zero-byte files, files that are not images /
videos or are corrupt, truncated images (PIL ``verify`` checks the PNG/GIF chunk structure and CRCs; a
JPEG must end with its end-of-image marker), images above PIL's decompression-bomb limit
(``PIL.Image.MAX_IMAGE_PIXELS``: the trainer refuses them), and videos whose header gives no frames or no
frame rate (decord, else PyAV: frame count and duration from the container, no frame decoded); a video given as
a folder of frames has each of its frame images opened.

PIL, decord and PyAV are imported only here and only when ``--decode`` is given. The files are shared out
to a pool of forked processes, one per CPU (``VLSFT_CHECK_WORKERS`` overrides). Local files only: media on
object storage or web servers are checked for existence, not decoded.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable

BATCH = 32  # files per unit of work (and per progress update)


def _image_problem(path: str) -> str | None:
    import io

    from PIL import Image

    if path[:5] == "data:":  # an inline base64 image: its bytes, decoded in memory (as the trainer does)
        from qwenvl.data.sample_rules import data_url_bytes

        data, why = data_url_bytes(path)
        if data is None:
            return None  # not base64 media at all: the sample rule already reported it (one line per sample)
        head, size, tail, src = data[:4], len(data), data[-2:], io.BytesIO(data)
    else:
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size >= 2:
                f.seek(-2, os.SEEK_END)
            tail = f.read(2)
        src = path
    if size == 0:
        return "an empty file (0 bytes)"
    try:
        with Image.open(src) as im:
            w, h = im.size
            fmt = im.format
            limit = Image.MAX_IMAGE_PIXELS
            if limit and w * h > limit:
                return (f"over PIL's decompression-bomb limit of {limit:,} pixels (Image.MAX_IMAGE_PIXELS): "
                        f"{w}x{h} = {w * h:,}")
            im.verify()
        if fmt not in ("PNG", "JPEG"):  # verify() checks PNG's chunks (JPEG: the end marker, below); for GIF, BMP,
            if not isinstance(src, str):  # TIFF, WebP ... it reads headers only: decode the pixels, as the trainer
                src.seek(0)
            with Image.open(src) as im:
                im.load()
    except Exception as e:  # PIL raises many types for corrupt files
        if type(e).__name__ == "DecompressionBombError":  # above twice the limit PIL refuses to open it
            import re

            got = re.search(r"\((\d+) pixels\)", str(e))
            return (f"over PIL's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,} pixels "
                    f"(Image.MAX_IMAGE_PIXELS)" + (f": {int(got.group(1)):,}" if got else ""))
        return f"not a readable image ({type(e).__name__}: {e})"
    if fmt == "JPEG" and head[:2] == b"\xff\xd8" and tail != b"\xff\xd9":
        return "a truncated JPEG (no end-of-image marker): the file was cut short"
    return None


def _frames_problem(folder: str) -> str | None:
    """A video given as a folder of frames: its frame images (:func:`qwenvl.data.media_exist.frame_files`), each
    opened as an image."""
    from qwenvl.data.media_exist import frame_files

    paths, why = frame_files(folder)
    if why is not None:
        return why
    for p in paths:
        bad = _image_problem(p)
        if bad is not None:
            return f"a folder of frames whose frame {os.path.basename(p)} is {bad}"
    return None


def _video_problem(path: str) -> str | None:
    import io

    from qwenvl.data.media_exist import is_frame_folder

    if path[:5] != "data:" and is_frame_folder(path):
        return _frames_problem(path)
    src = path
    if path[:5] == "data:":  # inline base64 bytes: decoded in memory (as the trainer does)
        from qwenvl.data.sample_rules import data_url_bytes

        data, why = data_url_bytes(path, "video")
        if data is None:
            return None  # not base64 media at all: the sample rule already reported it (one line per sample)
        src = io.BytesIO(data)
    elif os.path.getsize(path) == 0:
        return "an empty file (0 bytes)"
    errors = []
    try:
        import decord

        vr = decord.VideoReader(src, num_threads=1)
        frames, fps = len(vr), float(vr.get_avg_fps())
        if frames > 0 and fps > 0:
            return None
        errors.append(f"decord: {frames} frames at {fps:g} fps")
    except ImportError:
        pass
    except Exception as e:  # decord raises its own error types
        errors.append(f"decord: {type(e).__name__}: {' '.join(str(e).split())[:120]}")
    try:
        import av

        if not isinstance(src, str):
            src.seek(0)
        with av.open(src) as container:
            if not container.streams.video:
                return "not a readable video (no video stream in the file)"
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            if rate and (stream.frames or container.duration):
                return None
            if rate and next(iter(container.decode(stream)), None) is not None:
                return None  # no count in the header, but frames decode (the trainer counts them): usable
            errors.append(f"pyav: no frame count or duration (frames={stream.frames}, rate={rate})")
    except ImportError:
        pass
    except Exception as e:  # PyAV raises av.error.* types
        errors.append(f"pyav: {type(e).__name__}: {' '.join(str(e).split())[:120]}")
    return "not a readable video (" + ("; ".join(errors) or "neither decord nor PyAV is installed") + ")"


def media_problem(path: str, is_video: bool) -> str | None:
    """Why a local media file would fail to decode in the trainer, or None."""
    try:
        return _video_problem(path) if is_video else _image_problem(path)
    except OSError as e:
        return f"cannot be read ({e.strerror or type(e).__name__})"


def _batch(items: list[tuple[str, bool]]) -> list[tuple[tuple[str, bool], str | None]]:
    return [((path, is_video), media_problem(path, is_video)) for path, is_video in items]


def _workers(n: int) -> int:
    env = os.environ.get("VLSFT_CHECK_WORKERS")
    if env and env.isdigit():
        return max(1, int(env))
    if n <= BATCH or sys.platform != "linux":
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def decode_all(items: Iterable[tuple[str, bool]], progress: Callable[[int, int], None] | None = None
               ) -> dict[tuple[str, bool], str]:
    """``{(path, is_video): why}`` for the local files (``(path, is_video)``) that would not decode.

    ``progress(done, total)`` after each batch of BATCH files."""
    todo = list(items)
    total = len(todo)
    batches = [todo[i:i + BATCH] for i in range(0, total, BATCH)]
    bad: dict[tuple[str, bool], str] = {}
    done = 0
    n = min(_workers(total), len(batches))
    if n > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(n) as pool:
            results = pool.imap_unordered(_batch, batches)
            for out in results:
                done += len(out)
                bad.update((p, why) for p, why in out if why)
                if progress is not None:
                    progress(done, total)
    else:
        for b in batches:
            out = _batch(b)
            done += len(out)
            bad.update((p, why) for p, why in out if why)
            if progress is not None:
                progress(done, total)
    return bad
