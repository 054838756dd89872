//! Prints results as a table and writes them as JSON.

use serde::Serialize;

#[derive(Serialize)]
pub struct Row {
    pub scenario: &'static str,
    pub metric: &'static str,
    pub value: f64,
    pub unit: &'static str,
}

impl Row {
    pub fn new(scenario: &'static str, metric: &'static str, value: f64, unit: &'static str) -> Row {
        Row { scenario, metric, value, unit }
    }
}

pub fn print(rows: &[Row]) {
    println!("{:<10} {:<40} {:>16} unit", "scenario", "metric", "value");
    for r in rows {
        // Small ratios (round trips per connect) need more than one decimal.
        let decimals = if r.value.abs() < 10.0 && r.value.fract() != 0.0 { 3 } else { 1 };
        println!("{:<10} {:<40} {:>16.*} {}", r.scenario, r.metric, decimals, r.value, r.unit);
    }
}

pub fn write_json(rows: &[Row], path: &std::path::Path) -> std::io::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(rows)?)
}
