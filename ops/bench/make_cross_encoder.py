"""Builds a cross-encoder folder with the architecture of
ms-marco-MiniLM-L-6-v2 (BertForSequenceClassification: 6 layers, hidden 384,
one label) from all-MiniLM-L6-v2's encoder and a random pooler and
classifier (seed 7). Its scores mean nothing; its cost per pair is the real
model's, which is what the query-latency benchmark needs. No cross-encoder
weights are on any registry we can reach.

    python make_cross_encoder.py MINILM_DIR OUT_DIR
"""
import json
import os
import shutil
import sys

import numpy as np

from safetensors_np import read, write


def main():
    src, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    cfg = json.load(open(os.path.join(src, "config.json")))
    h = cfg["hidden_size"]
    cfg.update({"architectures": ["BertForSequenceClassification"], "num_labels": 1,
                "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}})
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=2)
    rng = np.random.default_rng(7)
    tensors = {("bert." + k if not k.startswith("bert.") else k): a
               for k, a in read(os.path.join(src, "model.safetensors")).items()}
    scale = 1 / np.sqrt(h)
    tensors.setdefault("bert.pooler.dense.weight", rng.normal(0, scale, (h, h)).astype(np.float32))
    tensors.setdefault("bert.pooler.dense.bias", np.zeros(h, np.float32))
    tensors["classifier.weight"] = rng.normal(0, scale, (1, h)).astype(np.float32)
    tensors["classifier.bias"] = np.zeros(1, np.float32)
    write(os.path.join(out, "model.safetensors"), tensors)
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"]:
        if os.path.exists(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), out)
    print(f"cross-encoder ({cfg['num_hidden_layers']} layers, hidden {h}) written to {out}")


if __name__ == "__main__":
    main()
