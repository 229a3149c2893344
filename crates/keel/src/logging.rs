//! Log output: tracing-subscriber's full format (time, level, spans,
//! target, message) to stderr, coloured only when stderr is a terminal (a
//! node's log file, as `keel dev` writes them, gets plain text).

use std::io::IsTerminal as _;

/// Logs to stderr, at the level `KEEL_LOG` sets (default info).
pub fn init() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KEEL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
