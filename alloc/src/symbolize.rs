//! Heap profiles symbolized from the binary on disk, outside the profiled process.
//!
//! The server's heap profile (jemalloc's samples through `jemalloc_pprof`) carries raw
//! addresses, each relative to the file it is mapped from (the address the file's own ELF
//! headers give it), with the list of those files, the way jemalloc's own `prof` dumps do
//! for `jeprof`. Here each address becomes the inlined frames at that place, from
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
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mapping {
        #[prost(uint64, tag = "1")]
        pub id: u64,
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

/// One mapped file's debug information.
struct Binary {
    loader: addr2line::Loader,
}

impl Binary {
    fn open(path: &str) -> Option<Binary> {
        Some(Binary { loader: addr2line::Loader::new(path).ok()? })
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
/// by `symbolizer` where the profile has no names of its own.
pub fn folded(gzipped: &[u8], kind: Kind, symbolizer: &mut Symbolizer) -> Result<Vec<String>, String> {
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(gzipped).read_to_end(&mut raw).map_err(|e| format!("gunzip profile: {e}"))?;
    let profile = proto::Profile::decode(raw.as_slice()).map_err(|e| format!("decode profile: {e}"))?;
    let string = |i: i64| profile.string_table.get(i as usize).map_or("?", String::as_str);
    let functions: HashMap<u64, &str> = profile.function.iter().map(|f| (f.id, string(f.name))).collect();
    let files: HashMap<u64, &str> = profile.mapping.iter().map(|m| (m.id, string(m.filename))).collect();
    let locations: HashMap<u64, Vec<String>> = profile
        .location
        .iter()
        .map(|l| {
            let names = if l.line.is_empty() {
                match files.get(&l.mapping_id) {
                    Some(file) if !file.is_empty() => symbolizer.frames(file, l.address),
                    _ => vec![format!("{:#x}", l.address)],
                }
            } else {
                l.line.iter().map(|line| functions.get(&line.function_id).copied().unwrap_or("?").to_owned()).collect()
            };
            (l.id, names)
        })
        .collect();
    let mut stacks: HashMap<String, i64> = HashMap::new();
    for sample in &profile.sample {
        let mut frames = Vec::new();
        for id in sample.location_id.iter().rev() {
            match locations.get(id) {
                Some(names) => frames.extend(names.iter().rev().map(|n| n.replace(';', ":"))),
                None => frames.push(format!("{id:#x}")),
            }
        }
        match kind {
            Kind::Heap => {
                while frames.last().is_some_and(|f| is_allocator_frame(f)) {
                    frames.pop();
                }
            }
            // A CPU sample is taken in a signal handler: its leaf frames are the kernel's
            // signal trampoline, the handler, and the unwinder (whose generic names mention
            // the handler too); the interrupted code is under them.
            Kind::Cpu => {
                if let Some(handler) = frames.iter().position(|f| f == "perf_signal_handler" || f.ends_with("::perf_signal_handler")) {
                    frames.truncate(handler.saturating_sub(1));
                }
            }
        }
        *stacks.entry(frames.join(";")).or_default() += sample.value.first().copied().unwrap_or(0);
    }
    let mut lines: Vec<String> = stacks.into_iter().filter(|(_, w)| *w > 0).map(|(s, w)| format!("{s} {w}")).collect();
    lines.sort();
    Ok(lines)
}

/// A profile of raw return addresses in pprof's profile.proto, with the process's mappings
/// and no names: built in the profiled process without reading any debug information,
/// named out of it by [`folded`].
pub struct RawProfile {
    profile: proto::Profile,
    strings: HashMap<String, i64>,
    /// (mapping id, address in the file) -> location id.
    locations: HashMap<(u64, u64), u64>,
    /// Root frame name (a thread) -> location id.
    roots: HashMap<String, u64>,
    mappings: Vec<(usize, usize, usize, u64)>,
}

impl Default for RawProfile {
    fn default() -> Self {
        RawProfile::new()
    }
}

impl RawProfile {
    /// An empty profile of this process, its mappings read from /proc/self/maps and the
    /// ELF headers of each mapped file (once per process).
    pub fn new() -> RawProfile {
        let mut raw = RawProfile {
            profile: proto::Profile { string_table: vec![String::new()], ..Default::default() },
            strings: HashMap::new(),
            locations: HashMap::new(),
            roots: HashMap::new(),
            mappings: Vec::new(),
        };
        for (m, id) in mappings::MAPPINGS.iter().flatten().zip(1..) {
            let filename = raw.string(&m.pathname.to_string_lossy());
            raw.profile.mapping.push(proto::Mapping { id, filename });
            raw.mappings.push((m.memory_start, m.memory_end, m.memory_offset, id));
        }
        raw
    }

    fn string(&mut self, text: &str) -> i64 {
        if let Some(i) = self.strings.get(text) {
            return *i;
        }
        let i = self.profile.string_table.len() as i64;
        self.profile.string_table.push(text.to_owned());
        self.strings.insert(text.to_owned(), i);
        i
    }

    /// One stack: return addresses leaf first, under a root frame named `root` (its thread).
    pub fn add(&mut self, root: &str, return_addresses: impl Iterator<Item = usize>, weight: i64) {
        let mut ids = Vec::new();
        for address in return_addresses {
            // A return address is one past its call; the call is what to name.
            let address = address.saturating_sub(1);
            let Some(&(start, _, offset, mapping)) = self.mappings.iter().find(|(start, end, _, _)| (*start..*end).contains(&address)) else {
                continue;
            };
            let in_file = (address - start + offset) as u64;
            let next = self.profile.location.len() as u64 + 1;
            let id = *self.locations.entry((mapping, in_file)).or_insert(next);
            if id == next {
                self.profile.location.push(proto::Location { id, mapping_id: mapping, address: in_file, line: Vec::new() });
            }
            ids.push(id);
        }
        let root_id = match self.roots.get(root) {
            Some(id) => *id,
            None => {
                let name = self.string(root);
                let function = self.profile.function.len() as u64 + 1;
                self.profile.function.push(proto::Function { id: function, name });
                let id = self.profile.location.len() as u64 + 1;
                self.profile.location.push(proto::Location { id, mapping_id: 0, address: 0, line: vec![proto::Line { function_id: function }] });
                self.roots.insert(root.to_owned(), id);
                id
            }
        };
        ids.push(root_id);
        self.profile.sample.push(proto::Sample { location_id: ids, value: vec![weight] });
    }

    /// The profile as gzipped profile.proto.
    pub fn gzipped(&self) -> Result<Vec<u8>, String> {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(&self.profile.encode_to_vec()).and_then(|_| encoder.finish()).map_err(|e| format!("gzip: {e}"))
    }
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
            p.sample.push(proto::Sample { location_id: ids, value: vec![1] });
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&p.encode_to_vec()).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn a_cpu_sample_loses_the_signal_handler_and_its_trampoline() {
        let gz = profile(&[&["trace", "trace<pprof::profiler::perf_signal_handler::{closure_env#0}>", "perf_signal_handler", "libc.so.6+0x3c04f", "pushline::work", "main"]]);
        assert_eq!(folded(&gz, Kind::Cpu, &mut Symbolizer::default()).unwrap(), ["main;pushline::work 1"]);
    }

    #[test]
    fn a_heap_sample_loses_the_allocator_frames() {
        let gz = profile(&[&["_rjem_malloc", "alloc::alloc::alloc", "pushline::hub::register", "main"]]);
        assert_eq!(folded(&gz, Kind::Heap, &mut Symbolizer::default()).unwrap(), ["main;pushline::hub::register 1"]);
    }
}
