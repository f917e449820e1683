use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use hark::cli::{Cli, Command};
use hark::cmd;
use hark::config::Config;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, None | Some(Command::Run(_))) && cli.run.any() {
        // `hark -i x.wav devices`: the run flags would be silently ignored.
        Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "-i, -d, --record-only and --pace belong to `hark run`, not to this subcommand",
            )
            .exit();
    }
    init_logging(cli.global.verbose, cli.global.quiet);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hark: {e:#}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn run(cli: Cli) -> Result<(), cmd::Error> {
    let global = cli.global;
    let load = || Config::load(global.config_path(None).as_deref(), &global.set);
    match cli.command {
        Some(Command::CheckConfig { file }) => {
            let path = global.config_path(file);
            print!("{}", cmd::check_config::run(path.as_deref(), &global.set)?);
        }
        Some(Command::Transcribe(args)) => {
            cmd::transcribe::run(&load()?, &args)?;
        }
        Some(Command::Upload) => {
            cmd::upload::run(&load()?)?;
        }
        Some(Command::Devices { device }) => {
            print!("{}", cmd::devices::run(device.as_deref())?);
        }
        command => {
            let args = match command {
                Some(Command::Run(args)) => args,
                _ => cli.run,
            };
            let mut overrides = global.set.clone();
            overrides.extend(cmd::run::overrides(&args));
            let path = global.config_path(None);
            let config = Config::load(path.as_deref(), &overrides)?;
            let reload: cmd::run::Reload =
                Box::new(move || Config::load(path.as_deref(), &overrides));
            cmd::run::run_with_reload(&config, &args, Some(reload))?;
        }
    }
    Ok(())
}

/// Logs go to stderr; RUST_LOG wins over -v/-q.
fn init_logging(verbose: u8, quiet: u8) {
    let level = match (verbose, quiet) {
        (0, 0) => "info",
        (1, _) => "debug",
        (v, _) if v >= 2 => "trace",
        (_, 1) => "warn",
        _ => "error",
    };
    // symphonia (FLAC/MP3 input) logs player-oriented details at info; hark reports what matters.
    let media = if level == "info" { "warn" } else { level };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("hark={level},symphonia={media},{level}"))
    });
    // ureq-proto's trace output dumps request heads byte by byte, the API key among them.
    let filter = match "ureq_proto=off".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .with_target(false)
        .init();
}
