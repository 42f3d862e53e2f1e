//! What both binaries print through: `say!`, a `println!` that survives a closed stdout, and
//! their byte progress bars.

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

/// A progress bar of bytes on a terminal (stderr); hidden otherwise.
#[allow(dead_code)] // each binary uses its own subset of this module
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// The command line, parsed; a bad option ends the program with clap's message and status 1,
/// as every other error of these programs does (clap's own is 2). `--help` and `--version`
/// exit 0.
pub fn parse_args<T: clap::Parser>() -> T {
    T::try_parse().unwrap_or_else(|e| {
        let _ = e.print();
        std::process::exit(if e.use_stderr() { 1 } else { 0 })
    })
}

/// An md5 digest as given on the command line: 32 hexadecimal digits (any case), refused
/// before anything is downloaded otherwise.
pub fn parse_md5(s: &str) -> Result<String, String> {
    if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{s:?} is not an md5 digest (32 hexadecimal digits, {} given)", s.len()));
    }
    Ok(s.to_ascii_lowercase())
}
