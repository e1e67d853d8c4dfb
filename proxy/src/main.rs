//! The `tern` binary: parses the command line and hands it to the library.
use clap::Parser;

fn main() -> std::process::ExitCode {
    tern::cli::main(tern::cli::Cli::parse())
}
