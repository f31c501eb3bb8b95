//! Exit statuses. `run` follows the convention of coreutils `env` and `timeout`.

/// `attach` failed after its arguments were accepted.
pub const FAILURE: u8 = 1;
/// `attach` was given invalid arguments or input.
pub const USAGE: u8 = 2;
/// `run` failed before the command ran, usage errors included.
pub const RUN_FAILED: u8 = 125;
/// `run` found the command but could not execute it.
pub const NOT_EXECUTABLE: u8 = 126;
/// `run` did not find the command.
pub const NOT_FOUND: u8 = 127;
/// `run` adds the signal number to this when a signal killed the command.
pub const SIGNAL_BASE: u8 = 128;

/// An error caused by the user's input rather than by the system; `attach` exits with
/// [`USAGE`] for it.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct UsageError(#[from] pub anyhow::Error);

/// Writes `text` to stdout. A reader that went away (`bypass status | head -1`) is not an
/// error: the output is simply no longer wanted.
pub fn print_stdout(text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => result,
    }
}
