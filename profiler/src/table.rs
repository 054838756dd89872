//! What the samples become: each distinct stack interned once (bounded in frames), and
//! per-minute counts of (stack, samples, CPU nanoseconds) for the kept window. Past its
//! cap the table counts samples under one `[stack table full]` stack.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// A stack as stored: its thread's name id first, then its frames, leaf first.
pub type Stack = Arc<[u64]>;

/// Id of the stack that counts what did not fit.
pub const FULL: u32 = 0;

#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Count {
    pub samples: u64,
    pub cpu_ns: u64,
}

impl Count {
    fn add(&mut self, other: Count) {
        self.samples += other.samples;
        self.cpu_ns += other.cpu_ns;
    }
}

struct Minute {
    /// Unix minute.
    at: u64,
    counts: HashMap<u32, Count>,
}

pub struct Table {
    ids: HashMap<Stack, u32>,
    /// By id; `FULL`'s entry is empty.
    stacks: Vec<Stack>,
    /// Frames held in `stacks`, against `max_frames`.
    frames: usize,
    max_frames: usize,
    /// Thread names, by the id stacks carry.
    threads: Vec<String>,
    minutes: VecDeque<Minute>,
    window_minutes: u64,
    /// Samples counted under `FULL`.
    pub overflowed: u64,
}

/// Counts of stacks over some span, with the names the stacks refer to.
#[derive(Default, Debug)]
pub struct Samples {
    /// (thread name, frames leaf first, count).
    pub stacks: Vec<(String, Vec<u64>, Count)>,
}

impl Samples {
    pub fn total(&self) -> Count {
        let mut total = Count::default();
        for (_, _, count) in &self.stacks {
            total.add(*count);
        }
        total
    }
}

impl Table {
    pub fn new(max_frames: usize, window_minutes: u64) -> Table {
        Table {
            ids: HashMap::new(),
            stacks: vec![Arc::from(Vec::new())],
            frames: 0,
            max_frames,
            threads: Vec::new(),
            minutes: VecDeque::new(),
            window_minutes: window_minutes.max(1),
            overflowed: 0,
        }
    }

    pub fn thread_id(&mut self, name: &str) -> u64 {
        match self.threads.iter().position(|t| t == name) {
            Some(i) => i as u64,
            None => {
                self.threads.push(name.to_owned());
                self.threads.len() as u64 - 1
            }
        }
    }

    /// The id of `stack` (thread id, then frames), interned if there is room.
    pub fn intern(&mut self, stack: &[u64]) -> u32 {
        if let Some(id) = self.ids.get(stack) {
            return *id;
        }
        if self.frames + stack.len() > self.max_frames || self.stacks.len() >= u32::MAX as usize {
            return FULL;
        }
        let stack: Stack = Arc::from(stack);
        let id = self.stacks.len() as u32;
        self.frames += stack.len();
        self.stacks.push(stack.clone());
        self.ids.insert(stack, id);
        id
    }

    /// Counts `count` for stack `id` in the minute `minute` (Unix minutes).
    pub fn count(&mut self, minute: u64, id: u32, count: Count) {
        if id == FULL {
            self.overflowed += count.samples;
        }
        if self.minutes.back().is_none_or(|m| m.at < minute) {
            self.minutes.push_back(Minute { at: minute, counts: HashMap::new() });
            while self.minutes.front().is_some_and(|m| m.at + self.window_minutes <= minute) {
                self.minutes.pop_front();
            }
            self.collect_garbage();
        }
        // A minute older than the newest kept (the clock stepped back): the newest takes it.
        if let Some(bucket) = self.minutes.back_mut() {
            bucket.counts.entry(id).or_default().add(count);
        }
    }

    /// Past half its cap, the table keeps only stacks the kept minutes still count.
    fn collect_garbage(&mut self) {
        if self.frames * 2 <= self.max_frames {
            return;
        }
        let mut remap = HashMap::new();
        let mut stacks = vec![self.stacks[0].clone()];
        let mut frames = 0;
        for minute in &self.minutes {
            for id in minute.counts.keys().filter(|id| **id != FULL) {
                remap.entry(*id).or_insert_with(|| {
                    let stack = self.stacks[*id as usize].clone();
                    frames += stack.len();
                    stacks.push(stack);
                    stacks.len() as u32 - 1
                });
            }
        }
        for minute in &mut self.minutes {
            minute.counts = minute.counts.drain().map(|(id, c)| (if id == FULL { FULL } else { remap[&id] }, c)).collect();
        }
        self.ids = stacks.iter().enumerate().skip(1).map(|(i, s)| (s.clone(), i as u32)).collect();
        self.stacks = stacks;
        self.frames = frames;
    }

    /// What the minutes from `from` to `to` (Unix minutes, inclusive) counted.
    pub fn span(&self, from: u64, to: u64) -> Samples {
        let mut merged: HashMap<u32, Count> = HashMap::new();
        for minute in self.minutes.iter().filter(|m| (from..=to).contains(&m.at)) {
            for (id, count) in &minute.counts {
                merged.entry(*id).or_default().add(*count);
            }
        }
        self.samples(merged)
    }

    /// `counts` by stack id as named stacks.
    pub fn samples(&self, counts: HashMap<u32, Count>) -> Samples {
        self.named(counts.into_iter().map(|(id, count)| (self.stack(id), count)))
    }

    /// The stack of `id`; None for [`FULL`].
    pub fn stack(&self, id: u32) -> Option<Stack> {
        self.stacks.get(id as usize).filter(|_| id != FULL).cloned()
    }

    /// Counts by stack (None: what did not fit) as named stacks.
    pub fn named(&self, counts: impl Iterator<Item = (Option<Stack>, Count)>) -> Samples {
        let stacks = counts
            .map(|(stack, count)| match stack {
                Some(stack) => {
                    let thread = self.threads.get(stack[0] as usize).cloned().unwrap_or_default();
                    (thread, stack[1..].to_vec(), count)
                }
                None => ("[stack table full]".to_owned(), Vec::new(), count),
            })
            .collect();
        Samples { stacks }
    }

    /// The oldest minute kept, if any.
    pub fn window_minutes(&self) -> u64 {
        self.window_minutes
    }

    pub fn oldest(&self) -> Option<u64> {
        self.minutes.front().map(|m| m.at)
    }

    /// Frames held, against the cap.
    pub fn fill(&self) -> (usize, usize) {
        (self.frames, self.max_frames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_keeps_its_minutes_and_two_spans_add_up() {
        let mut table = Table::new(1000, 3);
        let t = table.thread_id("worker");
        let a = table.intern(&[t, 1, 2, 3]);
        let b = table.intern(&[t, 4, 5]);
        assert_eq!(table.intern(&[t, 1, 2, 3]), a, "interned once");
        for minute in 10..15 {
            table.count(minute, a, Count { samples: 1, cpu_ns: 10 });
            table.count(minute, b, Count { samples: 2, cpu_ns: 20 });
        }
        assert_eq!(table.oldest(), Some(12), "three minutes kept");
        let whole = table.span(0, 100).total();
        let (first, second) = (table.span(12, 12).total(), table.span(13, 14).total());
        assert_eq!(whole, Count { samples: 9, cpu_ns: 90 });
        assert_eq!(first.samples + second.samples, whole.samples);
    }

    #[test]
    fn past_its_cap_samples_are_counted_as_full() {
        let mut table = Table::new(10, 60);
        let t = table.thread_id("t");
        for i in 0..100u64 {
            let id = table.intern(&[t, i, i + 1, i + 2]);
            table.count(1, id, Count { samples: 1, cpu_ns: 1 });
        }
        assert!(table.fill().0 <= 10);
        assert!(table.overflowed > 90);
        let samples = table.span(1, 1);
        assert!(samples.stacks.iter().any(|(name, _, c)| name == "[stack table full]" && c.samples == table.overflowed));
        assert_eq!(samples.total().samples, 100);
    }
}
