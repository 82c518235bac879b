"""On the GPU machine: turns the carried f16 weights back into an f32 model
folder and re-records the f32 reference embeddings of the fixture texts with
sentence-transformers (CPU, fp32) on exactly those weights.

    python prep.py CARRIED_DIR MODEL_OUT FIXTURES_OUT

Also prints how far the f16-rounded weights move the reference from the
shipped fixture (the original f32 weights), for the record.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np


def main():
    carried, model_out, fix_out = sys.argv[1:4]
    shutil.copytree(os.path.join(carried, "model"), model_out, dirs_exist_ok=True)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.check_call([sys.executable, os.path.join(here, "safetensors_np.py"),
                           os.path.join(carried, "model", "model.safetensors"),
                           os.path.join(model_out, "model.safetensors"), "f32"])
    os.makedirs(fix_out, exist_ok=True)
    shutil.copytree(os.path.join(carried, "fixtures", "tiny-cross-encoder"),
                    os.path.join(fix_out, "tiny-cross-encoder"), dirs_exist_ok=True)
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(model_out, device="cpu")
    model.max_seq_length = 256
    cases = [json.loads(l) for l in open(os.path.join(carried, "fixtures", "minilm-l6-v2-reference.jsonl"))]
    texts = [c["text"] for c in cases]
    emb = model.encode(texts, batch_size=1, normalize_embeddings=True, convert_to_numpy=True)
    with open(os.path.join(fix_out, "minilm-l6-v2-reference.jsonl"), "w") as f:
        for t, e in zip(texts, emb):
            f.write(json.dumps({"text": t, "embedding": [float(x) for x in e]}) + "\n")
    orig = np.array([c["embedding"] for c in cases], dtype=np.float64)
    cos = (orig * emb).sum(1) / np.linalg.norm(orig, axis=1) / np.linalg.norm(emb, axis=1)
    print(f"f16-rounded weights vs the shipped f32 fixture: worst cosine {cos.min():.6f}, "
          f"worst max abs diff {np.abs(orig - emb).max():.2e}", flush=True)


if __name__ == "__main__":
    main()
