//! `moerun chat`: a conversation in the terminal. Line editing and history from rustyline, answers
//! streamed as they are generated, `/reset`, `/stats`, `/quit`; Ctrl-C stops the answer, not the
//! program. With a pipe on stdin, every line is one message and only the answers go to stdout.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use moerun::backend::Backend;
use moerun::chat::{reuse_prefix, ChatError, ChatFormat, Conversation, Turn};
use moerun::engine::{Engine, Flow, GenerateOptions, SamplerConfig, Session, StopReason};
use moerun::model::{Model, Resident};
use moerun::reasoning::Part;
use moerun::stats::{Counters, ExpertCacheStats, MoeFacts, Outcome};
use moerun::tokenizer::{StreamDecoder, Tokenizer};
use rustyline::error::ReadlineError;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The GGUF model (default: the bundled model).
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// A system message that opens the conversation.
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// Most tokens per answer (default: until the model stops or the context is full).
    #[arg(short = 'n', long)]
    n_predict: Option<usize>,
    /// Keep generating through end-of-turn tokens (until -n or the context is full).
    #[arg(long)]
    ignore_eos: bool,
    #[command(flatten)]
    sampling: super::common_args::SamplingArgs,
    #[command(flatten)]
    engine: super::common_args::EngineArgs,
    #[command(flatten)]
    offload: super::offload_args::OffloadArgs,
}

const HELP: &str = "/reset forgets the conversation, /stats shows what the engine did, /quit leaves (or Ctrl-D); Ctrl-C stops an answer";

pub fn run(a: Args) -> anyhow::Result<()> {
    let device = a.engine.device()?;
    let threads = a.engine.config().threads;
    super::device_args::with_backend!(device, threads, b => chat_on(a, b))
}

fn chat_on<B: Backend>(mut a: Args, backend: B) -> anyhow::Result<()> {
    let path = super::model_path(a.model.as_deref())?;
    let tok = Arc::new(Tokenizer::from_gguf(&path)?);
    let model = Arc::new(Model::load(&path)?);
    let name = model.file.get_str("general.name").ok().flatten().unwrap_or("model").to_string();
    let facts = MoeFacts::of(&model);
    let cfg = a.offload.engine_config(&model, Resident::Auto, a.engine.config());
    let engine = a.offload.engine_on(&model, &path, cfg, backend)?;
    let sess = engine.new_session()?;
    let sampler = a.sampling.config();
    let format = ChatFormat::new(Arc::clone(&tok))?;
    let mut chat = Chat {
        engine,
        sess,
        tok,
        format,
        conv: Conversation::new(a.system),
        sampler,
        n_predict: a.n_predict,
        ignore_eos: a.ignore_eos,
        counters: Counters::default(),
        facts,
        name,
        interrupted: Arc::new(AtomicBool::new(false)),
        io: if std::io::stdin().is_terminal() { Io::Terminal } else { Io::Pipe },
    };
    match chat.io {
        Io::Terminal => chat.interactive(),
        Io::Pipe => chat.piped(),
    }
}

/// Where the conversation happens, and so where status text goes.
#[derive(Clone, Copy)]
enum Io {
    /// Everything on the terminal.
    Terminal,
    /// Answers on stdout; summaries, notices and `/stats` on stderr.
    Pipe,
}

impl Io {
    fn note(self, text: &str) {
        match self {
            Io::Terminal => println!("{text}"),
            Io::Pipe => eprintln!("{text}"),
        }
    }
}

struct Chat<B: Backend> {
    engine: Engine<B>,
    sess: Session<B>,
    tok: Arc<Tokenizer>,
    format: ChatFormat,
    conv: Conversation,
    sampler: SamplerConfig,
    n_predict: Option<usize>,
    ignore_eos: bool,
    counters: Counters,
    facts: MoeFacts,
    name: String,
    /// Set by SIGINT while an answer is being generated.
    interrupted: Arc<AtomicBool>,
    io: Io,
}

/// What a line of input asks for.
enum Line<'a> {
    Empty,
    Quit,
    Reset,
    Stats,
    Help,
    Message(&'a str),
}

fn parse(line: &str) -> Line<'_> {
    match line.trim() {
        "" => Line::Empty,
        "/quit" | "/exit" | "/bye" => Line::Quit,
        "/reset" | "/clear" => Line::Reset,
        "/stats" => Line::Stats,
        "/help" | "/?" => Line::Help,
        _ => Line::Message(line.trim_end_matches(['\r', '\n'])),
    }
}

impl<B: Backend> Chat<B> {
    fn interactive(&mut self) -> anyhow::Result<()> {
        // A first Ctrl-C during an answer sets the flag (the answer stops); a second one before
        // the answer has stopped ends the program, as Ctrl-C normally would.
        use signal_hook::consts::SIGINT;
        signal_hook::flag::register_conditional_shutdown(SIGINT, 130, Arc::clone(&self.interrupted))?;
        signal_hook::flag::register(SIGINT, Arc::clone(&self.interrupted))?;
        let mut rl = rustyline::DefaultEditor::new().context("cannot set up line editing")?;
        let f = &self.facts;
        println!(
            "moerun chat · {} · {} MoE layers × {} experts, {} per token · context {} tokens",
            self.name,
            f.n_layer_moe,
            f.n_expert,
            f.experts_per_token,
            self.engine.n_ctx()
        );
        if !self.format.uses_model_template() {
            println!("(the model has no chat template: using ChatML)");
        }
        println!("{HELP}");
        loop {
            let line = match rl.readline(">>> ") {
                Ok(line) => line,
                Err(ReadlineError::Interrupted) => {
                    println!("(use /quit or Ctrl-D to leave)");
                    continue;
                }
                Err(ReadlineError::Eof) => break,
                Err(e) => return Err(e).context("reading the terminal"),
            };
            let cmd = parse(&line);
            if let Line::Message(_) | Line::Stats | Line::Reset = cmd {
                let _ = rl.add_history_entry(line.as_str());
            }
            if !self.handle(cmd)? {
                break;
            }
        }
        Ok(())
    }

    fn piped(&mut self) -> anyhow::Result<()> {
        for line in std::io::stdin().lock().lines() {
            let line = line.context("reading stdin")?;
            if !self.handle(parse(&line))? {
                break;
            }
        }
        Ok(())
    }

    /// Acts on one line; false means leave.
    fn handle(&mut self, cmd: Line<'_>) -> anyhow::Result<bool> {
        match cmd {
            Line::Empty => {}
            Line::Quit => return Ok(false),
            Line::Reset => {
                self.conv.reset();
                self.io.note("(conversation cleared)");
            }
            Line::Stats => self.print_stats(),
            Line::Help => self.io.note(HELP),
            Line::Message(text) => self.answer(text)?,
        }
        Ok(true)
    }

    fn answer(&mut self, user: &str) -> anyhow::Result<()> {
        let n_ctx = self.engine.n_ctx();
        // Keep a quarter of the context for the answer; older turns go first.
        let max_prompt = n_ctx - n_ctx / 4;
        let prompt = match self.conv.prompt(user, &self.format, max_prompt) {
            Ok(p) => p,
            Err(e @ ChatError::TooLong { .. }) => {
                self.io.note(&format!("(not sent: {e})"));
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        if prompt.dropped_turns > 0 {
            let s = if prompt.dropped_turns == 1 { "" } else { "s" };
            self.io.note(&format!("(context full: dropped the oldest {} turn{s})", prompt.dropped_turns));
        }
        let reused = reuse_prefix(&mut self.sess, &prompt.ids);
        let is_eog = |id: u32| !self.ignore_eos && self.tok.is_eog(id);
        let sampler =
            SamplerConfig { seed: self.sampler.seed.wrapping_add(self.counters.requests), ..self.sampler.clone() };
        let opts = GenerateOptions { max_tokens: self.n_predict.unwrap_or(n_ctx), sampler, is_eog: &is_eog };
        let mut decoder = StreamDecoder::new(&self.tok);
        let mut splitter = self.format.splitter(&prompt.ids);
        let mut answer = String::new();
        let mut out = std::io::stdout().lock();
        // Reasoning (`<think>`, gpt-oss's analysis channel) is shown dimmed on a terminal, left
        // out of piped output and of the conversation, as llama.cpp's chat parsers keep it apart.
        let tty = std::io::stdout().is_terminal();
        let write_parts = |parts: Vec<Part>, out: &mut std::io::StdoutLock<'_>, answer: &mut String| {
            for p in parts {
                match p {
                    Part::Reply(t) => {
                        let _ = out.write_all(t.as_bytes());
                        answer.push_str(&t);
                    }
                    Part::Reasoning(t) if tty => {
                        let _ = write!(out, "\x1b[2m{t}\x1b[0m");
                    }
                    Part::Reasoning(_) => {}
                }
            }
            let _ = out.flush();
        };
        let interrupted = &self.interrupted;
        interrupted.store(false, Ordering::SeqCst);
        let result = self.engine.generate(&mut self.sess, &prompt.ids[reused..], &opts, &mut |id| {
            write_parts(splitter.push(&decoder.push(id)), &mut out, &mut answer);
            if interrupted.load(Ordering::SeqCst) {
                Flow::Stop
            } else {
                Flow::Continue
            }
        });
        let was_interrupted = interrupted.swap(false, Ordering::SeqCst);
        let g = match result {
            Ok(g) => g,
            Err(e) => {
                writeln!(out)?;
                drop(out);
                self.io.note(&format!("(no answer: {e})"));
                return Ok(());
            }
        };
        let mut rest = splitter.push(&decoder.finish());
        rest.extend(splitter.finish());
        write_parts(rest, &mut out, &mut answer);
        writeln!(out)?;
        out.flush()?;
        drop(out);
        match g.stop {
            StopReason::Stopped if was_interrupted => self.io.note("(stopped)"),
            StopReason::ContextFull => {
                self.io.note("(context full: the answer was cut; the oldest turns will be dropped next)")
            }
            StopReason::Length => self.io.note("(reached the -n limit)"),
            _ => {}
        }
        let t = &g.timings;
        let hit = match self.cache_stats().hit_rate {
            Some(h) => format!("{:.1}%", 100.0 * h),
            None => "n/a (no expert cache: all experts resident)".to_string(),
        };
        self.io.note(&format!(
            "[{} tokens, {:.1} tok/s, prompt {} tokens ({} reused), expert hit rate {hit}]",
            t.generated_tokens,
            t.decode_tok_s(),
            prompt.ids.len(),
            reused
        ));
        let outcome = if was_interrupted { Outcome::Cancelled } else { Outcome::Completed };
        self.counters.record(outcome, prompt.ids.len(), reused, t);
        self.conv.push(Turn { user: user.to_string(), assistant: answer });
        Ok(())
    }

    fn cache_stats(&self) -> ExpertCacheStats {
        let tokens = self.counters.prompt_tokens + self.counters.generated_tokens;
        self.engine.offload_stats().map(|o| ExpertCacheStats::of(&o, tokens)).unwrap_or_else(ExpertCacheStats::absent)
    }

    fn print_stats(&self) {
        let f = &self.facts;
        let c = &self.counters;
        let rate = |r: Option<f64>| r.map_or("n/a".to_string(), |r| format!("{r:.1} tok/s"));
        let opt_pct = |r: Option<f64>| r.map_or("n/a".to_string(), |r| format!("{:.1}%", 100.0 * r));
        let cache = self.cache_stats();
        let reused_pct =
            if c.prompt_tokens > 0 { 100.0 * c.prompt_tokens_reused as f64 / c.prompt_tokens as f64 } else { 0.0 };
        let lines = [
            format!(
                "model        {}: {} MoE layers × {} experts, {} per token",
                self.name, f.n_layer_moe, f.n_expert, f.experts_per_token
            ),
            format!(
                "weights      {} active per token of {} ({} in experts)",
                mib(f.active_bytes_per_token),
                mib(f.total_bytes),
                mib(f.expert_bytes)
            ),
            format!(
                "context      {} of {} tokens in use, {} turns",
                self.sess.n_past(),
                self.engine.n_ctx(),
                self.conv.turns().len()
            ),
            format!("answers      {} ({} stopped), {} tokens generated", c.requests, c.cancelled, c.generated_tokens),
            format!(
                "prompts      {} tokens, {} reused from earlier turns ({reused_pct:.0}%)",
                c.prompt_tokens, c.prompt_tokens_reused
            ),
            format!("speed        prefill {}, decode {}", rate(c.prefill_tok_s()), rate(c.decode_tok_s())),
            format!(
                "expert cache {}: hit rate {}, bytes moved per token {}, predictor accuracy {}",
                if cache.enabled { "on" } else { "none yet (experts are read from the file mapping)" },
                opt_pct(cache.hit_rate),
                cache.bytes_moved_per_token.map_or("n/a".to_string(), |b| mib(b as u64)),
                opt_pct(cache.predictor_accuracy),
            ),
        ];
        for l in lines {
            self.io.note(&l);
        }
        if let Some(p) = &cache.predictor {
            let per: Vec<String> = p
                .per_distance
                .iter()
                .map(|d| format!("{} ahead {:.0}%/{:.0}%", d.distance, 100.0 * d.recall, 100.0 * d.precision))
                .collect();
            self.io.note(&format!(
                "predictor    recall/precision {}; {} of {} prefetches used, {} wasted per token; stall {:.2} ms per token",
                per.join(", "),
                p.prefetched_used,
                p.prefetched,
                mib(p.wasted_bytes_per_token as u64),
                cache.stall_ms_per_token.unwrap_or(0.0)
            ));
        }
    }
}

fn mib(b: u64) -> String {
    format!("{:.2} MiB", b as f64 / (1024.0 * 1024.0))
}
