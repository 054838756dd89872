//! The README's first example, run as written: its curl commands against the real binary,
//! and what comes back compared with what the README shows (field names, the order of
//! events, the error text), so the first page a newcomer reads cannot drift from the code.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;
use serde_json::Value;

/// The fenced code blocks of the README's "One minute with it" section, in order.
fn first_example_blocks() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme.find("## One minute with it").expect("the section");
    let section = &readme[start..start + readme[start..].find("\n## Clients").expect("the next section")];
    section.split("```").skip(1).step_by(2).map(|block| block.split_once('\n').map_or("", |(_, body)| body).to_owned()).collect()
}

fn shell(command: &str) -> Command {
    let mut shell = Command::new("bash");
    shell.args(["-c", command]);
    shell
}

/// An SSE block's shape: each line's field, with `data:` as its JSON's keys and `event:`
/// as its value; an `id:` as the number of positions in the cursor.
fn shape(block: &str) -> Vec<String> {
    block
        .lines()
        .map(|line| {
            let (field, value) = line.split_once(": ").unwrap_or((line, ""));
            match field {
                "event" => format!("event {value}"),
                "data" => {
                    let json: Value = serde_json::from_str(value).unwrap_or_else(|e| panic!("{e}: {value}"));
                    let mut keys: Vec<&String> = json.as_object().unwrap().keys().collect();
                    keys.sort();
                    format!("data {keys:?}")
                }
                "id" => format!("id s + {} positions", value.matches(',').count()),
                other => other.to_owned(),
            }
        })
        .collect()
}

fn keys(line: &str) -> Vec<String> {
    let json: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    let mut keys: Vec<String> = json.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    keys
}

#[test]
fn the_first_example_shows_what_a_newcomer_sees() {
    for tool in ["bash", "curl"] {
        assert!(Command::new(tool).arg("--version").output().is_ok(), "{tool} is not installed: apt-get install -y {tool}");
    }
    let blocks = first_example_blocks();
    let [commands, replies, client, bad, ..] = blocks.as_slice() else { panic!("the section's code blocks: {blocks:?}") };
    let server = Process::spawn(&[], None);
    let here = |command: &str| command.replace("127.0.0.1:8080", &server.client.to_string()).replace("localhost:8080", &server.client.to_string());
    let curls: Vec<String> = commands.lines().filter(|l| l.starts_with("curl")).map(|l| here(l.split(" &").next().unwrap().trim())).collect();
    let (sse, posts) = curls.split_first().expect("curl commands");
    assert!(sse.contains("/sse"), "the first curl is the client: {sse}");

    let mut listening = shell(&format!("exec {sse}")).stdout(Stdio::piped()).spawn().unwrap();
    let mut events = BufReader::new(listening.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    // The welcome arrives once the client is registered: then the publishes can reach it.
    while !seen.contains("event: welcome") || !seen.ends_with("\n\n") {
        seen.push_str(&events.next().expect("the client's stream").unwrap());
        seen.push('\n');
    }
    let answers: Vec<String> = posts.iter().map(|post| String::from_utf8(shell(post).output().unwrap().stdout).unwrap()).collect();
    while seen.matches("event: message").count() < posts.len() || !seen.ends_with("\n\n") {
        seen.push_str(&events.next().expect("the client's stream").unwrap());
        seen.push('\n');
    }
    let _ = listening.kill();
    let _ = listening.wait();

    let shown: Vec<&str> = replies.lines().collect();
    assert_eq!(shown.len(), answers.len(), "one reply shown per publish");
    for (shown, got) in shown.iter().zip(&answers) {
        assert_eq!(keys(shown), keys(got.trim()), "README shows {shown}; the server answered {got}");
    }
    let shown_blocks: Vec<Vec<String>> = client.trim().split("\n\n").map(shape).collect();
    let got_blocks: Vec<Vec<String>> = seen.trim().split("\n\n").map(shape).collect();
    assert_eq!(shown_blocks, got_blocks, "README shows:\n{client}\nthe client got:\n{seen}");

    let mut bad = bad.lines();
    let command = here(bad.next().unwrap().strip_prefix("$ ").expect("a shell prompt"));
    let answer = String::from_utf8(shell(&command).output().unwrap().stdout).unwrap();
    assert_eq!(answer.trim(), bad.next().unwrap());
}
