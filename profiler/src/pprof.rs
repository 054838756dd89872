//! Samples as pprof's profile.proto, with the official message types (the `pprof` crate's
//! prost code): sample types `samples/count` and `cpu/nanoseconds`, the period, when and
//! for how long, and the process's mappings with their address ranges, file offsets and
//! build ids, so `go tool pprof` names the frames from the binary on disk. Locations are
//! runtime addresses; each sample carries its thread as the label `thread`.

use std::collections::HashMap;
use std::io::{Read, Write};

use pprof::protos::{Function, Label, Line, Location, Mapping, Message, Profile, Sample, ValueType};

use crate::table::Samples;

struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Strings {
        Strings { table: vec![String::new()], index: HashMap::new() }
    }

    fn id(&mut self, text: &str) -> i64 {
        if let Some(i) = self.index.get(text) {
            return *i;
        }
        let i = self.table.len() as i64;
        self.table.push(text.to_owned());
        self.index.insert(text.to_owned(), i);
        i
    }
}

/// `samples`, taken at `hz` from `start_ns` (Unix ns) for `duration_ns`, as gzipped
/// profile.proto.
pub fn encode(samples: &Samples, hz: u32, start_ns: i64, duration_ns: i64) -> Vec<u8> {
    encode_diff(samples, None, hz, start_ns, duration_ns)
}

/// [`encode`], less `base` scaled by its factor (a window of another length compares as a
/// rate): the base's stacks are samples with negative values, which is how `go tool
/// pprof -diff_base` merges a base into a profile, so every reader shows what grew.
pub fn encode_diff(samples: &Samples, base: Option<(&Samples, f64)>, hz: u32, start_ns: i64, duration_ns: i64) -> Vec<u8> {
    let mut strings = Strings::new();
    let period = 1_000_000_000 / hz.max(1) as i64;
    let mut profile = Profile {
        sample_type: vec![
            ValueType { ty: strings.id("samples"), unit: strings.id("count") },
            ValueType { ty: strings.id("cpu"), unit: strings.id("nanoseconds") },
        ],
        period_type: Some(ValueType { ty: strings.id("cpu"), unit: strings.id("nanoseconds") }),
        period,
        time_nanos: start_ns,
        duration_nanos: duration_ns,
        ..Default::default()
    };
    let segments = match mappings::MAPPINGS.as_ref() {
        Some(segments) => segments.as_slice(),
        None => &[],
    };
    for (segment, id) in segments.iter().zip(1..) {
        profile.mapping.push(Mapping {
            id,
            memory_start: segment.memory_start as u64,
            memory_limit: segment.memory_end as u64,
            file_offset: segment.file_offset,
            // Absolute, so a reader run from anywhere finds the file.
            filename: strings.id(&std::fs::canonicalize(&segment.pathname).unwrap_or_else(|_| segment.pathname.clone()).to_string_lossy()),
            build_id: segment.build_id.as_ref().map_or(0, |b| strings.id(&b.to_string())),
            ..Default::default()
        });
    }
    let thread_key = strings.id("thread");
    let mut locations: HashMap<u64, u64> = HashMap::new();
    let mut full: Option<u64> = None;
    let added = samples.stacks.iter().map(|s| (s, 1.0));
    let taken = base.into_iter().flat_map(|(base, scale)| base.stacks.iter().map(move |s| (s, -scale)));
    // Scaled counts are rounded with the error carried to the next stack, so the base's
    // total scales exactly and a stack of one sample does not round to nothing every time.
    let mut carried = (0.0f64, 0.0f64);
    for ((thread, frames, count), factor) in added.chain(taken) {
        let mut ids = Vec::with_capacity(frames.len());
        for (i, frame) in frames.iter().enumerate() {
            // A return address is one past its call: the call is what to name.
            let address = if i == 0 { *frame } else { frame.saturating_sub(1) };
            let next = profile.location.len() as u64 + 1;
            let id = *locations.entry(address).or_insert(next);
            if id == next {
                let mapping_id = segments.iter().zip(1..).find(|(s, _)| (s.memory_start as u64..s.memory_end as u64).contains(&address)).map_or(0, |(_, id)| id);
                profile.location.push(Location { id, mapping_id, address, ..Default::default() });
            }
            ids.push(id);
        }
        if frames.is_empty() {
            // What the stack table could not hold: one named location.
            let id = *full.get_or_insert_with(|| {
                let name = strings.id(thread);
                let function = profile.function.len() as u64 + 1;
                profile.function.push(Function { id: function, name, system_name: name, ..Default::default() });
                let id = profile.location.len() as u64 + 1;
                profile.location.push(Location { id, line: vec![Line { function_id: function, line: 0 }], ..Default::default() });
                id
            });
            ids.push(id);
        }
        profile.sample.push(Sample {
            location_id: ids,
            value: vec![scaled(count.samples, factor, &mut carried.0), scaled(count.cpu_ns, factor, &mut carried.1)],
            label: vec![Label { key: thread_key, str: strings.id(thread), ..Default::default() }],
        });
    }
    profile.string_table = strings.table;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing into a Vec does not fail.
    let _ = gz.write_all(&profile.encode_to_vec());
    gz.finish().unwrap_or_default()
}

/// `count` times `factor`, rounded, the rounding error carried in `carry`.
fn scaled(count: u64, factor: f64, carry: &mut f64) -> i64 {
    let exact = count as f64 * factor + *carry;
    let value = exact.round();
    *carry = exact - value;
    value as i64
}

/// `gzipped` (a profile.proto of raw addresses, this one's or jemalloc's) with every
/// location named: `names(file, address, memory_start, memory_limit, file_offset)` gives
/// its frames, innermost first. A reader then needs no binary, and no symbolizer of its own.
pub fn named(gzipped: &[u8], mut names: impl FnMut(&str, u64, u64, u64, u64) -> Vec<String>) -> Result<Vec<u8>, String> {
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(gzipped).read_to_end(&mut raw).map_err(|e| format!("gunzip profile: {e}"))?;
    let mut profile = Profile::decode(raw.as_slice()).map_err(|e| format!("decode profile: {e}"))?;
    let mut strings = Strings { index: profile.string_table.iter().enumerate().map(|(i, s)| (s.clone(), i as i64)).collect(), table: std::mem::take(&mut profile.string_table) };
    let mut functions: HashMap<String, u64> = HashMap::new();
    let mappings: HashMap<u64, usize> = profile.mapping.iter().enumerate().map(|(i, m)| (m.id, i)).collect();
    for location in profile.location.iter_mut().filter(|l| l.line.is_empty()) {
        let Some(&m) = mappings.get(&location.mapping_id) else { continue };
        let mapping = &profile.mapping[m];
        let file = strings.table.get(mapping.filename as usize).cloned().unwrap_or_default();
        if file.is_empty() {
            continue;
        }
        for name in names(&file, location.address, mapping.memory_start, mapping.memory_limit, mapping.file_offset) {
            let next = profile.function.len() as u64 + 1;
            let function_id = *functions.entry(name.clone()).or_insert(next);
            if function_id == next {
                let name = strings.id(&name);
                profile.function.push(Function { id: function_id, name, system_name: name, ..Default::default() });
            }
            location.line.push(Line { function_id, line: 0 });
        }
    }
    // Every location is named as far as it can be: a reader need not try again (go tool
    // pprof would load the binary's DWARF to name a mapping not marked so).
    for mapping in &mut profile.mapping {
        mapping.has_functions = true;
        mapping.has_filenames = true;
        mapping.has_line_numbers = true;
        mapping.has_inline_frames = true;
    }
    profile.string_table = strings.table;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&profile.encode_to_vec()).and_then(|_| gz.finish()).map_err(|e| format!("gzip: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scaled_base_keeps_its_total_when_every_stack_is_small() {
        let mut carry = 0.0;
        let third: i64 = (0..9).map(|_| scaled(1, -1.0 / 3.0, &mut carry)).sum();
        assert_eq!(third, -3, "nine one-sample stacks at a third are three samples, not none");
        let mut carry = 0.0;
        assert_eq!((0..4).map(|_| scaled(3, 1.5, &mut carry)).sum::<i64>(), 18);
    }
}
