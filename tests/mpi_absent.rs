//! A build without the `mpi` feature started by mpirun refuses to train (N copies of one
//! run writing one out_dir), saying how to build the distributed trainer.
#![cfg(not(feature = "mpi"))]

#[test]
fn started_by_mpirun_without_mpi_support_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nanomoe"))
        .args(["train", "--max_iters=1", &format!("--out_dir={}", tmp.path().join("o").display())])
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: invalid config: started as one of 2 processes, but this nanomoe was built without MPI: \
         build it with `cargo build --release --features mpi` (needs libopenmpi-dev and libclang-dev)"
    );
    assert!(!tmp.path().join("o").exists());
}
