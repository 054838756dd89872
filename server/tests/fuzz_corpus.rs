//! Every input kept in `fuzz/corpus/` replayed through its fuzz target's check, on stable
//! and in CI: what the fuzzers explored stays explored, and a crash they found, once its
//! input is added to the corpus, stays fixed.

#[path = "../../fuzz/checks.rs"]
mod checks;

#[test]
fn every_corpus_input_passes_its_check() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (target, check) in checks::TARGETS {
        let dir = root.join(target);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut inputs = 0;
        for entry in entries {
            let path = entry.unwrap().path();
            let input = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| check(&input));
            assert!(outcome.is_ok(), "{target}: {} fails its check", path.display());
            inputs += 1;
        }
        assert!(inputs > 0, "the {target} corpus is empty");
    }
}
