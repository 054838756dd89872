//! Flame graphs: folded stacks (`root;...;leaf count`, one per line) rendered as an
//! inferno SVG, the same way for the server's profile endpoints and the tools.

/// Renders folded stack lines as a flame graph; `count_name` labels the weights. No
/// stacks at all (an idle server's CPU) give an SVG that says so.
pub fn svg<'a>(folded: impl IntoIterator<Item = &'a str>, title: &str, count_name: &str) -> Result<Vec<u8>, String> {
    let mut options = inferno::flamegraph::Options::default();
    options.title = title.to_owned();
    options.count_name = count_name.to_owned();
    let mut out = Vec::new();
    let lines: Vec<&str> = folded.into_iter().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return Ok(empty_svg(title, &format!("no {count_name}: nothing was sampled")).into_bytes());
    }
    inferno::flamegraph::from_lines(&mut options, lines, &mut out).map_err(|e| format!("flame graph: {e}"))?;
    Ok(out)
}

/// An SVG that says why there is no flame graph, for readers that always expect one.
pub fn empty_svg(title: &str, message: &str) -> String {
    let escape = |t: &str| t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    format!(
        "<?xml version=\"1.0\" standalone=\"no\"?>\n<svg version=\"1.1\" width=\"1200\" height=\"90\" xmlns=\"http://www.w3.org/2000/svg\">\n<text x=\"600\" y=\"30\" text-anchor=\"middle\" font-size=\"17\" font-family=\"Verdana\">{}</text>\n<text x=\"600\" y=\"65\" text-anchor=\"middle\" font-size=\"14\" font-family=\"Verdana\">{}</text>\n</svg>\n",
        escape(title),
        escape(message)
    )
}

/// Differential folded stacks (`stack before after`, what inferno draws red where a stack
/// grew and blue where it shrank) of two folded profiles; `before`'s counts are scaled by
/// `scale` first, so windows of different lengths compare as rates.
pub fn differential(before: &[String], after: &[String], scale: f64) -> Result<Vec<String>, String> {
    // Rounded with the error carried to the next line: the total scales exactly, and a
    // stack of one sample does not round to nothing every time.
    let mut carry = 0.0;
    let scaled: String = before
        .iter()
        .filter_map(|line| {
            let (stack, count) = line.rsplit_once(' ')?;
            let exact = count.parse::<f64>().ok()? * scale + carry;
            let value = exact.round().max(0.0);
            carry = exact - value;
            Some(format!("{stack} {}\n", value as u64))
        })
        .collect();
    let after = after.join("\n");
    let mut out = Vec::new();
    inferno::differential::from_readers(inferno::differential::Options::default(), scaled.as_bytes(), after.as_bytes(), &mut out)
        .map_err(|e| format!("differential flame graph: {e}"))?;
    Ok(String::from_utf8_lossy(&out).lines().map(str::to_owned).collect())
}
