"""Reference embedding throughput: sentence-transformers (PyTorch, fp32) on the
same model, texts and batch sizes as `cargo bench --bench embed`.

    python st_embed.py MODEL_DIR [--device cpu|cuda] [--fp16] [--scale N] [--rerank CE_DIR]

--scale N takes N times the texts per batched case (RAGD_BENCH_SCALE in the Rust
bench): a GPU finishes the CPU-sized cases in milliseconds. --rerank adds
case rerank/q50 (RAGD_BENCH_RERANK): a CrossEncoder scores 50 chunk-sized
passages for each of 16 questions.

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
    scale = int(sys.argv[sys.argv.index("--scale") + 1]) if "--scale" in sys.argv else 1
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
            if batch > 1:  # batch 1 times single passes: 64 texts are plenty
                total *= scale
            texts = [text(i, words) for i in range(total)]
            tokens = sum(len(model.tokenizer(t, truncation=True, max_length=model.max_seq_length)["input_ids"]) for t in texts)
            # Warm-up over every text, as the Rust bench does.
            model.encode(texts, batch_size=batch)
            best = float("inf")
            for _ in range(passes):
                t = time.perf_counter()
                model.encode(texts, batch_size=batch, normalize_embeddings=True)
                if device == "cuda":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t)
            print(json.dumps({"impl": impl, "case": f"{label}/b{batch}", "texts": total, "tokens": tokens,
                              "seconds": best, "texts_per_s": total / best, "tokens_per_s": tokens / best}), flush=True)
    if "--rerank" in sys.argv:
        rerank(sys.argv[sys.argv.index("--rerank") + 1], device, "--fp16" in sys.argv, impl)


def rerank(ce_dir, device, fp16, impl):
    import torch
    from sentence_transformers import CrossEncoder
    ce = CrossEncoder(ce_dir, device=device, max_length=512)
    if fp16:
        ce.model.half()
    passages = [text(1000 + i, 170) for i in range(50)]
    questions = [text(5000 + i, 8) for i in range(16)]
    for q in questions:
        ce.predict([(q, p) for p in passages], batch_size=50)
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        for q in questions:
            ce.predict([(q, p) for p in passages], batch_size=50)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    pairs = len(questions) * len(passages)
    print(json.dumps({"impl": impl, "case": "rerank/q50", "texts": pairs, "seconds": best,
                      "pairs_per_s": pairs / best, "ms_per_question": best * 1e3 / len(questions)}), flush=True)


if __name__ == "__main__":
    main()
