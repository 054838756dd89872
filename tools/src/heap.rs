//! `heap`: live heap snapshots of a server (folded stacks of live bytes, named here from
//! the binary on disk, an SVG, and the site table), and what grew between two of them:
//! the leak hunt.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::target::Admin;

/// Writes `<prefix>.folded`, `<prefix>.svg` and `<prefix>.sites.json`; returns their paths.
/// The server sends raw addresses; they are named here, from the binaries on disk, so the
/// server never loads its own debug information.
pub fn snapshot(admin: &Admin, prefix: &Path) -> Result<Vec<PathBuf>, String> {
    let profile = admin.get("/debug/pprof/heap?format=pprof&symbolize=none", Duration::from_secs(60))?;
    let folded = pushline_alloc::symbolize::folded(&profile, pushline_alloc::symbolize::Kind::Heap, &mut Default::default())?.join("\n") + "\n";
    let memory: Value = serde_json::from_slice(&admin.get("/debug/memory", Duration::from_secs(30))?).map_err(|e| e.to_string())?;
    let svg = crate::flame::svg(&folded, "Pushline heap: live bytes by stack (sampled)", "bytes")?;
    let paths = ["folded", "svg", "sites.json"].map(|ext| PathBuf::from(format!("{}.{ext}", prefix.display())));
    let write = |path: &Path, bytes: &[u8]| std::fs::write(path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()));
    write(&paths[0], folded.as_bytes())?;
    write(&paths[1], &svg)?;
    write(&paths[2], serde_json::to_string_pretty(&memory["sites"]).unwrap_or_default().as_bytes())?;
    Ok(paths.to_vec())
}

/// Growth between two snapshots: by stack (from the folded files) and by site, largest first.
pub struct Growth {
    pub by_stack: Vec<(String, i64)>,
    pub by_site: Vec<(String, i64)>,
}

fn read_folded(path: &Path) -> Result<HashMap<String, i64>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut map = HashMap::new();
    for line in text.lines() {
        if let Some((stack, n)) = line.rsplit_once(' ') {
            *map.entry(stack.to_owned()).or_default() += n.trim().parse::<i64>().unwrap_or(0);
        }
    }
    Ok(map)
}

fn read_sites(path: &Path) -> HashMap<String, i64> {
    let Ok(text) = std::fs::read_to_string(path) else { return HashMap::new() };
    let sites: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    sites
        .as_array()
        .map(|a| a.iter().map(|s| (s["site"].as_str().unwrap_or("?").to_owned(), s["live_bytes"].as_i64().unwrap_or(0))).collect())
        .unwrap_or_default()
}

/// `before` and `after` are snapshot prefixes (or their `.folded` files).
pub fn diff(before: &Path, after: &Path) -> Result<Growth, String> {
    let prefix = |p: &Path| PathBuf::from(p.to_string_lossy().trim_end_matches(".folded").to_owned());
    let (before, after) = (prefix(before), prefix(after));
    let with = |p: &Path, ext: &str| PathBuf::from(format!("{}.{ext}", p.display()));
    let (a, b) = (read_folded(&with(&before, "folded"))?, read_folded(&with(&after, "folded"))?);
    let mut by_stack: Vec<(String, i64)> = b.iter().map(|(s, n)| (s.clone(), n - a.get(s).copied().unwrap_or(0))).collect();
    by_stack.extend(a.iter().filter(|(s, _)| !b.contains_key(*s)).map(|(s, n)| (s.clone(), -n)));
    by_stack.retain(|(_, d)| *d != 0);
    by_stack.sort_by_key(|(_, grew)| std::cmp::Reverse(*grew));
    let (sa, sb) = (read_sites(&with(&before, "sites.json")), read_sites(&with(&after, "sites.json")));
    let mut by_site: Vec<(String, i64)> = sb.iter().map(|(s, n)| (s.clone(), n - sa.get(s).copied().unwrap_or(0))).collect();
    by_site.sort_by_key(|(_, grew)| std::cmp::Reverse(*grew));
    Ok(Growth { by_stack, by_site })
}

/// A folded stack in a line: its leaf frame, then the nearest frames of Pushline's own
/// code (which say who allocated), leaf first.
pub fn short_stack(stack: &str, frames: usize) -> String {
    let mut leaf_first: Vec<&str> = stack.split(';').collect();
    leaf_first.reverse();
    let mut shown: Vec<&str> = leaf_first.iter().take(1).copied().collect();
    shown.extend(leaf_first.iter().skip(1).filter(|f| f.contains("pushline::")).take(frames.saturating_sub(1)));
    if shown.len() == 1 {
        shown = leaf_first.into_iter().take(frames).collect();
    }
    shown.join(" <- ")
}
