"""The deep check and the trainer's sample builder agree on every record (issue 8 item 7, issue 9 item 7).

The property: for a generated record, ``datasets check --deep`` (:func:`qwenvl.data.annotations.scan`)
reports an error exactly when :meth:`SampleBuilder.build` (the trainer's code path, real Qwen2.5-VL
tokenizer, real image/video decoding) rejects the record, and its first error has the reason class the
builder's ``BadSample.kind`` names. Media are real files in a temporary folder: a real PNG, a real MP4,
and the things that are not media (absent, a folder named like a file, a dangling symlink, a symlink loop).
Then the regressions of issue 9 item 7 through the real ``vlsft datasets check --deep`` command.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from qwenvl.data import formats
from qwenvl.data.annotations import scan
from qwenvl.data.preprocess import BAD_SAMPLE_KINDS, BadSample
from qwenvl.data.sample import SampleBuilder, VisionBudget


def _write_video(path: Path, frames: int = 4, size: int = 32) -> None:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=2)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.full((size, size, 3), 40 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _plant_media(media: Path) -> None:
    """Good media and the things that only look like media."""
    media.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (56, 56), (200, 30, 30)).save(media / "good.png")
    _write_video(media / "clip.mp4")
    for name in ("folder.png", "folder.mp4"):
        (media / name).mkdir()
    (media / "frames").mkdir()  # a video given as a folder of frames (issue 23 item 6); junk/ holds no image
    for i in (2, 10):
        Image.new("RGB", (56, 56), (20 * i, 30, 30)).save(media / "frames" / f"f{i}.png")
    (media / "junk").mkdir()
    (media / "junk" / "notes.txt").write_text("x")
    (media / "dangling.jpg").symlink_to(media / "nowhere.jpg")
    (media / "dangling.mp4").symlink_to(media / "nowhere.mp4")
    (media / "loop.jpg").symlink_to(media / "loop.jpg")
    (media / "link.png").symlink_to(media / "good.png")  # a symlink to a real file is media


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    media = tmp_path_factory.mktemp("media")
    _plant_media(media)
    return media


@pytest.fixture(scope="module")
def builder(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    return SampleBuilder(tok, VisionBudget(max_pixels=50176, min_pixels=784))


# ---- generated records --------------------------------------------------------------------------------------

def _data_url(data: bytes) -> str:
    import base64
    import io

    if not data:
        b = io.BytesIO()
        Image.new("RGB", (30, 20), (10, 200, 30)).save(b, "PNG")
        data = b.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode()


# inline base64 images (issue 23): a good one, invalid base64, bytes that are no image, not an image type
DATA_URLS = [_data_url(b""), "data:image/png;base64,AA", _data_url(b"plain text"), "data:text/plain;base64,aGk="]
IMAGES = ["good.png", "link.png", "missing.jpg", "folder.png", "dangling.jpg", "loop.jpg", " good.png", *DATA_URLS]
VIDEOS = ["clip.mp4", "missing.mp4", "folder.mp4", "dangling.mp4", "frames", "frames/", "junk/"]
ODD = [None, "", "  ", 5, [], [5], [""], {"path": "good.png"}]
TEXTS = ["q", "Describe.", "", "   ", "<image>", "<video>", "<image>\n<image>", "<image> and <video>",
         "a <|image_pad|> b", "x <|video_pad|>", "<|vision_start|>", None, 5, ["q"], {"text": "q"}]
SPEAKERS = ["human", "gpt", "user", "assistant", "system", "Human", "robot", "", None, ["human"], 1]


def _media(pool: list[str]) -> st.SearchStrategy:
    return st.one_of(st.sampled_from(pool), st.lists(st.sampled_from(pool), min_size=1, max_size=3),
                     st.sampled_from(ODD))


turn = st.one_of(
    st.builds(lambda s, v: {"from": s, "value": v}, st.sampled_from(SPEAKERS), st.sampled_from(TEXTS)),
    st.builds(lambda s, v: {"role": s, "content": v}, st.sampled_from(SPEAKERS), st.sampled_from(TEXTS)),
    st.builds(lambda s, v: {"from": s, "content": v}, st.sampled_from(SPEAKERS), st.sampled_from(TEXTS)),
    st.builds(lambda s: {"from": s}, st.sampled_from(SPEAKERS)),
    st.builds(lambda s, v, r: {"from": s, "value": v, "role": r, "content": "c"}, st.sampled_from(SPEAKERS),
              st.sampled_from(TEXTS), st.sampled_from(SPEAKERS)),
    st.sampled_from([3, "hello", None, []]),
)
# mostly well-formed human/gpt alternations (so that media errors are reached), plus free-form turn lists
good_pair = st.builds(lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}],
                      st.sampled_from(["q", "<image>", "<video>", "<image>\n<image>", "<image> and <video>"]),
                      st.sampled_from(["a", "", "<image>"]))
conversations = st.one_of(
    good_pair,
    st.builds(lambda first, rest: [first, *rest], st.sampled_from([{"from": "gpt", "value": "hi"},
                                                                   {"role": "assistant", "content": "hi"},
                                                                   {"from": "system", "value": "sys"}]), good_pair),
    st.builds(lambda p: p[:1], good_pair).map(lambda t: [{"from": "gpt", "value": "hi"}, *t]),  # gpt-first, no answer
    st.lists(turn, min_size=0, max_size=4),
    st.sampled_from([None, "q", {}, 5]),
)


@st.composite
def consistent(draw):
    """Tags that match the media (so the media themselves decide), with the official turn shapes."""
    images = draw(st.lists(st.sampled_from(IMAGES), max_size=2))
    videos = draw(st.lists(st.sampled_from(VIDEOS), max_size=1))
    q = "<image>\n" * len(images) + "<video>\n" * len(videos) + draw(st.sampled_from(["q", "", "Describe."]))
    conv = [{"from": "human", "value": q}, {"from": "gpt", "value": draw(st.sampled_from(["a", "", "<image>"]))}]
    if draw(st.booleans()):
        conv = [{"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]} for t in conv]
    lead = draw(st.sampled_from([None, {"from": "gpt", "value": "hi"}, {"role": "system", "content": "sys"}]))
    rec: dict = {"conversations": ([lead] if lead else []) + conv}
    for key, items in (("image", images), ("video", videos)):
        if items:
            rec[key] = items[0] if len(items) == 1 and draw(st.booleans()) else items
    if draw(st.integers(0, 2)) == 0:  # grounding (issue 13): objects and their placeholders in the answer
        rec["objects"] = draw(OBJECTS)
        answer = rec["conversations"][-1]
        answer["value" if "value" in answer else "content"] = draw(st.sampled_from(ANSWERS))
    return rec


OBJECT_POOL = [{"label": "c", "bbox": [1, 2, 30, 40]}, {"label": "c", "point": [5, 5]},
               {"label": "c", "bbox": [30, 2, 1, 40]}, {"label": "c", "bbox": [1, 2, 1, 40]},
               {"label": "c", "bbox": [1, 2, 3]}, {"bbox": [1, 2, 3, 4]}, {"label": "c", "bbox": [1, 2, 30, 40],
               "image": 1}, {"label": "c", "bbox": [1, 2, 300, 400]}, {"label": "c", "bbox": [0.1, 0.2, 0.5, 0.9]},
               {"label": "c", "point": [5, 5], "bbox": [1, 2, 3, 4]}, "x",
               {"label": "c", "bbox": [1, 2, 1e308, 40]}, {"label": "c", "point": [-1e300, 5]}]
OBJECTS = st.one_of(st.just([]), st.lists(st.sampled_from(OBJECT_POOL), min_size=1, max_size=2),
                    st.sampled_from(["cat", 5, None]))
ANSWERS = ["<bbox>", "<ref> <bbox>", "<point>", "<objects>", "<bbox> and <point>", "<bbox><bbox>", "none", "<ref>"]


@st.composite
def records(draw):
    if draw(st.booleans()):
        return draw(consistent())
    if draw(st.integers(0, 30)) == 0:
        return draw(st.sampled_from([[1, 2], "text", 5, None, [{"conversations": []}]]))
    rec: dict = {}
    if draw(st.booleans()):
        rec["image"] = draw(_media(IMAGES))
    if draw(st.integers(0, 3)) == 0:
        rec["video"] = draw(_media(VIDEOS))
    if draw(st.integers(0, 10)) == 0:
        rec[draw(st.sampled_from(["images", "videos"]))] = ["good.png"]
    conv = draw(conversations)
    if conv is not None or draw(st.booleans()):
        rec["conversations"] = conv
    return rec


def _check_verdict(rec, media_dir: Path) -> tuple[str | None, list]:
    """The deep check of a one-record file: (reason class of its first error or None, its problems)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "one.jsonl")
        with open(path, "w") as f:
            f.write(json.dumps(rec) + "\n")
        res = scan(path, str(media_dir), deep=True, workers=1)
    errors = [p for p in res.problems if p.is_error]
    return (res.kinds[errors[0]] if errors else None), res.problems


def _builder_verdict(builder, rec, media_dir: Path) -> str | None:
    # the dataset's format, settled from its (one-record) file as the trainer's registry settles it (issue 12)
    fmt = formats.settle(None, [(1, rec)])
    try:
        builder.build(rec, str(media_dir), fmt)
    except BadSample as e:
        assert e.kind in BAD_SAMPLE_KINDS, e.kind
        return e.kind
    return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(rec=records())
def test_deep_check_errors_exactly_when_the_builder_rejects(builder, media_dir, rec):
    checked, problems = _check_verdict(rec, media_dir)
    built = _builder_verdict(builder, rec, media_dir)
    event(f"builder: {built or 'accepted'}")  # pytest --hypothesis-show-statistics shows the spread
    assert checked == built, (rec, [p.render() for p in problems])


# ---- the same, for records in the other formats (issue 12) -----------------------------------------------------

PART_KINDS = st.sampled_from(["text", "image", "image_url", "video", "bare_image", "audio", "data_url", "junk",
                              "v1_text", "v1_image", "v1_reasoning", "v1_tool_call"])
ROLES = ["user", "assistant", "system", "tool", "User", None, 3]


def _part(kind: str, draw) -> object:
    if kind == "text":
        return {"type": "text", "text": draw(st.sampled_from(TEXTS[:8] + [None]))}
    if kind == "image":
        return {"type": "image", "image": draw(st.sampled_from(IMAGES + [5]))}
    if kind == "image_url":
        return {"type": "image_url", "image_url": {"url": draw(st.sampled_from(IMAGES))}}
    if kind == "video":
        return {"type": "video", "video": draw(st.sampled_from(VIDEOS + [["good.png", "link.png"], ["missing.jpg"],
                                                                          []]))}
    if kind == "bare_image":
        return {"type": "image"}
    if kind == "audio":
        return {"type": "input_audio", "input_audio": {"data": "x"}}
    if kind == "v1_text":  # LLaMA-Factory v1 parts keep everything in "value" (issue 23)
        return {"type": "text", "value": draw(st.sampled_from(TEXTS[:8] + [None]))}
    if kind == "v1_image":
        return {"type": "image_url", "value": draw(st.sampled_from(IMAGES))}
    if kind == "v1_reasoning":
        return {"type": "reasoning", "value": draw(st.sampled_from(["Think.", 5]))}
    if kind == "v1_tool_call":
        return {"type": "tool_call", "value": draw(st.sampled_from(['{"name": "f", "arguments": {"x": 1}}', "{no",
                                                                    '{"foo": 1}']))}
    if kind == "data_url":
        return {"type": "image_url", "image_url": {"url": draw(st.sampled_from(DATA_URLS))}}
    return draw(st.sampled_from(["raw", 5, {"text": "no type"}]))


@st.composite
def chat_records(draw):
    """messages / sharegpt records: tags or part lists, media listed or inline, frame lists, system, loss."""
    sharegpt = draw(st.integers(0, 3)) == 0
    rkey, ckey = ("from", "value") if sharegpt else ("role", "content")
    roles = {"user": "human", "assistant": "gpt"} if sharegpt else {}
    turns = []
    if draw(st.integers(0, 3)) == 0:
        turns.append({rkey: "system", ckey: draw(st.sampled_from(["Be brief.", "", 5]))})
    for _ in range(draw(st.integers(0, 3))):
        for side in ("user", "assistant"):
            if draw(st.integers(0, 8)) == 0:
                role = draw(st.sampled_from(ROLES))
            else:
                role = roles.get(side, side)
            if draw(st.booleans()):
                content = draw(st.sampled_from(["q", "<image>\nq", "<video>q", "<image><image>", "", "a"]))
            else:
                content = [_part(k, draw) for k in draw(st.lists(PART_KINDS, min_size=0, max_size=3))]
            turn = {rkey: role, ckey: content}
            if draw(st.integers(0, 3)) == 0:
                turn["loss"] = draw(st.sampled_from([True, False, None, "no"]))
            elif draw(st.integers(0, 3)) == 0:  # LLaMA-Factory v1, OpenAI fine-tuning
                turn[draw(st.sampled_from(["loss_weight", "weight"]))] = draw(
                    st.sampled_from([0.0, 1.0, 0, 1, 0.5, None, True]))
            turns.append(turn)
    rec: dict = {"conversations" if sharegpt else "messages": turns}
    if not sharegpt and draw(st.integers(0, 6)) == 0:
        rec["messages"] = draw(st.sampled_from([None, [], "q"]))
    if draw(st.booleans()):
        rec["images"] = draw(st.one_of(st.lists(st.sampled_from(IMAGES), min_size=1, max_size=2),
                                       st.sampled_from(ODD)))
    if draw(st.integers(0, 2)) == 0:
        rec["videos"] = draw(st.lists(st.one_of(st.sampled_from(VIDEOS), st.lists(st.sampled_from(IMAGES[:3]),
                                                                                  max_size=3)), max_size=2))
    if draw(st.integers(0, 4)) == 0:
        rec["system"] = draw(st.sampled_from(["Be brief.", "Other.", 3]))
    if sharegpt and "images" not in rec and "videos" not in rec:
        rec["images"] = ["good.png"]  # (what makes a conversations file sharegpt)
    if not sharegpt and type(rec["messages"]) is list and draw(st.integers(0, 3)) == 0:  # TRL prompt-completion
        msgs = rec.pop("messages")
        cut = draw(st.integers(0, len(msgs)))
        rec["prompt"], rec["completion"] = msgs[:cut], msgs[cut:]
    return rec


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(rec=chat_records())
def test_deep_check_agrees_with_the_builder_in_every_format(builder, media_dir, rec):
    checked, problems = _check_verdict(rec, media_dir)
    built = _builder_verdict(builder, rec, media_dir)
    event(f"{formats.settle(None, [(1, rec)]).name}: {built or 'accepted'}")
    if built == "bad_conversation" and checked is None and _family_refuses_tools(builder, rec):
        return  # tool turns / calls: the model family decides (Qwen2.5-VL has none), which the check cannot know
    assert checked == built, (rec, [p.render() for p in problems])


def _family_refuses_tools(builder, rec) -> bool:
    try:
        builder.build(rec, "/nonexistent", formats.settle(None, [(1, rec)]))
    except BadSample as e:
        return str(e).startswith("tool definitions, calls or results")
    return False


def test_agreement_on_the_decided_shapes(builder, media_dir):
    """The shapes the two sides used to judge differently, spelled out (the property covers them at random)."""
    qa = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    cases = {
        # official: a first 'from: gpt' turn is dropped; with nothing left to answer the trainer skips it
        "gpt_first_no_answer": ({"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "q"}]},
                                "no_answer"),
        "gpt_first_then_pair": ({"conversations": [{"from": "gpt", "value": "hi"}, *qa]}, None),
        # an empty answer trains <|im_end|> as the official code does: a warning, not an error
        "empty_answer": ({"conversations": [qa[0], {"from": "gpt", "value": ""}]}, None),
        "tag_in_answer": ({"conversations": [qa[0], {"from": "gpt", "value": "<image>"}]}, None),
        "pad_text": ({"conversations": [{"from": "human", "value": "<|image_pad|>"}, qa[1]]}, "bad_conversation"),
        "folder_image": ({"image": "folder.png", "conversations": [{"from": "human", "value": "<image>"}, qa[1]]},
                         "missing_media"),
        "loop_image": ({"image": "loop.jpg", "conversations": [{"from": "human", "value": "<image>"}, qa[1]]},
                       "missing_media"),
        "symlinked_image": ({"image": "link.png", "conversations": [{"from": "human", "value": "<image>"}, qa[1]]},
                            None),
        "blank_path": ({"image": "  ", "conversations": [{"from": "human", "value": "<image>"}, qa[1]]},
                       "bad_media_field"),
        # a coordinate of 1e308: the check warned and the trainer crashed with OverflowError (Trust, round 3)
        "huge_box": ({"image": "good.png", "objects": [{"label": "c", "bbox": [1, 2, 1e308, 40]}],
                      "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "<bbox>"}]},
                     "bad_objects"),
    }
    for name, (rec, kind) in cases.items():
        checked, problems = _check_verdict(rec, media_dir)
        assert (checked, _builder_verdict(builder, rec, media_dir)) == (kind, kind), (name, problems)


# ---- issue 9 item 7 through the real CLI -------------------------------------------------------------------------


def _vlsft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlsft", *args], capture_output=True, text=True, timeout=120)


def _dictionary(tmp_path: Path, records: list, data_path: str = "media") -> Path:
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    d = tmp_path / "d.json"
    d.write_text(json.dumps({"t": {"data_path": data_path, "annotation_path": "t.jsonl"}}))
    return d


def _img(path: str) -> dict:
    return {"image": path, "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]}


def test_cli_folders_and_broken_symlinks_are_not_media(tmp_path):
    _plant_media(tmp_path / "media")
    d = _dictionary(tmp_path, [_img("good.png"), _img("folder.png"), {**_img("x"), "image": None, "video": "folder.mp4",
                               "conversations": [{"from": "human", "value": "<video>"}, {"from": "gpt", "value": "a"}]},
                               _img("dangling.jpg"), _img("loop.jpg"), _img("link.png")])
    r = _vlsft("datasets", "check", str(d), "--deep", "--json")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    got = [(p["line"], p["message"]) for p in json.loads(r.stdout)["problems"]]
    m = tmp_path / "media"
    assert got == [(2, f"media file {m}/folder.png is a folder, not a file"),
                   (3, f"media file {m}/folder.mp4 is an empty folder (a video given as frames needs its image "
                       "files)"),
                   (4, f"media file {m}/dangling.jpg is a broken symbolic link (its target does not exist)"),
                   (5, f"media file {m}/loop.jpg is a symbolic link loop")]


def test_cli_gpt_first_and_empty_answers_match_the_trainer(tmp_path):
    (tmp_path / "media").mkdir()
    d = _dictionary(tmp_path, [
        {"conversations": [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "q"}]},
        {"conversations": [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "q"},
                           {"from": "gpt", "value": "a"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
    ])
    r = _vlsft("datasets", "check", str(d), "--deep")
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout
    assert ":1: error: [conversations] no assistant turn to train on once the leading gpt turn is dropped" in out
    assert ":1: warning: [conversations] the first turn is from gpt; the trainer drops it" in out
    assert ":2: warning: [conversations] the first turn is from gpt" in out and ":2: error" not in out
    assert ":3: warning: [value] a gpt turn has an empty value: it trains an empty answer" in out
    assert ":3: error" not in out and "1 error, 3 warnings" in out


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):  # noqa: N802 - http.server's name
        self.send_response(200 if self.path == "/ok.png" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_cli_http_media_is_not_s3_and_is_blamed_on_the_sample(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        with socket_closed() as dead:
            (tmp_path / "media").mkdir()
            d = _dictionary(tmp_path, [_img(f"http://127.0.0.1:{port}/ok.png"), _img(f"http://127.0.0.1:{port}/gone.png"),
                                       _img(f"http://127.0.0.1:{dead}/x.png"), _img(f"http://127.0.0.1:{dead}/y.png")])
            r = _vlsft("datasets", "check", str(d), "--deep", "--json")
    finally:
        server.shutdown()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    probs = json.loads(r.stdout)["problems"]
    assert not any("S3" in p["message"] or p["key"] == "annotation_path" for p in probs), probs
    ann = str(tmp_path / "t.jsonl")
    assert [(p["file"], p["line"]) for p in probs] == [(ann, 2), (ann, 3)]
    assert probs[0]["message"] == f"media file not found: http://127.0.0.1:{port}/gone.png (HTTP 404)"
    assert probs[1]["message"].startswith(f"cannot reach 127.0.0.1:{dead} for http://127.0.0.1:{dead}/x.png (")
    assert probs[1]["message"].endswith("; 1 more media file(s) there not checked")


class socket_closed:
    """A local port nobody listens on (bound, then closed)."""

    def __enter__(self) -> int:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        return port

    def __exit__(self, *exc) -> None:
        return None
