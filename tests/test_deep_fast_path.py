"""The deep check's fast path (issue 23 item 5) gives the verdicts of the full per-format rules.

``annotation_check._plain_official`` / ``_plain_formatted`` count a plainly clean record without running
:func:`~qwenvl.data.sample_rules.record_problems` / :func:`~qwenvl.data.formats.sample_problems`. Pinned here:
(1) a record the fast path takes has no problem under the full rule and is counted the same (images, videos,
text-only, media paths, first relative media); a record it declines is left untouched; (2) a whole file scanned
with and without the fast path gives the same problems on the same lines and the same counts; (3) plain records
never reach the full rule (a count of calls, not a timing). Generated records sit near the boundary: plain
records with one thing wrong. No tokenizer, no media decoding: cheap.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwenvl.data import annotation_check as ac
from qwenvl.data import formats
from qwenvl.data.sample_rules import record_problems

TEXTS = ["q", "Describe.", "", "   ", "<image>", "<video>", "<image>\n<image>", "<image> and <video>", "a <b> c",
         "a <|image_pad|> b", "x <|video_pad|>", "<|vision_start|>", "x < y", "bbox_2d [1, 2, 3, 4]", "\t", 5, None, ["q"], {"t": 1}]
MEDIA = ["a.jpg", "d/b.png", "/abs/c.jpg", "http://h/x.jpg", "", "  ", "data:image/png;base64,AA", 5, None, [],
         ["a.jpg"], ["a.jpg", "d/b.png"], ["a.jpg", ""], [5], ["data:image/png;base64,AA"], {"path": "a.jpg"}]
EXTRA_KEYS = ["id", "images", "videos", "objects", "fps", "sample_fps", "system", "source", "tools",
              "chat_template_kwargs", "reasoning_effort", "image", "video", "messages", "conversations"]
SPEAKERS = {"official": ("human", "gpt"), "sharegpt": ("human", "gpt"), "messages": ("user", "assistant"),
            "prompt_completion": ("user", "assistant")}
ODD_SPEAKERS = ["system", "user", "assistant", "human", "gpt", "Human", "tool", "", None, 3]


ANSWERS = st.one_of(st.sampled_from(["a", "A cat.", "x > y"]), st.sampled_from(["<image>", "see <video>", "<|im_end|>",
                                                                           "a <|video_pad|>", "<b>", " "]))


def _question(draw, n_img: int, n_vid: int) -> str:
    return "<image>\n" * n_img + "<video>\n" * n_vid + draw(st.sampled_from(["q", "Describe the scene.", "x < y"]))


@st.composite
def near_plain(draw, shape: str = "official"):
    """A plain record of ``shape`` (tags matching the media) with zero to two things changed."""
    user, assistant = SPEAKERS[shape]
    rkey, ckey = ("from", "value") if shape in ("official", "sharegpt") else ("role", "content")
    mkey, ikey, vkey = ({"official": ("conversations", "image", "video"), "sharegpt": ("conversations", "images",
                        "videos")}.get(shape, ("messages", "images", "videos")))
    images = draw(st.lists(st.sampled_from(["a.jpg", "d/b.png", "/abs/c.jpg"]), max_size=2))
    videos = draw(st.lists(st.just("v.mp4"), max_size=1))
    turns = []
    for i in range(draw(st.integers(1, 3))):
        turns.append({rkey: user, ckey: _question(draw, len(images), len(videos)) if i == 0 else "more?"})
        turns.append({rkey: assistant, ckey: draw(ANSWERS)})
    if draw(st.booleans()):
        turns = turns[:-1] if len(turns) > 2 else turns
    rec: dict = {"id": 7} if draw(st.booleans()) else {}
    rec[mkey] = turns
    for key, items in ((ikey, images), (vkey, videos)):
        if items:
            rec[key] = items[0] if len(items) == 1 and shape == "official" and draw(st.booleans()) else items
        elif shape != "official" and draw(st.booleans()):
            rec[key] = []
    for _ in range(draw(st.integers(0, 2))):
        _mutate(draw, rec, mkey, rkey, ckey, ikey, vkey)
    if shape == "prompt_completion" and type(rec.get("messages")) is list:
        msgs = rec.pop("messages")
        cut = draw(st.integers(0, len(msgs)))
        rec["prompt"], rec["completion"] = msgs[:cut], msgs[cut:]
    return rec


def _mutate(draw, rec: dict, mkey: str, rkey: str, ckey: str, ikey: str, vkey: str) -> None:
    what = draw(st.sampled_from(["text", "speaker", "turn_key", "turn", "media", "key", "conv", "drop"]))
    turns = rec.get(mkey)
    if what in ("text", "speaker", "turn_key", "turn", "drop") and type(turns) is list and turns:
        i = draw(st.integers(0, len(turns) - 1))
        if type(turns[i]) is not dict or what == "turn":
            turns[i] = draw(st.sampled_from([3, "hello", None, [], {}]))
        elif what == "text":
            turns[i][ckey] = draw(st.sampled_from(TEXTS))
        elif what == "speaker":
            turns[i][rkey] = draw(st.sampled_from(ODD_SPEAKERS))
        elif what == "turn_key":
            turns[i][draw(st.sampled_from(["role", "content", "from", "value", "loss", "tool_calls"]))] = "x"
        else:
            del turns[i]
    elif what == "media":
        rec[draw(st.sampled_from([ikey, vkey]))] = draw(st.sampled_from(MEDIA))
    elif what == "key":
        rec[draw(st.sampled_from(EXTRA_KEYS))] = draw(st.sampled_from([["a.jpg"], [], "x", None, 1, [{"bbox": 1}]]))
    elif what == "conv":
        rec[mkey] = draw(st.sampled_from([None, [], "q", {}, 5]))


def _full_part(rec, fmt) -> tuple[ac._Part, list]:
    part = ac._Part(media={}, video_paths={}, image_paths={})
    sink = ac._Sink("x.jsonl", 1000)
    ac._check_record(rec, 3, sink, True, part.media, part, fmt)
    return part, sink.items


def _counted(part: ac._Part) -> tuple:
    return (part.images, part.videos, part.text_only, part.media, part.first_media, part.video_paths,
            part.image_paths, part.grounded, getattr(part, "video_media", None))


def _fast(rec, shape: str) -> tuple[bool, ac._Part]:
    part = ac._Part(media={}, video_paths={}, image_paths={})
    if shape == "official":
        return ac._plain_official(rec, 3, part.media, part), part
    f, keys = ac._plain_keys(formats.FormatSpec(shape))
    return ac._plain_formatted(rec, 3, part.media, part, f, keys), part


@pytest.mark.parametrize("shape", ["official", "messages", "sharegpt", "prompt_completion"])
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fast_path_takes_only_clean_records_and_counts_them_alike(shape, data):
    rec = data.draw(near_plain(shape))
    fmt = None if shape == "official" else formats.FormatSpec(shape)
    taken, part = _fast(rec, shape)
    full, problems = _full_part(rec, fmt)
    if taken:
        assert problems == [], rec
        if shape == "official":
            assert record_problems(rec) == [], rec
        else:
            assert formats.sample_problems(rec, fmt)[2] == [], rec
        assert _counted(part) == _counted(full), rec
    else:
        assert _counted(part) == _counted(ac._Part(media={}, video_paths={}, image_paths={})), rec  # untouched


def _scan_both(tmp_path, records: list, suffix: str, fmt, monkeypatch) -> tuple:
    path = tmp_path / f"ann{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records, indent=1))
    (tmp_path / "d").mkdir(exist_ok=True)
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8\xff")
    out = []
    for fast in (True, False):
        with monkeypatch.context() as m:
            if not fast:
                m.setattr(ac, "_plain_official", lambda *a: False)
                m.setattr(ac, "_plain_keys", lambda f: None)
            r = ac.scan(str(path), str(tmp_path), deep=True, workers=1, max_per_kind=1000, fmt=fmt)
        out.append((r.samples, r.images, r.videos, r.text_only, r.media_files, r.missing_media, r.relative_media,
                    r.media_line, [p.render() for p in r.problems], sorted(r.kinds.values())))
    return out[0], out[1]


@pytest.mark.parametrize("shape", ["official", "messages", "sharegpt", "prompt_completion"])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_scan_with_and_without_the_fast_path_says_the_same(tmp_path, monkeypatch, shape, data):
    records = data.draw(st.lists(near_plain(shape), min_size=1, max_size=40))
    fmt = formats.FormatSpec(shape, declared=True)
    for suffix in (".jsonl", ".json"):
        fast, full = _scan_both(tmp_path, records, suffix, fmt, monkeypatch)
        assert fast == full


@pytest.mark.parametrize("shape", ["official", "messages", "sharegpt", "prompt_completion"])
def test_plain_records_never_reach_the_full_rule(tmp_path, monkeypatch, shape):
    """2,000 plain records of each shape (single images, pairs, videos, text-only, ids, 4-turn dialogues): the
    full rule runs for none of them, and the counts are still right."""
    import random

    rng = random.Random(5)
    records = [_plain_example(shape, rng) for _ in range(2000)]
    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    calls = {"rule": 0}
    for name, module in (("record_problems", ac), ("sample_problems", formats)):
        real = getattr(module, name)

        def counting(*a, _real=real, **k):
            calls["rule"] += 1
            return _real(*a, **k)

        monkeypatch.setattr(module, name, counting)
    r = ac.scan(str(path), str(tmp_path), deep=True, workers=1, fmt=formats.FormatSpec(shape, declared=True))
    assert calls["rule"] == 0
    assert r.samples == 2000 and r.images + r.text_only + r.videos - _both(records) == 2000
    assert not [p for p in r.problems if p.is_error and "not found" not in p.message]


def _plain_example(shape: str, rng) -> dict:
    user, assistant = SPEAKERS[shape]
    rkey, ckey = ("from", "value") if shape in ("official", "sharegpt") else ("role", "content")
    n_img, n_vid = rng.choice([(0, 0), (1, 0), (2, 0), (0, 1), (1, 1)])
    turns = [{rkey: user, ckey: "<image>" * n_img + "<video>" * n_vid + "Describe."}, {rkey: assistant, ckey: "A."}]
    if rng.random() < 0.2:
        turns += [{rkey: user, ckey: "And?"}, {rkey: assistant, ckey: "B."}]
    images = [f"i{rng.randrange(50)}.jpg" for _ in range(n_img)]
    videos = ["v.mp4"] * n_vid
    if shape == "official":
        rec: dict = {"id": rng.randrange(10**6), "conversations": turns}
        if images:
            rec["image"] = images[0] if n_img == 1 else images
        if videos:
            rec["video"] = videos[0]
        return rec
    rec = {"prompt": turns[:-1], "completion": turns[-1:]} if shape == "prompt_completion" else {
        "messages" if shape == "messages" else "conversations": turns}
    rec["images"] = images
    if videos:
        rec["videos"] = videos
    return rec


def _both(records: list) -> int:
    """Samples counted twice (images and a video)."""
    return sum(1 for r in records if (r.get("image") or r.get("images")) and (r.get("video") or r.get("videos")))


def test_a_long_jsonl_read_by_the_workers_reports_the_same_lines(tmp_path, monkeypatch):
    """A JSONL of 1 MiB or more is sliced by the workers (os.pread, lines counted per chunk and added when merged):
    the same problems on the same lines as one read of the whole file, in one process or two, in small chunks."""
    import random

    rng = random.Random(3)
    good = {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\n" + "q" * 150},
                                                {"from": "gpt", "value": "a"}]}
    bad = ['{"image": "a.jpg", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}',
           "{broken", "", '"text"', '{"image": "gone.jpg", "conversations": []}']
    lines = [rng.choice(bad) if rng.random() < 0.003 else json.dumps(good) for _ in range(6000)]
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(lines) + "\n")
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8\xff")
    assert path.stat().st_size >= 1 << 20 and ac._local_jsonl(str(path)) is not None
    monkeypatch.setattr(ac._FileBytes, "WINDOW", 1000)  # find() across windows

    def seen(**kw) -> tuple:
        r = ac.scan(str(path), str(tmp_path), deep=True, max_per_kind=1000, **kw)
        return r.records, r.samples, r.images, r.missing_media, r.media_line, [p.render() for p in r.problems]

    got = [seen(workers=1), seen(workers=1, chunk=700), seen(workers=2, chunk=700)]
    monkeypatch.setattr(ac, "_local_jsonl", lambda p: None)  # the whole file read at once
    want = seen(workers=1)
    assert want[5] and all(g == want for g in got)
    data = ac._FileBytes(str(path), path.stat().st_size)
    raw = path.read_bytes()
    assert data[5:3000] == raw[5:3000] and data[len(raw) - 10:len(raw) + 5] == raw[-10:]
    assert [data.find(b"\n", k) for k in (0, 999, 1500, len(raw) - 1)] == [raw.find(b"\n", k) for k in
                                                                           (0, 999, 1500, len(raw) - 1)]
