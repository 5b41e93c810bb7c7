//! The engine's own thread and the bounded queue in front of it. Jobs run one at a time on one
//! session whose K/V is reused across requests (the common prompt prefix is kept); text goes back
//! on the job's channel as it is decoded, with stop strings removed.
//!
//! Invariant: the only code that touches the `Engine` and its `Session`. A job whose receiver is
//! gone (the client disconnected) stops at its next token, or is skipped if it has not started.

use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tokio::sync::mpsc;

use super::openai::{ApiError, FinishReason};
use super::stop::{Scan, StopMatcher};
use crate::backend::Backend;
use crate::chat::reuse_prefix;
use crate::engine::{Engine, Flow, GenerateOptions, SamplerConfig, Session, StopReason, Timings};
use crate::reasoning::{Part, ReasoningSplitter};
use crate::stats::{Counters, Outcome};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// One generation request, validated and tokenized.
pub struct Job {
    pub prompt: Vec<u32>,
    /// Already clamped to what fits in the context.
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    pub stop: Vec<String>,
    /// Keep generating through end-of-generation tokens (llama.cpp's `ignore_eos`).
    pub ignore_eos: bool,
    /// Takes the reasoning out of the answer (chat completions; none for plain completions).
    pub splitter: ReasoningSplitter,
    pub events: mpsc::UnboundedSender<Event>,
}

/// What the worker sends back for a job: text pieces, then exactly one `Done` or `Failed`.
#[derive(Debug)]
pub enum Event {
    Text(String),
    /// Reasoning the model wrote before (or between) its reply.
    Reasoning(String),
    Done {
        finish: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(ApiError),
}

/// When the server stops: set once, when shutdown begins, to the end of the grace period. Jobs
/// run (and queued ones start) until then; past it a running answer is cut and the rest are
/// refused, all with 503 `shutting_down`.
#[derive(Debug, Clone, Default)]
pub struct Deadline(Arc<std::sync::OnceLock<std::time::Instant>>);

impl Deadline {
    pub fn set(&self, at: std::time::Instant) {
        let _ = self.0.set(at);
    }

    pub fn passed(&self) -> bool {
        self.0.get().is_some_and(|&at| std::time::Instant::now() >= at)
    }
}

/// What the worker shares with the handlers.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub counters: Counters,
    /// A job is running now.
    pub busy: bool,
    /// Requests turned away because the queue was full.
    pub rejected: u64,
    /// The expert cache's counters after the last job, if the engine has one.
    pub cache: Option<crate::engine::offload::OffloadStats>,
    /// The device's memory and copies (a GPU backend).
    pub device: Option<crate::backend::DeviceStats>,
}

#[derive(Debug, Clone, Default)]
pub struct SharedStats(Arc<Mutex<EngineStats>>);

impl SharedStats {
    /// The counters stay meaningful even if a holder panicked, so poisoning is ignored.
    pub fn lock(&self) -> MutexGuard<'_, EngineStats> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The sending side of the bounded job queue.
#[derive(Clone)]
pub struct Queue {
    tx: mpsc::Sender<Job>,
    stats: SharedStats,
}

impl Queue {
    /// Enqueues `job`, or refuses at once when the queue is full (503, retry later).
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.stats.lock().rejected += 1;
                Err(ApiError::busy(self.tx.max_capacity()))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(ApiError::shutting_down()),
        }
    }

    /// Jobs waiting (not counting the one running).
    pub fn waiting(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    pub fn capacity(&self) -> usize {
        self.tx.max_capacity()
    }
}

/// Starts the engine thread with a queue of `capacity` waiting jobs. The thread ends when every
/// `Queue` clone is dropped and the queue is drained.
pub fn spawn<B: Backend>(
    engine: Engine<B>,
    sess: Session<B>,
    tok: Arc<Tokenizer>,
    capacity: usize,
    stats: SharedStats,
    deadline: Deadline,
) -> std::io::Result<(Queue, JoinHandle<()>)>
where
    Engine<B>: Send,
    Session<B>: Send,
{
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let worker_stats = stats.clone();
    let handle = std::thread::Builder::new()
        .name("moerun-engine".into())
        .spawn(move || run(engine, sess, &tok, rx, &worker_stats, &deadline))?;
    Ok((Queue { tx, stats }, handle))
}

fn run<B: Backend>(
    mut engine: Engine<B>,
    mut sess: Session<B>,
    tok: &Tokenizer,
    mut rx: mpsc::Receiver<Job>,
    stats: &SharedStats,
    deadline: &Deadline,
) {
    while let Some(job) = rx.blocking_recv() {
        if job.events.is_closed() {
            stats.lock().counters.record_unstarted(Outcome::Cancelled);
            continue;
        }
        if deadline.passed() {
            stats.lock().counters.record_unstarted(Outcome::Failed);
            let _ = job.events.send(Event::Failed(ApiError::shutting_down()));
            continue;
        }
        stats.lock().busy = true;
        let end = run_job(&mut engine, &mut sess, tok, &job, deadline);
        {
            let mut s = stats.lock();
            s.busy = false;
            s.counters.record(end.outcome, job.prompt.len(), end.reused, &end.timings);
            s.cache = engine.offload_stats();
            s.device = engine.device_stats();
        }
        // Sent after the counters are updated, so a client that has its answer sees them.
        if let Some(last) = end.last {
            let _ = job.events.send(last);
        }
    }
}

/// How a job ended, and its last event (`Done` or `Failed`) still to send.
struct JobEnd {
    outcome: Outcome,
    reused: usize,
    timings: Timings,
    last: Option<Event>,
}

fn run_job<B: Backend>(
    engine: &mut Engine<B>,
    sess: &mut Session<B>,
    tok: &Tokenizer,
    job: &Job,
    deadline: &Deadline,
) -> JobEnd {
    let reused = reuse_prefix(sess, &job.prompt);
    let is_eog = |id: u32| !job.ignore_eos && tok.is_eog(id);
    let opts = GenerateOptions { max_tokens: job.max_tokens, sampler: job.sampler.clone(), is_eog: &is_eog };
    let mut decoder = StreamDecoder::new(tok);
    let mut stops = StopMatcher::new(&job.stop);
    let mut hit_stop = false;
    let send = |text: String| {
        if !text.is_empty() {
            let _ = job.events.send(Event::Text(text));
        }
    };
    let mut splitter = job.splitter.clone();
    let result = engine.generate(sess, &job.prompt[reused..], &opts, &mut |id| {
        for part in splitter.push(&decoder.push(id)) {
            let text = match part {
                Part::Reasoning(t) => {
                    let _ = job.events.send(Event::Reasoning(t));
                    continue;
                }
                Part::Reply(t) => t,
            };
            // Stop strings apply to the reply.
            match stops.push(&text) {
                Scan::Emit(text) => send(text),
                Scan::Stop(text) => {
                    send(text);
                    hit_stop = true;
                    return Flow::Stop;
                }
            }
        }
        if job.events.is_closed() || deadline.passed() {
            Flow::Stop
        } else {
            Flow::Continue
        }
    });
    let g = match result {
        Ok(g) => g,
        Err(e) => {
            let last = Some(Event::Failed(ApiError::internal(e.to_string())));
            return JobEnd { outcome: Outcome::Failed, reused, timings: Timings::default(), last };
        }
    };
    if job.events.is_closed() {
        return JobEnd { outcome: Outcome::Cancelled, reused, timings: g.timings, last: None };
    }
    if g.stop == StopReason::Stopped && !hit_stop && deadline.passed() {
        let last = Some(Event::Failed(ApiError::shutting_down_cut(g.ids.len())));
        return JobEnd { outcome: Outcome::Failed, reused, timings: g.timings, last };
    }
    if !hit_stop {
        // A character, a partial marker or a partial stop string may still be held back.
        let mut rest = splitter.push(&decoder.finish());
        rest.extend(splitter.finish());
        let mut reply = String::new();
        for part in rest {
            match part {
                Part::Reasoning(t) => {
                    let _ = job.events.send(Event::Reasoning(t));
                }
                Part::Reply(t) => reply.push_str(&t),
            }
        }
        match stops.push(&reply) {
            Scan::Emit(text) => send(text + &stops.finish()),
            Scan::Stop(text) => {
                send(text);
                hit_stop = true;
            }
        }
    }
    let finish = match g.stop {
        _ if hit_stop => FinishReason::Stop,
        StopReason::Eog | StopReason::Stopped => FinishReason::Stop,
        StopReason::Length | StopReason::ContextFull => FinishReason::Length,
    };
    let last = Event::Done { finish, prompt_tokens: job.prompt.len(), completion_tokens: g.ids.len() };
    JobEnd { outcome: Outcome::Completed, reused, timings: g.timings, last: Some(last) }
}
