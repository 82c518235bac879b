//! Parity of ragd's burn BERT with the reference Python implementations
//! (outputs recorded in ../shared/fixtures, tolerances from its README).

use ragd_actors::model::{BatchPolicy, CrossEncoder, Encoder};
use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixtures() -> PathBuf {
    std::env::var_os("RAGD_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared/fixtures"))
}

fn minilm() -> PathBuf {
    let dir = std::env::var_os("RAGD_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("models/all-MiniLM-L6-v2"));
    assert!(
        dir.join("model.safetensors").exists(),
        "{} has no model: run ops/fetch-models.sh",
        dir.display()
    );
    dir
}

fn jsonl(path: PathBuf) -> Vec<serde_json::Value> {
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn embedder_matches_sentence_transformers() {
    let enc = Encoder::<burn::backend::Flex>::load(
        &minilm(),
        BatchPolicy::default(),
        &Default::default(),
    )
    .unwrap();
    let cases = jsonl(fixtures().join("minilm-l6-v2-reference.jsonl"));
    assert!(cases.len() >= 5);
    let texts: Vec<String> = cases
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    // All at once (mixed lengths share padded batches) and one by one must
    // both match: padding must not leak into the result.
    let together = enc.embed(&refs).unwrap();
    for (i, case) in cases.iter().enumerate() {
        let expected: Vec<f32> = case["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let alone = enc.embed(&[refs[i]]).unwrap().remove(0);
        for got in [&together[i], &alone] {
            assert_eq!(got.len(), expected.len());
            let cos: f32 = got.iter().zip(&expected).map(|(a, b)| a * b).sum::<f32>()
                / (expected.iter().map(|x| x * x).sum::<f32>().sqrt());
            let max_diff = got
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                cos >= 0.9999,
                "text {i} {:?}: cosine {cos}",
                &texts[i][..texts[i].len().min(40)]
            );
            assert!(max_diff <= 1e-4, "text {i}: max abs diff {max_diff}");
        }
    }
}

#[test]
fn cross_encoder_matches_transformers() {
    let dir = fixtures().join("tiny-cross-encoder");
    let ce = CrossEncoder::<burn::backend::Flex>::load(
        &dir,
        BatchPolicy::default(),
        &Default::default(),
    )
    .unwrap();
    let cases = jsonl(dir.join("expected_scores.jsonl"));
    assert!(!cases.is_empty());
    for case in &cases {
        let q = case["query"].as_str().unwrap();
        let p = case["passage"].as_str().unwrap();
        let expected = case["score"].as_f64().unwrap() as f32;
        let got = ce.score(q, &[p]).unwrap()[0];
        assert!(
            (got - expected).abs() <= 1e-4,
            "{q:?} / {p:?}: {got} vs {expected}"
        );
    }
    // Batched with different passage lengths: the same scores.
    let q = cases[0]["query"].as_str().unwrap();
    let passages: Vec<&str> = cases
        .iter()
        .filter(|c| c["query"].as_str() == Some(q))
        .map(|c| c["passage"].as_str().unwrap())
        .collect();
    let batch = ce.score(q, &passages).unwrap();
    for (p, got) in passages.iter().zip(batch) {
        let expected = cases
            .iter()
            .find(|c| c["query"].as_str() == Some(q) && c["passage"].as_str() == Some(p))
            .unwrap()["score"]
            .as_f64()
            .unwrap() as f32;
        assert!((got - expected).abs() <= 1e-4);
    }
}

#[test]
fn a_folder_without_a_model_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = Encoder::<burn::backend::Flex>::load(
        dir.path(),
        BatchPolicy::default(),
        &Default::default(),
    )
    .err()
    .expect("must fail");
    let msg = format!("{err:#}");
    assert!(msg.contains("config.json"), "{msg}");
    // A sentence encoder is not a cross-encoder.
    let err = CrossEncoder::<burn::backend::Flex>::load(
        &minilm(),
        BatchPolicy::default(),
        &Default::default(),
    )
    .err()
    .expect("must fail");
    assert!(format!("{err:#}").contains("classifier"), "{err:#}");
}
