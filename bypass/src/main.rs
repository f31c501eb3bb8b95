use std::{ffi::OsString, process::ExitCode};

use bypass::{
    attach, check,
    cli::{Cli, Command, RulesCommand},
    exit::{self, UsageError},
    generate, live, pin,
    run::{self, CommandError},
    status,
};
use clap::Parser as _;

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(if !err.use_stderr() {
                0
            } else if subcommand(&args) == Some("run") {
                exit::RUN_FAILED
            } else {
                exit::USAGE
            });
        }
    };
    init_logging(cli.verbose, cli.quiet);
    if matches!(cli.command, Command::Run(_) | Command::Attach(_)) {
        // aya probes the kernel's BPF features once, before the first load: about 2 ms of
        // system calls, which this thread does while the main thread reads the rules and
        // finds the cgroup.
        std::thread::spawn(aya::features);
    }

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("bypass: cannot start the async runtime: {err}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let code = match cli.command {
        Command::Run(args) => runtime.block_on(run::run(args)).unwrap_or_else(|err| {
            eprintln!("bypass: {err:#}");
            err.downcast_ref::<CommandError>()
                .map_or(exit::RUN_FAILED, CommandError::exit_code)
        }),
        Command::Attach(args) => status_of(runtime.block_on(attach::attach(args))),
        Command::Detach(args) => status_of(pin::detach(&args.name)),
        Command::Status(args) => status_of(status::status(args.name.as_deref(), args.json)),
        Command::Gc => status_of(pin::gc().map(drop)),
        Command::Rules(RulesCommand::Add { name, rule }) => status_of(live::add(&name, &rule)),
        Command::Rules(RulesCommand::Del { name, rule }) => status_of(live::del(&name, &rule)),
        Command::Generate(args) => status_of(generate::generate(&args.dir)),
        Command::Check(args) => match check::check(&args) {
            Ok(true) => 0,
            Ok(false) => exit::FAILURE,
            Err(err) => status_of(Err(err)),
        },
    };
    ExitCode::from(code)
}

/// The exit status of a command other than `run`: 0, [`exit::USAGE`] for a [`UsageError`],
/// else [`exit::FAILURE`]; errors are printed with their causes.
fn status_of(result: anyhow::Result<()>) -> u8 {
    match result {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("bypass: {err:#}");
            if err.is::<UsageError>() {
                exit::USAGE
            } else {
                exit::FAILURE
            }
        }
    }
}

/// Returns the first argument that is not an option: the subcommand, if any.
fn subcommand(args: &[OsString]) -> Option<&str> {
    args.iter()
        .skip(1)
        .filter_map(|arg| arg.to_str())
        .find(|arg| !arg.starts_with('-'))
}

/// Sets up env_logger on stderr at info, shifted by -v/-q; `RUST_LOG` overrides both.
fn init_logging(verbose: u8, quiet: u8) {
    let level = match i16::from(verbose) - i16::from(quiet) {
        ..=-2 => log::LevelFilter::Error,
        -1 => log::LevelFilter::Warn,
        0 => log::LevelFilter::Info,
        1 => log::LevelFilter::Debug,
        2.. => log::LevelFilter::Trace,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .parse_default_env()
        .init();
}
