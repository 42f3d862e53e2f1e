//! What both binaries print through: `say!`, a `println!` that survives a closed stdout.

/// Prints a line to stdout. When the reader has gone (`cifar-train | head`), the program ends
/// there, quietly and with SIGPIPE's exit status (141), as a C program would; `println!`
/// panics instead, because Rust ignores SIGPIPE. Any other write error ends it with a message.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            $crate::common::stdout_failed(e)
        }
    }};
}
pub(crate) use say;

/// The end of the program after a failed write to stdout.
pub fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(141);
    }
    eprintln!("error: writing to standard output: {e}");
    std::process::exit(1);
}
