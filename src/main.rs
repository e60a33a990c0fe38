//! The `sparsync` command: parses flags, sets up logging, and runs the subcommand (each one's
//! flags and handler are in [`cli`]).

mod cli;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = cli::Cli::parse();
    cli::init_logging(&cli.log);
    cli.command.run()
}
