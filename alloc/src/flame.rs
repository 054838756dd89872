//! Flame graphs: folded stacks (`root;...;leaf count`, one per line) rendered as an
//! inferno SVG, the same way for the server's profile endpoints and the tools.

/// Renders folded stack lines as a flame graph; `count_name` labels the weights.
pub fn svg<'a>(folded: impl IntoIterator<Item = &'a str>, title: &str, count_name: &str) -> Result<Vec<u8>, String> {
    let mut options = inferno::flamegraph::Options::default();
    options.title = title.to_owned();
    options.count_name = count_name.to_owned();
    let mut out = Vec::new();
    let lines = folded.into_iter().filter(|l| !l.trim().is_empty());
    inferno::flamegraph::from_lines(&mut options, lines, &mut out).map_err(|e| format!("flame graph: {e}"))?;
    Ok(out)
}
