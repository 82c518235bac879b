"""Reference embedding throughput: sentence-transformers (PyTorch, fp32) on the
same model, texts and batch sizes as `cargo bench --bench embed`.

    python st_embed.py MODEL_DIR [--device cpu|cuda] [--fp16]

Prints one JSON object per case, the same fields as the Rust bench.
"""
import json
import sys
import time

WORDS = ["policy", "leave", "request", "portal", "manager", "approval", "weeks", "budget", "travel", "expense",
         "receipt", "engineer", "incident", "on-call", "rotation", "cache", "volume", "nightly", "review", "office"]
MASK = (1 << 64) - 1


def text(seed, words):
    # The same generator as benches/embed.rs.
    x = (seed * 2654435761 + 12345) & MASK
    out = []
    for _ in range(words):
        x = (x * 6364136223846793005 + 1442695040888963407) & MASK
        out.append(WORDS[(x >> 33) % len(WORDS)])
    return " ".join(out)


def main():
    model_dir = sys.argv[1]
    device = "cuda" if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cuda" else "cpu"
    import torch
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(model_dir, device=device)
    if "--fp16" in sys.argv:
        model = model.half()
    impl = f"sentence-transformers-{device}{'-fp16' if '--fp16' in sys.argv else ''} (torch {torch.__version__}, {torch.get_num_threads()} threads)"
    for label, words in [("short", 12), ("chunk", 170)]:
        for batch in [1, 32, 128]:
            # Same totals and passes as benches/embed.rs.
            total, passes = (64, 3) if batch == 1 else (batch * 4, 3) if label == "short" else (batch * 2, 2)
            texts = [text(i, words) for i in range(total)]
            tokens = sum(len(model.tokenizer(t, truncation=True, max_length=model.max_seq_length)["input_ids"]) for t in texts)
            model.encode(texts[:batch], batch_size=batch)
            best = float("inf")
            for _ in range(passes):
                t = time.perf_counter()
                model.encode(texts, batch_size=batch, normalize_embeddings=True)
                if device == "cuda":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t)
            print(json.dumps({"impl": impl, "case": f"{label}/b{batch}", "texts": total, "tokens": tokens,
                              "seconds": best, "texts_per_s": total / best, "tokens_per_s": tokens / best}), flush=True)


if __name__ == "__main__":
    main()
