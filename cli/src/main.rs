//! `regctl`: exit 0 when done, 1 on an error (one line on stderr), 2 on a usage error.

use std::process::ExitCode;

use clap::Parser as _;
use wharf_cli::args::Cli;

fn main() -> ExitCode {
    // clap prints usage errors itself and exits 2; --help and --version exit 0.
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("regctl: error: starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(wharf_cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("regctl: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
