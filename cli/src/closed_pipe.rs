//! A closed pipe ends a command quietly: `strata audit verify | head` stops when `head` has read
//! enough, as any Unix tool does, instead of panicking with a backtrace.
//!
//! Rust ignores SIGPIPE (so that a server survives a client that closed its socket), so a write
//! to a closed pipe fails with EPIPE, and `println!` panics on that failure. Restoring SIGPIPE
//! would kill `serve` (and `migrate --metrics`) on a closed connection; instead a panic hook
//! turns exactly that panic (printing to standard output or error, EPIPE) into a quiet exit.

/// Installs the hook (before any output).
pub fn install() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if is_closed_pipe(message) {
            std::process::exit(0);
        }
        default(info)
    }));
}

/// EPIPE, on Linux, macOS and the BSDs alike.
const EPIPE: i32 = 32;

/// Whether a panic is the standard library's failure to print to a closed pipe
/// (`failed printing to stdout: Broken pipe (os error 32)`; the number, not the text, which
/// the C library may translate).
fn is_closed_pipe(message: &str) -> bool {
    message.starts_with("failed printing to std")
        && message.contains(&format!("(os error {EPIPE})"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_print_to_a_closed_pipe_is_quiet() {
        assert!(super::is_closed_pipe(
            "failed printing to stdout: Broken pipe (os error 32)"
        ));
        assert!(!super::is_closed_pipe(
            "failed printing to stdout: No space left on device (os error 28)"
        ));
        assert!(!super::is_closed_pipe("index out of bounds (os error 32)"));
    }
}
