//! The `ptb-lm` command line: parses arguments and dispatches to the library. What `eval`,
//! `generate` and `info` print goes to standard output through one checked writer: a closed
//! or full stdout is an error naming it, not a silent success.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use ptb_lm::config::{Config, DeviceChoice};
use ptb_lm::{checkpoint::Checkpoint, device, eval, generate, interrupt, train};
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Parser)]
#[command(
    name = "ptb-lm",
    version,
    about = "LSTM, GRU and RNN language models of words, characters or subwords (PTB or any text)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// CPU threads libtorch computes with (default: one per core). Give each of several
    /// ptb-lm processes sharing a machine its share, e.g. --threads 1 for two on 2 cores.
    #[arg(long, global = true, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=4096))]
    threads: Option<i32>,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (a new run from --config, or continue one with --resume)
    Train(TrainArgs),
    /// Perplexity of a checkpoint on a PTB split or a text file
    Eval(EvalArgs),
    /// Sample text from a checkpoint
    Generate(GenerateArgs),
    /// Versions, and whether CUDA, cuDNN and CUDA graphs are usable here
    Info,
}

#[derive(Args)]
struct TrainArgs {
    /// Run configuration (TOML), e.g. configs/better.toml
    #[arg(long, short, value_name = "FILE", required_unless_present = "resume")]
    config: Option<PathBuf>,
    /// Continue the interrupted or finished run in this directory (from its last/ checkpoint)
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["config", "overwrite", "out_dir", "seed"])]
    resume: Option<PathBuf>,
    /// Replace the run already in the output directory (its checkpoints are deleted)
    #[arg(long)]
    overwrite: bool,
    /// auto (CUDA when available), cpu or cuda
    #[arg(long)]
    device: Option<DeviceChoice>,
    /// Run directory (overrides run.out_dir)
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// Corpus directory (overrides data.dir)
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Number of epochs (overrides train.epochs)
    #[arg(long)]
    epochs: Option<usize>,
    /// Random seed (overrides train.seed)
    #[arg(long)]
    seed: Option<u64>,
    /// Override any config value, e.g. --set train.lr=10 (repeatable)
    #[arg(long = "set", value_name = "TABLE.KEY=VALUE")]
    set: Vec<String>,
    /// Print nothing but warnings, errors and the final result
    #[arg(long, short)]
    quiet: bool,
    /// Train N epochs, then stop (resumable) and project the whole run's duration from them
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    stop_after: Option<u64>,
    /// Data-parallel training in N local processes (torch.distributed, Gloo on the CPU); a
    /// process started by a launcher (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) is one rank
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1024))]
    nproc: Option<u64>,
}

impl TrainArgs {
    /// Every override as `table.key=value`, flags first, then --set in order.
    fn overrides(&self) -> Vec<String> {
        let quote = |p: &PathBuf| toml::Value::String(p.display().to_string()).to_string();
        let mut o = Vec::new();
        if let Some(d) = self.device {
            o.push(format!("run.device={d}"));
        }
        if let Some(d) = &self.out_dir {
            o.push(format!("run.out_dir={}", quote(d)));
        }
        if let Some(d) = &self.data_dir {
            o.push(format!("data.dir={}", quote(d)));
        }
        if let Some(e) = self.epochs {
            o.push(format!("train.epochs={e}"));
        }
        if let Some(s) = self.seed {
            o.push(format!("train.seed={s}"));
        }
        o.extend(self.set.iter().cloned());
        o
    }
}

#[derive(Args)]
#[command(allow_negative_numbers = true)]
#[command(group(clap::ArgGroup::new("dynamic_mode").args(["dynamic", "dynamic_search"]).multiple(true)))]
struct EvalArgs {
    /// Checkpoint directory, e.g. runs/better/best
    #[arg(long, value_name = "DIR")]
    checkpoint: PathBuf,
    /// Split of the checkpoint's corpus: test, valid or train (default: test, or valid where
    /// the corpus has no test split)
    #[arg(long, conflicts_with = "file")]
    split: Option<ptb_lm::data::Split>,
    /// A text file (one sentence per line) instead of a PTB split
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// Read words (or characters) missing from the vocabulary as <unk> (with --file; the
    /// count is shown)
    #[arg(long, requires = "file")]
    allow_unk: bool,
    /// Corpus directory, if it is no longer where training read it (the files must be the
    /// same text: the checkpoint records each one's SHA-256)
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The corpus's single text file, if it is no longer where training read it (split as in
    /// training; it must be the same text)
    #[arg(long, value_name = "FILE", conflicts_with = "data_dir")]
    data_file: Option<PathBuf>,
    /// auto (CUDA when available), cpu or cuda
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Evaluation batch size for a PTB split (default: the checkpoint's train.eval_batch_size;
    /// a --file is scored whole, in one stream)
    #[arg(long, conflicts_with = "file", value_parser = clap::value_parser!(i64).range(1..=1_000_000))]
    batch_size: Option<i64>,
    /// Dynamic evaluation (Krause et al. 2018): the model keeps learning from the text as it
    /// scores it, one segment at a time, each scored before it is learned from
    #[arg(long, conflicts_with = "batch_size")]
    dynamic: bool,
    /// Dynamic evaluation, with --dyn-lr and --dyn-decay chosen on the validation split
    /// first (a grid, printed)
    #[arg(long, conflicts_with = "batch_size")]
    dynamic_search: bool,
    /// Dynamic evaluation: learning rate η (--dynamic-search chooses it)
    #[arg(long, value_name = "ETA", requires = "dynamic", conflicts_with = "dynamic_search", allow_hyphen_values = true,
          default_value_t = ptb_lm::dynamic::Settings::default().lr)]
    dyn_lr: f64,
    /// Dynamic evaluation: decay λ back to the trained weights, in [0, 1) (--dynamic-search chooses it)
    #[arg(long, value_name = "LAMBDA", requires = "dynamic", conflicts_with = "dynamic_search", allow_hyphen_values = true,
          default_value_t = ptb_lm::dynamic::Settings::default().decay)]
    dyn_decay: f64,
    /// Dynamic evaluation: ε added to the gradients' RMS
    #[arg(long, value_name = "EPS", requires = "dynamic_mode", allow_hyphen_values = true,
          default_value_t = ptb_lm::dynamic::Settings::default().epsilon)]
    dyn_epsilon: f64,
    /// Dynamic evaluation: segment length (tokens scored between two updates)
    #[arg(long, value_name = "N", requires = "dynamic_mode", allow_hyphen_values = true,
          value_parser = clap::value_parser!(i64).range(1..=ptb_lm::dynamic::MAX_BPTT),
          default_value_t = ptb_lm::dynamic::Settings::default().bptt)]
    dyn_bptt: i64,
    /// Dynamic evaluation: gradient statistics from at most N training batches (default: all)
    #[arg(long, value_name = "N", requires = "dynamic_mode", value_parser = clap::value_parser!(u64).range(1..))]
    dyn_stats_batches: Option<u64>,
    /// With --dynamic-search: validation tokens each grid point is scored on (at most)
    #[arg(long, value_name = "N", requires = "dynamic_search", default_value_t = 20_000,
          value_parser = clap::value_parser!(u64).range(ptb_lm::eval::MIN_SEARCH_TOKENS as u64..))]
    dyn_search_tokens: u64,
}

#[derive(Args)]
#[command(allow_negative_numbers = true)]
struct GenerateArgs {
    /// Checkpoint directory, e.g. runs/better/best
    #[arg(long, value_name = "DIR")]
    checkpoint: PathBuf,
    /// Text the model reads before sampling (empty: start a new sentence); a character or BPE
    /// model reads it as it is written, spaces and capitals kept
    #[arg(long, default_value = "")]
    prompt: String,
    /// Read the prompt from FILE instead (`-`: standard input), for prompts too long for the
    /// command line: words separated by any whitespace, line breaks included, as in --prompt
    #[arg(long, value_name = "FILE", conflicts_with = "prompt")]
    prompt_file: Option<PathBuf>,
    /// Tokens to generate per sample: words, characters or BPE pieces, as the model reads
    /// text (default 100)
    #[arg(long, value_name = "N")]
    tokens: Option<usize>,
    /// Words to generate per sample: --tokens, for a word model
    #[arg(long, value_name = "N", conflicts_with = "tokens")]
    words: Option<usize>,
    /// Softmax temperature (0: always the most likely word)
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Sample among the K most likely words only
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
    /// Random seed: the same seed gives the same text
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Allow <unk> in the output
    #[arg(long)]
    allow_unk: bool,
    /// Stop each sample at the end of its first sentence
    #[arg(long)]
    until_eos: bool,
    /// Number of samples
    #[arg(long, default_value_t = 1, value_name = "M")]
    samples: usize,
    /// cpu, cuda or auto (one word at a time is quick on the CPU)
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
}

/// Keeps freed memory for reuse instead of handing it back to the system. On the CPU every
/// step allocates and frees the same large buffers (the logits, their gradient, the weights'
/// gradients: megabytes each); glibc's malloc serves blocks that size with fresh `mmap`s and
/// unmaps them on free, so each step page-faults and zeroes them anew (measured: ~118 million
/// page faults and 6 % of the CPU time in the kernel in an hour of configs/cpu-hour.toml).
/// Blocks up to 32 MiB (glibc's ceiling for this) then come from the heap, which is not
/// trimmed. Only the process's own allocator settings change.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn main() -> ExitCode {
    // Output piped into `head` and the like: end quietly when the reader goes away, as
    // command-line tools do, rather than panic on a broken pipe.
    // SAFETY: restoring the default disposition of SIGPIPE, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    keep_freed_memory();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Usage errors as one line, like every other error (the first paragraph of clap's
        // message: "the following required arguments were not provided:" keeps its list);
        // help and version as clap prints them.
        Err(e) if e.use_stderr() => {
            let text = e.render().to_string();
            let first: Vec<&str> = text.lines().take_while(|l| !l.trim().is_empty()).map(str::trim).collect();
            let line = if first.is_empty() { "error: bad arguments".to_string() } else { first.join(" ") };
            eprintln!("{line}");
            return ExitCode::from(2);
        }
        Err(e) => e.exit(),
    };
    std::panic::set_hook(Box::new(report_panic));
    if let Some(n) = cli.threads {
        tch::set_num_threads(n);
    }
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<train::Interrupted>() => {
            // In data-parallel training rank 0 says it for the group.
            if std::env::var("RANK").map_or(true, |r| r == "0") {
                eprintln!("{e}");
            }
            ExitCode::from(interrupt::EXIT_CODE as u8)
        }
        Err(e) => {
            // Data-parallel ranks reach some errors together: rank 0 says those for the group.
            if !e.is::<train::GroupError>() || std::env::var("RANK").map_or(true, |r| r == "0") {
                eprintln!("error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> Result<()> {
    interrupt::install()?;
    match command {
        Command::Train(args) => run_train(args),
        Command::Eval(args) => run_eval(args),
        Command::Generate(args) => run_generate(args),
        Command::Info => print_info(),
    }
}

fn run_train(args: TrainArgs) -> Result<()> {
    if let Some(n) = args.nproc.filter(|&n| n > 1) {
        if std::env::var_os("WORLD_SIZE").is_some() {
            anyhow::bail!("--nproc starts its own ranks: leave it out where a launcher set WORLD_SIZE");
        }
        // The same command line, less --nproc, for every rank.
        let mut rest = Vec::new();
        let mut skip = false;
        for a in std::env::args_os().skip(1) {
            let s = a.to_string_lossy();
            if skip {
                skip = false;
            } else if s == "--nproc" {
                skip = true;
            } else if !s.starts_with("--nproc=") {
                rest.push(a);
            }
        }
        std::process::exit(ptb_lm::dist::launch_local(n as usize, &rest)?);
    }
    // A closed stdout must not kill a training run: writes then fail, and training stops as
    // on Ctrl-C, with a resumable checkpoint.
    // SAFETY: changing a signal disposition; no handler code runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let stop = interrupt::flag();
    let opts = train::TrainOptions {
        overwrite: args.overwrite,
        quiet: args.quiet,
        stop_after: args.stop_after.map(|n| n as usize),
    };
    let outcome = match (&args.resume, &args.config) {
        (Some(dir), _) => train::resume(dir, &args.overrides(), &opts, stop)?,
        (None, Some(path)) => train::train(Config::load(path, &args.overrides())?, &opts, stop)?,
        (None, None) => unreachable!("clap requires --config or --resume"),
    };
    use std::io::Write;
    let _ = match outcome {
        train::Outcome::Finished(s) if args.quiet => writeln!(
            std::io::stdout(),
            "{} perplexity: {:.4} | bits per character: {:.4}{}{}",
            s.final_split,
            s.final_ppl,
            s.final_bpc,
            if s.final_split == ptb_lm::data::Split::Test { "" } else { " (no test split)" },
            match (s.test_ppl_dynamic, s.test_bpc_dynamic) {
                (Some(ppl), Some(bpc)) =>
                    format!(" | dynamic evaluation: perplexity {ppl:.4}, bits per character {bpc:.4}"),
                _ => String::new(),
            }
        ),
        train::Outcome::Finished(_) | train::Outcome::Worker => Ok(()),
        train::Outcome::Stopped(p) => writeln!(std::io::stdout(), "{p}"),
    };
    Ok(())
}

fn run_eval(args: EvalArgs) -> Result<()> {
    let target = match args.file {
        Some(path) => eval::Target::File { path, allow_unk: args.allow_unk },
        None => args.split.map_or(eval::Target::DefaultSplit, eval::Target::Split),
    };
    let dynamic = (args.dynamic || args.dynamic_search).then(|| eval::DynamicOptions {
        settings: ptb_lm::dynamic::Settings {
            lr: args.dyn_lr,
            decay: args.dyn_decay,
            epsilon: args.dyn_epsilon,
            bptt: args.dyn_bptt,
        },
        search: args.dynamic_search,
        search_tokens: args.dyn_search_tokens as usize,
        stats_batches: args.dyn_stats_batches.map(|n| n as usize),
        quiet: false,
        in_training: false,
    });
    let place = eval::CorpusPlace { dir: args.data_dir, file: args.data_file };
    let r = eval::run(&args.checkpoint, &target, &place, args.device, args.batch_size, dynamic.as_ref())?;
    let mut out = stdout();
    if !r.search.is_empty() {
        writeln!(out, "validation perplexity, dynamic, first {} tokens:", r.search_tokens)?;
        writeln!(out, "{:>10} {:>8} {:>12}", "lr", "decay", "perplexity")?;
        for (s, ppl) in &r.search {
            writeln!(out, "{:>10.1e} {:>8} {:>12.4}", s.lr, s.decay, ppl)?;
        }
    }
    let notes: String = r.notes.iter().map(|n| format!("; {n}")).collect();
    writeln!(
        out,
        "{} perplexity: {:.4} | bits per character: {:.4} ({} tokens, {:.1} s, {:.0} tokens/s{notes})",
        r.name,
        r.ppl,
        r.bpc,
        r.tokens,
        r.seconds,
        r.tokens as f64 / r.seconds.max(1e-9)
    )?;
    out.flush()?;
    Ok(())
}

fn run_generate(args: GenerateArgs) -> Result<()> {
    let opts = generate::GenerateOptions {
        words: args.tokens.or(args.words).unwrap_or(100),
        temperature: args.temperature,
        top_k: args.top_k,
        seed: args.seed,
        allow_unk: args.allow_unk,
        until_eos: args.until_eos,
        samples: args.samples,
    };
    opts.validate()?;
    let (text, source) = match &args.prompt_file {
        Some(file) if file.as_os_str() == "-" && closed_at_start(0) => {
            anyhow::bail!("standard input: closed; give --prompt-file - a prompt to read, or name a file")
        }
        Some(file) => (generate::read_prompt_file(file)?, file.display().to_string()),
        None => (args.prompt, "--prompt".to_string()),
    };
    let ckpt = Checkpoint::load(&args.checkpoint)?;
    let model = ckpt.model(device::resolve(args.device)?)?;
    let tokenizer = ckpt.tokenizer()?;
    if args.words.is_some() && !tokenizer.kind().is_word() {
        anyhow::bail!(
            "--words: this model reads text as {}s (data.tokenizer = \"{}\"), not words; give the length as --tokens N",
            tokenizer.unit(),
            tokenizer.kind().name()
        );
    }
    let spelling = generate::Spelling::of_checkpoint(&ckpt.meta);
    let prompt = generate::read_prompt_with(&tokenizer, &text, &spelling, &source)?;
    if let Some(warning) = prompt.warning() {
        eprintln!("{warning}");
    }
    let mut out = stdout();
    generate::generate(&model, &tokenizer, &prompt, &opts, &mut out)?;
    out.flush()?;
    Ok(())
}

fn print_info() -> Result<()> {
    let mut out = stdout();
    writeln!(out, "ptb-lm {} (tch 0.24, libtorch 2.11.0)", env!("CARGO_PKG_VERSION"))?;
    writeln!(out, "cuda available: {}", tch::Cuda::is_available())?;
    writeln!(out, "cuda devices: {}", tch::Cuda::device_count())?;
    writeln!(out, "cudnn available: {}", tch::Cuda::cudnn_is_available())?;
    let graphs = match (ptb_lm::cuda::available(), tch::Cuda::is_available()) {
        (true, true) => "usable",
        (true, false) => "built in, but not usable here (no GPU)",
        (false, _) => "not built into this ptb-lm",
    };
    writeln!(out, "cuda graphs: {graphs}")?;
    writeln!(
        out,
        "multi-process training: {}",
        if ptb_lm::dist::available() { "Gloo (CPU)" } else { "not built (install libgloo-dev and build again)" }
    )?;
    writeln!(out, "cpu threads: {}", tch::get_num_threads())?;
    out.flush()?;
    Ok(())
}

/// Standard streams closed when the process started (bit `fd` set for fd 0 and 1), seen
/// before Rust's runtime puts /dev/null in their place, which would make a closed stdout
/// swallow the output without an error.
static CLOSED_AT_START: AtomicU8 = AtomicU8::new(0);

/// Runs before `main` and before Rust's runtime (an ELF constructor), to see the streams as
/// the caller left them.
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array"]
static RECORD_CLOSED_STREAMS: extern "C" fn() = record_closed_streams;

#[cfg(target_os = "linux")]
extern "C" fn record_closed_streams() {
    let mut closed = 0;
    for fd in 0..2 {
        // SAFETY: F_GETFD only queries the descriptor's flags.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            closed |= 1 << fd;
        }
    }
    CLOSED_AT_START.store(closed, Ordering::Relaxed);
}

fn closed_at_start(fd: i32) -> bool {
    CLOSED_AT_START.load(Ordering::Relaxed) & (1 << fd) != 0
}

/// Standard output for what `eval`, `generate` and `info` print: descriptor 1 written
/// directly, every error naming it (`standard output: No space left on device (os error
/// 28)`), and a closed one an error too. A broken pipe still ends the process quietly by
/// SIGPIPE. Buffered: flush it, and check.
fn stdout() -> BufWriter<Stdout> {
    BufWriter::new(Stdout)
}

struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let named = |e: io::Error| io::Error::new(e.kind(), format!("standard output: {e}"));
        if closed_at_start(1) {
            return Err(named(io::Error::from_raw_os_error(libc::EBADF)));
        }
        loop {
            // SAFETY: writes `buf`, valid for its length, to descriptor 1; nothing is owned.
            let n = unsafe { libc::write(1, buf.as_ptr().cast(), buf.len()) };
            match n {
                0 if !buf.is_empty() => return Err(named(io::ErrorKind::WriteZero.into())),
                n if n >= 0 => return Ok(n as usize),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(named(e));
                    }
                }
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Last line of defence: a panic (e.g. tch's plain methods on a libtorch error that no check
/// foresaw) is reported like any error, on one line, instead of a backtrace.
fn report_panic(info: &std::panic::PanicHookInfo<'_>) {
    let payload = info.payload();
    let msg = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    // tch wraps libtorch's message: ...Torch("the message\nException raised from ..."), its
    // line breaks written as the two characters \n. Keep the message's first line.
    let (source, msg) = match msg.split_once("Torch(\"") {
        Some((_, m)) => ("libtorch failed", m.split("\\n").next().unwrap_or_default().trim_end_matches("\")")),
        None => ("internal error", msg),
    };
    let first = msg.lines().next().unwrap_or_default();
    eprintln!("error: {source}: {first}; this is a bug in ptb-lm, please report it");
}
