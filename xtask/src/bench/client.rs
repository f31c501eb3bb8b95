//! `xtask bench-client`: the connect loops of the benchmark, run as a separate process so
//! that the bench can start it inside a network namespace and a cgroup of its own.
//!
//! It prints one line of `key=value` figures on stdout, which [`Report::parse`] reads back.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};

use super::stats::percentile;

/// Size of each write of the stream figure.
const STREAM_CHUNK: usize = 256 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// connect() then close() with SO_LINGER 0, so no TIME_WAIT is left behind.
    Connect,
    /// connect(), half-close, read to EOF, close().
    EndToEnd,
    /// One connection that writes `--bytes`, then half-closes and reads to EOF.
    Stream,
}

#[derive(Clone, Debug, Args)]
pub struct ClientArgs {
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// Server address to connect to.
    #[arg(long)]
    pub addr: SocketAddr,
    /// Connections per thread.
    #[arg(long, default_value_t = 1000)]
    pub count: usize,
    /// Stop early after this many seconds.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Threads that connect at once.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Bytes to send in stream mode.
    #[arg(long, default_value_t = 1 << 30)]
    pub bytes: u64,
}

/// The figures of one client run.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Report {
    /// Connections completed, over all threads.
    pub count: u64,
    /// Wall time from the first connect to the last close, in seconds.
    pub seconds: f64,
    /// Median duration of the connect() call, in nanoseconds.
    pub p50_ns: u64,
    /// 99th percentile of the connect() call, in nanoseconds.
    pub p99_ns: u64,
    /// Bytes sent in stream mode.
    pub bytes: u64,
}

impl Report {
    /// Formats the report as the client's output line.
    pub fn line(&self) -> String {
        format!(
            "count={} seconds={:.6} p50_ns={} p99_ns={} bytes={}",
            self.count, self.seconds, self.p50_ns, self.p99_ns, self.bytes
        )
    }

    /// Reads back a line written by [`Report::line`].
    pub fn parse(line: &str) -> anyhow::Result<Self> {
        let mut report = Self::default();
        for field in line.split_whitespace() {
            let (key, value) = field
                .split_once('=')
                .with_context(|| format!("invalid client output field `{field}`"))?;
            let number = || {
                value
                    .parse::<u64>()
                    .with_context(|| format!("invalid {key}"))
            };
            match key {
                "count" => report.count = number()?,
                "seconds" => report.seconds = value.parse().context("invalid seconds")?,
                "p50_ns" => report.p50_ns = number()?,
                "p99_ns" => report.p99_ns = number()?,
                "bytes" => report.bytes = number()?,
                _ => bail!("unknown client output field `{key}`"),
            }
        }
        Ok(report)
    }

    /// Connections per second.
    pub fn rate(&self) -> f64 {
        self.count as f64 / self.seconds
    }

    /// Bytes per second.
    pub fn throughput(&self) -> f64 {
        self.bytes as f64 / self.seconds
    }
}

/// Runs the client and prints its report.
pub fn run(args: &ClientArgs) -> anyhow::Result<()> {
    let report = match args.mode {
        Mode::Stream => stream(args.addr, args.bytes)?,
        Mode::Connect | Mode::EndToEnd => connect_threads(args)?,
    };
    println!("{}", report.line());
    Ok(())
}

fn connect_threads(args: &ClientArgs) -> anyhow::Result<Report> {
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let start = Instant::now();
    let workers: Vec<_> = (0..args.threads.max(1))
        .map(|_| {
            let args = args.clone();
            thread::spawn(move || connect_loop(&args, deadline))
        })
        .collect();
    let mut latencies = Vec::new();
    for worker in workers {
        let thread_latencies = worker
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        latencies.extend(thread_latencies);
    }
    let seconds = start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    Ok(Report {
        count: latencies.len() as u64,
        seconds,
        p50_ns: percentile(&latencies, 50.0),
        p99_ns: percentile(&latencies, 99.0),
        bytes: 0,
    })
}

/// Connects `args.count` times or until `deadline`; returns each connect()'s duration.
fn connect_loop(args: &ClientArgs, deadline: Instant) -> anyhow::Result<Vec<u64>> {
    let mut latencies = Vec::with_capacity(args.count);
    let mut buffer = [0u8; 64];
    while latencies.len() < args.count && Instant::now() < deadline {
        let before = Instant::now();
        let mut stream = TcpStream::connect(args.addr)
            .with_context(|| format!("connect to {} failed", args.addr))?;
        latencies.push(before.elapsed().as_nanos() as u64);
        match args.mode {
            Mode::Connect => set_linger_zero(&stream)?,
            _ => {
                stream.shutdown(Shutdown::Write)?;
                while stream.read(&mut buffer)? > 0 {}
            }
        }
    }
    Ok(latencies)
}

/// Makes close() send a reset instead of a FIN, so the socket leaves no TIME_WAIT entry
/// and a long loop does not run out of local ports.
fn set_linger_zero(stream: &TcpStream) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a `linger` of the size passed.
    let result = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn stream(addr: SocketAddr, bytes: u64) -> anyhow::Result<Report> {
    let chunk = vec![0x5a_u8; STREAM_CHUNK];
    let start = Instant::now();
    let mut stream =
        TcpStream::connect(addr).with_context(|| format!("connect to {addr} failed"))?;
    let mut left = bytes;
    while left > 0 {
        let len = left.min(STREAM_CHUNK as u64) as usize;
        stream.write_all(&chunk[..len])?;
        left -= len as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    let mut rest = [0u8; 64];
    while stream.read(&mut rest)? > 0 {}
    Ok(Report {
        count: 1,
        seconds: start.elapsed().as_secs_f64(),
        bytes,
        ..Report::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_line_round_trips() {
        let report = Report {
            count: 300,
            seconds: 0.25,
            p50_ns: 21_000,
            p99_ns: 80_000,
            bytes: 0,
        };
        assert_eq!(Report::parse(&report.line()).unwrap(), report);
        assert_eq!(report.rate(), 1200.0);
    }

    #[test]
    fn report_rejects_unknown_field() {
        let err = Report::parse("count=1 colour=blue").unwrap_err();
        assert_eq!(err.to_string(), "unknown client output field `colour`");
    }
}
