//! The JavaScript client's own tests (`clients/js`, Node's test runner), run against this
//! build's server binary: reconnects, resume with no loss, SSE fallback, token refresh, and
//! in headless chromium the admin dashboard, the demo page and SSE from another origin.

use std::path::Path;
use std::process::Command;

#[test]
fn the_javascript_client_passes_its_tests_against_this_server() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/js");
    for tool in ["node", "npm"] {
        let found = Command::new(tool).arg("--version").output();
        assert!(found.is_ok_and(|o| o.status.success()), "{tool} is not installed: apt-get install -y nodejs npm (scripts/test does this as root)");
    }
    // No browser download: the browser tests drive Debian's chromium.
    let installed = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .env("PUPPETEER_SKIP_DOWNLOAD", "1")
        .current_dir(&dir)
        .output()
        .expect("npm runs");
    assert!(installed.status.success(), "npm ci failed:\n{}", String::from_utf8_lossy(&installed.stderr));
    let run = Command::new("node")
        .args(["--test", "test/"])
        .env("PUSHLINE_BIN", env!("CARGO_BIN_EXE_pushline"))
        .current_dir(&dir)
        .output()
        .expect("node runs");
    let out = String::from_utf8_lossy(&run.stdout);
    eprintln!("{out}");
    assert!(run.status.success(), "the JavaScript tests failed:\n{out}\n{}", String::from_utf8_lossy(&run.stderr));
    assert!(out.contains("# fail 0") && !out.contains("# pass 0"), "{out}");
}
