//! `cargo xtask bench`: bypass against a direct connection, iptables DNAT and socat.
//!
//! Every variant runs in a private network namespace with 10.0.0.22 on its `lo`, and the
//! clients (this binary's `bench-client`) run in cgroups the bench made. Variants take turns
//! in every round, each round starting one variant later, so slow drifts of the machine
//! spread over all of them. The table shows medians over the rounds with min..max.

mod client;
mod fixture;
mod interrupt;
mod lab;
mod page;
mod report;
mod stats;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::Context as _;
use clap::Args;
pub use client::{ClientArgs, run as client};
use fixture::{Attached, BpfStats, Cgroup, connect4_stats, memory_kib, own_cgroup};
use lab::{ClientRun, Kind, Lab, Variant};
use report::{Figure, Results, Roles, StartFigure};

use self::client::Mode;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A few hundred connects per variant, to check that the bench works (CI runs this);
    /// writes to target/bench-quick instead of docs/.
    #[arg(long)]
    quick: bool,
}

const VARIANTS: &[Variant] = &[
    Variant {
        name: "direct :3000",
        kind: Kind::Direct,
    },
    Variant {
        name: "bypass, default log",
        kind: Kind::Bypass {
            rules: 1,
            log: true,
            matching: true,
        },
    },
    Variant {
        name: "bypass, log off",
        kind: Kind::Bypass {
            rules: 1,
            log: false,
            matching: true,
        },
    },
    Variant {
        name: "bypass, 1,000 rules",
        kind: Kind::Bypass {
            rules: 1_000,
            log: true,
            matching: true,
        },
    },
    Variant {
        name: "bypass, 100,000 rules",
        kind: Kind::Bypass {
            rules: 100_000,
            log: true,
            matching: true,
        },
    },
    Variant {
        name: "bypass, no rule matches",
        kind: Kind::Bypass {
            rules: 1,
            log: true,
            matching: false,
        },
    },
    Variant {
        name: "iptables DNAT",
        kind: Kind::Iptables,
    },
    Variant {
        name: "socat",
        kind: Kind::Socat,
    },
];

/// Sizes of one bench run.
#[derive(Clone, Copy, Debug)]
struct Plan {
    rounds: usize,
    connects: usize,
    end_to_end: usize,
    /// Connects per thread of the 8-client figure.
    concurrent: usize,
    stream_bytes: u64,
    stream_rounds: usize,
    kernel_rounds: usize,
    starts: usize,
    /// Maximum duration of one client run, in seconds; slow variants (socat) stop early.
    seconds: f64,
}

const FULL: Plan = Plan {
    rounds: 15,
    connects: 10_000,
    end_to_end: 5_000,
    concurrent: 2_000,
    stream_bytes: 2 << 30,
    stream_rounds: 5,
    kernel_rounds: 3,
    starts: 10,
    seconds: 3.0,
};

const QUICK: Plan = Plan {
    rounds: 2,
    connects: 300,
    end_to_end: 300,
    concurrent: 40,
    stream_bytes: 64 << 20,
    stream_rounds: 1,
    kernel_rounds: 1,
    starts: 3,
    seconds: 3.0,
};

const CONCURRENT_CLIENTS: usize = 8;

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    // SAFETY: `geteuid` has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("the bench loads eBPF programs and makes network namespaces; run it as root");
    }
    let plan = if args.quick { QUICK } else { FULL };
    interrupt::install();
    let root = workspace_root();
    crate::run(crate::cargo().args([
        "build",
        "--release",
        "--package",
        "bypass",
        "--package",
        "xtask",
    ]))?;
    let bypass = root.join("target/release/bypass");
    let client = root.join("target/release/xtask");

    let started = Instant::now();
    let mut results = Results {
        variants: VARIANTS.iter().map(|v| v.name.to_owned()).collect(),
        ..Results::default()
    };
    measure_starts(&bypass, &plan, &mut results)?;
    {
        let lab = Lab::create(VARIANTS, &bypass, client)?;
        measure_rounds(&lab, &plan, &mut results)
            .and_then(|()| measure_kernel_time(&lab, &plan, &mut results))
            .map_err(|err| err.context(format!("bypass attach logs:\n{}", lab.attach_logs())))?;
    }
    let roles = roles();
    let checks = results.checks(&roles);
    println!("{}", results.table(roles.direct));
    println!("{}", results.start_table());
    println!("{}", report::checks_table(&checks));
    eprintln!("xtask: bench took {:.0} s", started.elapsed().as_secs_f64());

    let out_dir = if args.quick {
        root.join("target/bench-quick")
    } else {
        root.join("docs")
    };
    let command = if args.quick {
        "cargo xtask bench --quick"
    } else {
        "cargo xtask bench"
    };
    page::write(&out_dir, command, &results, &checks, &roles)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_owned)
}

fn roles() -> Roles {
    let find = |wanted: fn(&Kind) -> bool| VARIANTS.iter().position(|v| wanted(&v.kind));
    Roles {
        direct: find(|k| *k == Kind::Direct).unwrap_or(0),
        default_log: find(|k| {
            *k == Kind::Bypass {
                rules: 1,
                log: true,
                matching: true,
            }
        }),
        many_rules: find(|k| matches!(k, Kind::Bypass { rules: 100_000, .. })),
        no_match: find(|k| {
            matches!(
                k,
                Kind::Bypass {
                    matching: false,
                    ..
                }
            )
        }),
        iptables: find(|k| *k == Kind::Iptables),
        bypass: (0..VARIANTS.len())
            .filter(|&i| matches!(VARIANTS[i].kind, Kind::Bypass { .. }))
            .collect(),
    }
}

fn measure_rounds(lab: &Lab, plan: &Plan, results: &mut Results) -> anyhow::Result<()> {
    let count = VARIANTS.len();
    for round in 0..plan.rounds {
        let round_start = Instant::now();
        for turn in 0..count {
            let index = (round + turn) % count;
            measure_variant(lab, plan, index, round, results)?;
        }
        eprintln!(
            "xtask: round {}/{} took {:.1} s",
            round + 1,
            plan.rounds,
            round_start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn measure_variant(
    lab: &Lab,
    plan: &Plan,
    index: usize,
    round: usize,
    results: &mut Results,
) -> anyhow::Result<()> {
    let variant = &VARIANTS[index];
    let run = |mode, count, threads, bytes| {
        let run = ClientRun {
            mode,
            count,
            threads,
            bytes,
            seconds: plan.seconds,
        };
        lab.run_client(variant, index, &run)
            .with_context(|| format!("variant `{}`", variant.name))
    };
    interrupt::check()?;
    let connect = run(Mode::Connect, plan.connects, 1, 0)?;
    results.add(index, Figure::ConnectRate, connect.rate());
    results.add(index, Figure::ConnectP50, connect.p50_ns as f64);
    results.add(index, Figure::ConnectP99, connect.p99_ns as f64);
    let end_to_end = run(Mode::EndToEnd, plan.end_to_end, 1, 0)?;
    results.add(index, Figure::EndToEndRate, end_to_end.rate());
    let concurrent = run(Mode::Connect, plan.concurrent, CONCURRENT_CLIENTS, 0)?;
    results.add(index, Figure::ConcurrentRate, concurrent.rate());
    if round < plan.stream_rounds {
        let stream = run(Mode::Stream, 1, 1, plan.stream_bytes)?;
        results.add(index, Figure::Stream, stream.throughput());
    }
    Ok(())
}

/// Measures the programs' own run time per call, with `kernel.bpf_stats_enabled` on only
/// for this phase: the statistics add two clock reads to every program run.
fn measure_kernel_time(lab: &Lab, plan: &Plan, results: &mut Results) -> anyhow::Result<()> {
    let _stats = BpfStats::enable()?;
    for _ in 0..plan.kernel_rounds {
        for (index, variant) in VARIANTS.iter().enumerate() {
            if !matches!(variant.kind, Kind::Bypass { .. }) {
                continue;
            }
            interrupt::check()?;
            let (count_before, time_before) = connect4_stats(lab.cgroup(index))?;
            let run = ClientRun {
                mode: Mode::Connect,
                count: plan.connects,
                threads: 1,
                bytes: 0,
                seconds: plan.seconds,
            };
            let report = lab.run_client(variant, index, &run)?;
            let (count_after, time_after) = connect4_stats(lab.cgroup(index))?;
            let calls = count_after.saturating_sub(count_before);
            anyhow::ensure!(
                calls >= report.count,
                "`{}`: connect4 ran {calls} times for {} connects; is kernel.bpf_stats_enabled working?",
                variant.name,
                report.count
            );
            results.add(
                index,
                Figure::KernelNs,
                (time_after - time_before) as f64 / calls as f64,
            );
        }
    }
    Ok(())
}

/// Measures `bypass attach` from start to attached with its memory, and `bypass run -- true`.
fn measure_starts(bypass: &Path, plan: &Plan, results: &mut Results) -> anyhow::Result<()> {
    let cgroup = Cgroup::create(
        &own_cgroup()?,
        &format!("bypass-bench-start-{}", std::process::id()),
    )?;
    for _ in 0..plan.starts {
        interrupt::check()?;
        let attached = Attached::start(bypass, cgroup.path(), &[])?;
        let (rss, peak) = memory_kib(attached.process.pid())?;
        results.add_start(StartFigure::Attached, attached.startup.as_secs_f64() * 1e3);
        results.add_start(StartFigure::Rss, rss as f64 / 1024.0);
        results.add_start(StartFigure::PeakRss, peak as f64 / 1024.0);
        drop(attached);

        let start = Instant::now();
        let status = Command::new(bypass)
            .args(["run", "--", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("cannot run bypass run -- true")?;
        anyhow::ensure!(status.success(), "bypass run -- true failed with {status}");
        results.add_start(StartFigure::RunTrue, start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(())
}
