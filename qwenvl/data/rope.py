"""3-D M-RoPE position ids per sample, built on transformers' own Qwen2.5-VL rope code.

The (t, h, w) ids of every image/video block come from transformers'
``Qwen2_5_VLModel.get_vision_position_ids`` (called unbound: it reads no weights and no config);
a video's temporal index k is then scaled to ``int(k * tokens_per_second * second_per_grid_t)``
as in ``Qwen2_5_VLModel.get_rope_index`` (done here, in float32, because transformers < 5.24
returns a float index when given the interval). No model is built; the cost is ~0.2 ms per sample.

One deliberate difference from transformers 5.24's ``get_rope_index``: after a vision block, the
following text resumes at ``max(block ids) + 1`` — what the official Qwen2.5-VL fine-tuning code
(and the Qwen2.5-VL release in transformers 4.5x) does. transformers 5.24 resumes at
``start + max(h, w) / merge``, which is smaller when a video's temporal positions run past its
spatial extent (2+ temporal patches at >= 1 s each): measured on the golden set, 5 of 27 samples
(every short video) differ from the official position ids with 5.24's function, none with ours.
Images and text-only samples are identical under both rules.

Qwen3-VL (and Qwen3-VL MoE, Qwen3.5: ``split_video_frames``), as HEAD's ``get_rope_index_3`` and transformers'
Qwen3-VL: a video grid ``(t, h, w)`` is split into ``t`` grids ``(1, h, w)``, one per temporal patch (each is its own
run of pads, with its timestamp text between them); each block gets temporal index 0 and the 2-D layout after the
preceding text; ``second_per_grid_ts`` is ignored.
"""

from __future__ import annotations

import torch

IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656


def _vision_ids_fn():
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    return Qwen2_5_VLModel.get_vision_position_ids


class RopeIndex:
    """Callable: ``(input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts) -> (3, L) long``."""

    def __init__(self, *, spatial_merge_size: int = 2, tokens_per_second: float = 2.0,
                 image_token_id: int = IMAGE_TOKEN_ID, video_token_id: int = VIDEO_TOKEN_ID,
                 scale_video_time: bool = True, split_video_frames: bool = False):
        self.merge = int(spatial_merge_size)
        self.tokens_per_second = tokens_per_second
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.scale_video_time = scale_video_time  # False for Qwen2-VL (temporal index = patch index)
        self.split_video_frames = split_video_frames  # Qwen3-VL: one (1, h, w) block per temporal patch
        self._vision_ids = _vision_ids_fn()

    @classmethod
    def for_family(cls, model_type, config=None) -> RopeIndex:
        """The temporal rule of a family (:attr:`qwenvl.families.Family.video_time`; ``model_type``: its
        config.json spelling or the record); ids/merge read from ``config`` when given."""
        from qwenvl.families import family

        kw = {}
        if config is not None:
            vc = getattr(config, "vision_config", None)
            kw["spatial_merge_size"] = getattr(vc, "spatial_merge_size", 2)
            kw["tokens_per_second"] = getattr(vc, "tokens_per_second", 2) or 2
            kw["image_token_id"] = getattr(config, "image_token_id", IMAGE_TOKEN_ID)
            kw["video_token_id"] = getattr(config, "video_token_id", VIDEO_TOKEN_ID)
        rule = family(model_type).video_time
        return cls(scale_video_time=rule == "seconds", split_video_frames=rule == "frame-split", **kw)

    def __call__(self, input_ids, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None
                 ) -> torch.Tensor:
        ids = torch.as_tensor(input_ids).reshape(-1)
        n = ids.shape[0]
        kind = torch.zeros(n, dtype=torch.int8)
        kind[ids == self.image_token_id] = 1
        kind[ids == self.video_token_id] = 2
        if not bool(kind.any()):
            return torch.arange(n, dtype=torch.long).expand(3, n).clone()
        # run boundaries of equal kind
        change = torch.nonzero(kind[1:] != kind[:-1]).reshape(-1) + 1
        bounds = [0, *change.tolist(), n]
        vgrids = torch.as_tensor(video_grid_thw).reshape(-1, 3) if video_grid_thw is not None else None
        if vgrids is not None and self.split_video_frames:
            vgrids = torch.cat([torch.tensor([[1, int(h), int(w)]] * int(t)) for t, h, w in vgrids.tolist()]) \
                if len(vgrids) else vgrids
        grids = {1: iter(torch.as_tensor(image_grid_thw).reshape(-1, 3)) if image_grid_thw is not None else iter(()),
                 2: iter(vgrids) if vgrids is not None else iter(())}
        spg = iter(torch.as_tensor(second_per_grid_ts, dtype=torch.float32).reshape(-1)) \
            if second_per_grid_ts is not None else iter(())
        parts, cur = [], 0
        for s, e in zip(bounds[:-1], bounds[1:], strict=True):
            k = int(kind[s])
            if k == 0:
                parts.append(torch.arange(cur, cur + e - s, dtype=torch.long).expand(3, -1))
                cur += e - s
                continue
            # consecutive blocks of the same kind (two adjacent images) share a run: split by grid
            pos = s
            while pos < e:
                try:
                    grid = next(grids[k])
                except StopIteration:
                    raise ValueError(f"more {'image' if k == 1 else 'video'} tokens than grids") from None
                ntok = int(grid.prod()) // (self.merge ** 2)
                block = self._vision_ids(None, cur, grid, 1, self.merge, 1).to(torch.long)
                if k == 2 and self.scale_video_time:
                    # temporal index k -> int(k * second_per_grid_t * tokens_per_second), in float32 as
                    # transformers and the official code compute it (applied here so that transformers
                    # versions that do not cast the scaled index back to int behave the same)
                    t = next(spg, None)
                    interval = self.tokens_per_second * (t if t is not None else torch.tensor(1.0))
                    block[0] = cur + ((block[0] - cur) * interval).long()
                parts.append(block)
                cur = int(block.max()) + 1
                pos += ntok
            if pos != e:
                raise ValueError("vision token run does not match the grids")
        out = torch.cat(parts, dim=1)
        if out.shape[1] != n:
            raise ValueError(f"position ids cover {out.shape[1]} of {n} tokens")
        return out
