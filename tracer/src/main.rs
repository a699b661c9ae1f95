//! `leaktrace`: thin entry point. Errors print as one line on stderr and
//! exit with code 2.

use std::process::ExitCode;

use clap::Parser as _;
use leaktrace::cli::Args;

fn main() -> ExitCode {
    let args = Args::parse();
    if args.version {
        print!(
            "{}",
            leaktrace::version::long_version(leaktrace::attach::probe::EBPF_OBJECT)
        );
        return ExitCode::SUCCESS;
    }
    if args.demo_target {
        leaktrace::demo::target_main();
    }
    env_logger::Builder::from_env(env_logger::Env::default().filter_or("LEAKTRACE_LOG", "warn"))
        .format_timestamp(None)
        .init();
    let cfg = match args.validate() {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("leaktrace: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("leaktrace: failed to start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(leaktrace::run::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("leaktrace: {e:#}");
            ExitCode::from(2)
        }
    }
}
