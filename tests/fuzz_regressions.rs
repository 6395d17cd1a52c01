//! The fuzz harness's findings, replayed: every case under fuzz/regressions/<target>/ (inputs
//! that crashed, hung or exhausted memory before they were fixed) must now be refused with an
//! error, without a panic. Also: every seed loads, and a short fixed-seed run finds no panic.

use std::path::PathBuf;
use std::time::Instant;

use nanomoe::fuzz::{mutate::mutate, read_case, run_case, seeds, Outcome, Target};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

#[test]
fn regressions_are_refused_without_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let mut n = 0;
    for t in Target::ALL {
        let Ok(rd) = std::fs::read_dir(root().join("regressions").join(t.name())) else { continue };
        for e in rd {
            let dir = e.unwrap().path();
            let case = read_case(&dir).unwrap();
            let start = Instant::now();
            match run_case(t, &case, &tmp.path().join("work")) {
                Ok(Outcome::Refused(_)) => {}
                other => panic!("{}: {other:?}", dir.display()),
            }
            assert!(start.elapsed().as_secs_f64() < 10.0, "{}: {:?}", dir.display(), start.elapsed());
            n += 1;
        }
    }
    assert!(n >= 12, "only {n} regression cases found");
}

#[test]
fn seeds_load_and_a_short_run_finds_no_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(20261201);
    for t in Target::ALL {
        let s = seeds(t, &root().join("corpus"), &tmp.path().join("seeds")).unwrap();
        assert!(!s.is_empty(), "{}", t.name());
        for case in &s {
            assert_eq!(run_case(t, case, &tmp.path().join("w")), Ok(Outcome::Loaded), "{}", t.name());
        }
        for _ in 0..40 {
            let mut case = s[rng.random_range(0..s.len())].clone();
            let f = rng.random_range(0..case.len());
            case[f].1 = mutate(&case[f].1, &mut rng);
            if let Err(p) = run_case(t, &case, &tmp.path().join("w")) {
                panic!("{}: panic {p}", t.name());
            }
        }
    }
}
