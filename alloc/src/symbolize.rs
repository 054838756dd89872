//! Profiles symbolized from the binary on disk, outside the profiled process.
//!
//! The server's heap profile (jemalloc's samples through `jemalloc_pprof`) carries raw
//! addresses, each relative to the file it is mapped from (the address the file's own ELF
//! headers give it), with the list of those files, the way jemalloc's own `prof` dumps do
//! for `jeprof`; its CPU profile (`pushline-profiler`) carries runtime addresses with each
//! mapping's range and file offset, as `go tool pprof` expects. Here each address becomes the inlined frames at that place, from
//! the file's DWARF (addr2line), or from its symbol table when it has no DWARF. Loading
//! DWARF costs tens of megabytes, which is why the server never does it itself: the
//! tools do, or the server's short-lived worker (`pushline symbolize-heap`), whose memory
//! goes back when it exits.

use std::collections::HashMap;
use std::io::Read;

use prost::Message;

/// The parts of pprof's profile.proto a folded stack needs (unknown fields are skipped).
mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "3")]
        pub mapping: Vec<Mapping>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        #[prost(int64, tag = "1")]
        pub key: i64,
        #[prost(int64, tag = "2")]
        pub str: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mapping {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub memory_start: u64,
        #[prost(uint64, tag = "3")]
        pub memory_limit: u64,
        #[prost(uint64, tag = "4")]
        pub file_offset: u64,
        #[prost(int64, tag = "5")]
        pub filename: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        #[prost(uint64, tag = "3")]
        pub address: u64,
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
    }
}

/// One mapped file's debug information, and where its loaded segments sit in the file.
struct Binary {
    loader: addr2line::Loader,
    /// (file offset, size, virtual address) of each loadable segment.
    segments: Vec<(u64, u64, u64)>,
}

impl Binary {
    fn open(path: &str) -> Option<Binary> {
        use object::{Object, ObjectSegment};
        let data = std::fs::read(path).ok()?;
        let file = object::File::parse(data.as_slice()).ok()?;
        let segments = file.segments().map(|s| (s.file_range().0, s.file_range().1, s.address())).collect();
        Some(Binary { loader: addr2line::Loader::new(path).ok()?, segments })
    }

    /// The virtual address (as the file lays itself out) of the byte at `offset` in the file.
    fn address_of_offset(&self, offset: u64) -> Option<u64> {
        self.segments.iter().find(|(at, size, _)| (*at..at + size).contains(&offset)).map(|(at, _, address)| address + (offset - at))
    }

    /// The frames at `address` (the file's own virtual address), innermost (inlined) first.
    fn frames(&self, address: u64) -> Vec<String> {
        let mut names = Vec::new();
        if let Ok(mut frames) = self.loader.find_frames(address) {
            while let Ok(Some(frame)) = frames.next() {
                if let Some(name) = frame.function.as_ref().and_then(|f| f.demangle().ok()) {
                    names.push(without_hash(&name).to_owned());
                }
            }
        }
        if names.is_empty() {
            if let Some(symbol) = self.loader.find_symbol(address) {
                names.push(format!("{:#}", rustc_demangle::demangle(symbol)));
            }
        }
        names
    }
}

/// `a::b::h0123456789abcdef` -> `a::b`.
fn without_hash(name: &str) -> &str {
    match name.rsplit_once("::h") {
        Some((head, hash)) if hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()) => head,
        _ => name,
    }
}

/// Names addresses, opening each mapped file once.
#[derive(Default)]
pub struct Symbolizer {
    binaries: HashMap<String, Option<Binary>>,
}

impl Symbolizer {
    /// The frames at `address` in the file `path` (an address of the file's own, as its
    /// ELF headers lay it out), innermost first; the file and address when they cannot be
    /// named.
    pub fn frames(&mut self, path: &str, address: u64) -> Vec<String> {
        let binary = self.binaries.entry(path.to_owned()).or_insert_with(|| Binary::open(path));
        let names = binary.as_ref().map(|b| b.frames(address)).unwrap_or_default();
        Self::or_place(names, path, address)
    }

    /// The frames at the byte `offset` of the file `path` (where a mapping with its file
    /// offset puts a runtime address), innermost first.
    pub fn frames_at_offset(&mut self, path: &str, offset: u64) -> Vec<String> {
        let binary = self.binaries.entry(path.to_owned()).or_insert_with(|| Binary::open(path));
        let address = binary.as_ref().and_then(|b| b.address_of_offset(offset));
        let names = binary.as_ref().zip(address).map(|(b, address)| b.frames(address)).unwrap_or_default();
        Self::or_place(names, path, address.unwrap_or(offset))
    }

    /// The frames at `address` of a profile location in a mapping of the file `path`,
    /// innermost first. A mapping with an address range holds runtime addresses, named
    /// at their offset in the file; one without (`memory_limit` 0 or all ones, as
    /// jemalloc's profiles write it) holds the file's own addresses.
    pub fn at(&mut self, path: &str, address: u64, memory_start: u64, memory_limit: u64, file_offset: u64) -> Vec<String> {
        if memory_limit != 0 && memory_limit != u64::MAX {
            self.frames_at_offset(path, address.wrapping_sub(memory_start).wrapping_add(file_offset))
        } else {
            self.frames(path, address)
        }
    }

    fn or_place(names: Vec<String>, path: &str, address: u64) -> Vec<String> {
        if names.is_empty() {
            let file = path.rsplit('/').next().unwrap_or(path);
            vec![format!("{file}+{address:#x}")]
        } else {
            names
        }
    }
}

/// What a profile counts, which decides whether its leaf frames are kept.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// Live bytes by allocating stack: the allocator's own frames, which end every stack
    /// and say nothing about who allocated, are left off.
    Heap,
    /// CPU samples: every frame is kept.
    Cpu,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Heap => "heap",
            Kind::Cpu => "cpu",
        }
    }

    pub fn parse(text: &str) -> Option<Kind> {
        [Kind::Heap, Kind::Cpu].into_iter().find(|k| k.as_str() == text)
    }
}

/// Folded stacks (`root;...;leaf weight`) of a gzipped profile.proto, its locations named
/// by `symbolizer` where the profile has no names of its own. A sample's `thread` label,
/// when it has one, is its root frame.
///
/// A mapping with an address range (what the CPU profiler writes) holds runtime
/// addresses: each is named at its offset in the mapped file. One without (jemalloc's
/// heap profile, `memory_limit` unset or all ones) holds the file's own addresses.
pub fn folded(gzipped: &[u8], kind: Kind, symbolizer: &mut Symbolizer) -> Result<Vec<String>, String> {
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(gzipped).read_to_end(&mut raw).map_err(|e| format!("gunzip profile: {e}"))?;
    let profile = proto::Profile::decode(raw.as_slice()).map_err(|e| format!("decode profile: {e}"))?;
    let string = |i: i64| profile.string_table.get(i as usize).map_or("?", String::as_str);
    let functions: HashMap<u64, &str> = profile.function.iter().map(|f| (f.id, string(f.name))).collect();
    let mappings: HashMap<u64, &proto::Mapping> = profile.mapping.iter().map(|m| (m.id, m)).collect();
    let locations: HashMap<u64, Vec<String>> = profile
        .location
        .iter()
        .map(|l| {
            let names = if !l.line.is_empty() {
                l.line.iter().map(|line| functions.get(&line.function_id).copied().unwrap_or("?").to_owned()).collect()
            } else {
                match mappings.get(&l.mapping_id).map(|m| (string(m.filename), m)) {
                    Some((file, m)) if !file.is_empty() => symbolizer.at(file, l.address, m.memory_start, m.memory_limit, m.file_offset),
                    _ => vec![format!("{:#x}", l.address)],
                }
            };
            (l.id, names)
        })
        .collect();
    let thread_key = profile.string_table.iter().position(|s| s == "thread").map(|i| i as i64);
    let mut stacks: HashMap<String, i64> = HashMap::new();
    for sample in &profile.sample {
        let mut frames: Vec<String> = sample.label.iter().filter(|l| Some(l.key) == thread_key).map(|l| string(l.str).replace(';', ":")).collect();
        for id in sample.location_id.iter().rev() {
            match locations.get(id) {
                Some(names) => frames.extend(names.iter().rev().map(|n| n.replace(';', ":"))),
                None => frames.push(format!("{id:#x}")),
            }
        }
        if kind == Kind::Heap {
            while frames.last().is_some_and(|f| is_allocator_frame(f)) {
                frames.pop();
            }
        }
        *stacks.entry(frames.join(";")).or_default() += sample.value.first().copied().unwrap_or(0);
    }
    let mut lines: Vec<String> = stacks.into_iter().filter(|(_, w)| *w > 0).map(|(s, w)| format!("{s} {w}")).collect();
    lines.sort();
    Ok(lines)
}

/// Frames of the allocator and of the standard library's allocation paths.
fn is_allocator_frame(frame: &str) -> bool {
    const PREFIXES: [&str; 16] = [
        "prof_", "_rjem_", "imalloc", "je_", "ialloc", "irealloc", "__rustc::", "__rust_", "__rdl_",
        "tikv_jemallocator::", "<tikv_jemallocator::", "pushline_alloc::", "<pushline_alloc::",
        "alloc::", "<alloc::", "hashbrown::raw::",
    ];
    PREFIXES.iter().any(|p| frame.starts_with(p)) || frame.starts_with("<hashbrown::alloc")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A profile whose locations carry names of their own, leaf first in each sample.
    fn profile(samples: &[&[&str]]) -> Vec<u8> {
        use std::io::Write;
        let mut p = proto::Profile { string_table: vec![String::new()], ..Default::default() };
        for stack in samples {
            let mut ids = Vec::new();
            for name in stack.iter() {
                p.string_table.push(name.to_string());
                let function = p.function.len() as u64 + 1;
                p.function.push(proto::Function { id: function, name: p.string_table.len() as i64 - 1 });
                let id = p.location.len() as u64 + 1;
                p.location.push(proto::Location { id, mapping_id: 0, address: 0, line: vec![proto::Line { function_id: function }] });
                ids.push(id);
            }
            p.sample.push(proto::Sample { location_id: ids, value: vec![1], label: Vec::new() });
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&p.encode_to_vec()).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn a_heap_sample_loses_the_allocator_frames() {
        let gz = profile(&[&["_rjem_malloc", "alloc::alloc::alloc", "pushline::hub::register", "main"]]);
        assert_eq!(folded(&gz, Kind::Heap, &mut Symbolizer::default()).unwrap(), ["main;pushline::hub::register 1"]);
    }
}
