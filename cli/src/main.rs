//! The `walrus-cli` binary: a REPL (`walrus-cli --addr 127.0.0.1:8080`) or one command
//! (`walrus-cli --addr 127.0.0.1:8080 put logs hello`, exit code 1 on `ERR`).

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use walrus_cli::{render, split_line, words_to_request, Client, HELP};
use walrus_core::wire::Reply;

#[derive(Parser)]
#[command(name = "walrus-cli", about = "Client for a walrus node")]
struct Args {
    /// Client address of any node.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// Seconds to wait for a connection or a reply.
    #[arg(long, default_value_t = 10)]
    timeout_secs: u64,
    /// A command to run once (e.g. `put logs hello`); without one, a REPL starts.
    command: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let timeout = Duration::from_secs(args.timeout_secs.max(1));
    if !args.command.is_empty() {
        return one_shot(&args.addr, timeout, &args.command);
    }
    repl(&args.addr, timeout)
}

fn connect(addr: &str, timeout: Duration) -> Option<Client> {
    match Client::connect(addr, timeout) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("cannot reach a walrus node at {addr}: {e}");
            None
        }
    }
}

fn one_shot(addr: &str, timeout: Duration, words: &[String]) -> ExitCode {
    let body = match words_to_request(words) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{e}\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    let Some(mut client) = connect(addr, timeout) else {
        return ExitCode::from(1);
    };
    match client.request(&body) {
        Ok(reply) => {
            println!("{}", render(&reply));
            if matches!(reply, Reply::Err(_)) {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("request to {addr} failed: {e}");
            ExitCode::from(1)
        }
    }
}

fn repl(addr: &str, timeout: Duration) -> ExitCode {
    let mut editor = match rustyline::DefaultEditor::new() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("cannot start the line editor: {e}");
            return ExitCode::from(1);
        }
    };
    let history =
        std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".walrus_cli_history"));
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    let mut client: Option<Client> = None;
    println!("walrus-cli connected to {addr} (type help)");
    while let Ok(line) = editor.readline("walrus> ") {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(line);
        match line.to_ascii_lowercase().as_str() {
            "exit" | "quit" => break,
            "help" => {
                println!("{HELP}");
                continue;
            }
            _ => {}
        }
        let Some(words) = split_line(line) else {
            println!("unbalanced quotes");
            continue;
        };
        let body = match words_to_request(&words) {
            Ok(b) => b,
            Err(e) => {
                println!("{e} (type help)");
                continue;
            }
        };
        if client.is_none() {
            client = connect(addr, timeout);
        }
        let Some(c) = client.as_mut() else { continue };
        match c.request(&body) {
            Ok(r) => println!("{}", render(&r)),
            Err(e) => {
                println!("request failed: {e}");
                client = None;
            }
        }
    }
    if let Some(h) = &history {
        let _ = editor.save_history(h);
    }
    ExitCode::SUCCESS
}
