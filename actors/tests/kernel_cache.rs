//! `model::use_kernel_cache` on a real cubecl JIT backend: burn-wgpu on
//! Vulkan, which Mesa's lavapipe runs on a CPU (`apt-get install
//! mesa-vulkan-drivers`; `cargo test -p ragd-actors --features vulkan --test
//! kernel_cache`). burn-cuda reads the same configuration. cubecl's
//! configuration is global to a process, hence one test in its own binary.
#![cfg(feature = "vulkan")]

use ragd_actors::model::{use_kernel_cache, BatchPolicy, Encoder, Vulkan};
use std::path::{Path, PathBuf};

fn files(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .collect()
}

#[test]
fn a_gpu_backend_keeps_its_kernels_and_tuning_in_the_configured_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let kernels = tmp.path().join("kernels");
    use_kernel_cache(&kernels).unwrap();
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/all-MiniLM-L6-v2");
    let enc = Encoder::<Vulkan>::load(&model, BatchPolicy::default(), &Default::default()).unwrap();
    // Two texts of different lengths: a padded batch, so matmuls, the
    // attention bias and reductions all compile and tune.
    let v = enc
        .embed(&["leave policy", "who approves travel expenses over budget?"])
        .unwrap();
    assert_eq!(v.len(), 2);

    let found = files(&kernels);
    let named = |suffix: &str| {
        found
            .iter()
            .filter(|p| p.to_string_lossy().ends_with(suffix))
            .count()
    };
    // Compiled kernels (cubecl's chunked compilation cache) and autotune picks.
    assert!(named(".cbor") > 0, "no compiled kernels kept: {found:?}");
    assert!(
        named(".json.log") > 0,
        "no autotune results kept: {found:?}"
    );

    // Once a GPU model has loaded, cubecl's configuration is fixed: a later
    // call leaves the cache where it is rather than failing the caller.
    let other = tmp.path().join("other");
    use_kernel_cache(&other).unwrap();
    assert!(!other.exists());
}
