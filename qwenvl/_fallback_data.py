"""TEMPORARY minimal data module (text + images, padded) used until ``qwenvl.data.dataset`` lands."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from qwenvl.data.dataset_use import parse_dataset_use

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


class _DS(torch.utils.data.Dataset):
    def __init__(self, records, tokenizer, image_processor):
        self.records, self.tok, self.ip = records, tokenizer, image_processor

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        rec, base = self.records[i]
        imgs = rec.get("image") or []
        imgs = [imgs] if isinstance(imgs, str) else imgs
        out = {}
        pads = []
        if imgs:
            pil = [Image.open(base / p).convert("RGB") for p in imgs]
            r = self.ip(images=pil, return_tensors="pt")
            out["pixel_values"], out["image_grid_thw"] = r["pixel_values"], r["image_grid_thw"]
            pads = [int(g.prod()) // 4 for g in r["image_grid_thw"]]
        ids, labels = self.tok(SYSTEM)["input_ids"], None
        labels = [-100] * len(ids)
        for turn in rec["conversations"]:
            v = turn["value"]
            if turn["from"] == "human":
                for n in pads:
                    v = v.replace("<image>", "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>", 1)
                t = self.tok(f"<|im_start|>user\n{v}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
                ids += t
                labels += [-100] * len(t)
            else:
                t = self.tok(f"{v}<|im_end|>\n")["input_ids"]
                ids += t
                labels += t
        out["input_ids"], out["labels"] = torch.tensor(ids), torch.tensor(labels)
        return out


def _collate(batch, pad_id):
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n + 3), pad_id)
    lab = torch.full((len(batch), n + 3), -100)
    att = torch.zeros((len(batch), n + 3), dtype=torch.long)
    for i, b in enumerate(batch):
        L = len(b["input_ids"])
        ids[i, :L], lab[i, :L], att[i, :L] = b["input_ids"], b["labels"], 1
    out = {"input_ids": ids, "labels": lab, "attention_mask": att}
    pv = [b["pixel_values"] for b in batch if "pixel_values" in b]
    if pv:
        out["pixel_values"] = torch.cat(pv)
        out["image_grid_thw"] = torch.cat([b["image_grid_thw"] for b in batch if "image_grid_thw" in b])
    else:  # dummy masked image so every rank runs the vision tower (ZeRO-3)
        ids[0, -3:] = torch.tensor([151652, 151655, 151653])
        out["pixel_values"] = torch.zeros(4, 1176)
        out["image_grid_thw"] = torch.tensor([[1, 2, 2]])
    return out


def make_data_module(tokenizer, image_processor, data_args, *, seed, model_type):
    d = json.loads(Path(data_args.dataset_dict).read_text())
    base = Path(data_args.dataset_dict).parent
    records = []
    for e in parse_dataset_use(data_args.dataset_use):
        spec = d[e.name]
        ann = base / spec["annotation_path"]
        data_path = base / spec.get("data_path", ".")
        txt = ann.read_text()
        recs = [json.loads(x) for x in txt.splitlines() if x.strip()] if ann.suffix == ".jsonl" else json.loads(txt)
        records += [(r, data_path) for r in recs if not r.get("video")]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 151643
    return {"train_dataset": _DS(records, tokenizer, image_processor),
            "data_collator": lambda b: _collate(b, pad), "report": {"samples": len(records)}}
