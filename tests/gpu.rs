//! The model parity tests (`actors/tests/parity.rs`) as a test binary of the
//! ragd package, built only with `--features cuda`. Building them here, with
//! the daemon's feature set, reuses the daemon's build of ragd-actors, and
//! `ops/bench/gpu/pack.sh` carries this binary to a GPU machine, where its
//! CUDA cases run (`ops/bench/gpu/run.sh`). CI has no GPU and never builds it.
#![cfg(feature = "cuda")]

#[path = "../actors/tests/parity.rs"]
mod parity;
