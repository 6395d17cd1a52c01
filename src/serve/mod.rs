//! `nanomoe serve`: an OpenAI-compatible HTTP server with continuous batching.
//!
//! - [`engine`]: the scheduler on the compute pool (admission, chunked prefill, packed
//!   decoding, cancellation);
//! - [`metrics`]: Prometheus counters and histograms.

pub mod chat;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod openai;
pub mod text;

use std::io::Write;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{input_err, Error, Result};
use crate::moe::Routing;
use crate::tokenizer::Tokenizer;
use crate::GPT;

pub use chat::ChatTemplate;
pub use engine::EngineOptions;

/// Settings of [`serve`].
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub host: String,
    /// 0: any free port (the address is printed).
    pub port: u16,
    /// The model name clients send and see.
    pub name: String,
    /// When set, every endpoint but /health needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Largest request body, in bytes.
    pub max_body: usize,
    pub engine: EngineOptions,
    /// After SIGINT/SIGTERM, how long running requests may take to finish.
    pub shutdown_grace: Duration,
}

/// Serves `model` until SIGINT or SIGTERM. MoE layers route dropless: no token of one
/// request is dropped because of another's. Prints the address it listens on.
pub fn serve(mut model: GPT, tok: Tokenizer, chat: ChatTemplate, eos: Option<u32>, opts: ServeOptions) -> Result<()> {
    let host: IpAddr = opts.host.parse().map_err(|_| input_err!("--host must be an IP address (e.g. 127.0.0.1 or 0.0.0.0), got '{}'", opts.host))?;
    if opts.engine.max_batch == 0 || opts.engine.max_queue == 0 || opts.engine.prefill_chunk == 0 {
        return Err(input_err!("--max-batch, --max-queue and --prefill-chunk must be at least 1"));
    }
    if tok.vocab_size() > model.config.vocab_size {
        // Ids the model cannot embed would be errors mid-request; refuse at start.
        let holes = tok.vocab_size() - model.config.vocab_size;
        return Err(input_err!("the tokenizer has {holes} more ids than the model's vocab_size {}: tokenizer and model disagree", model.config.vocab_size));
    }
    model.set_routing(Routing::Dropless);
    let (block_size, vocab_size) = (model.config.block_size, model.config.vocab_size);
    let metrics = Arc::new(metrics::Metrics::default());
    let (engine, engine_thread) = engine::start(model, opts.engine.clone(), metrics.clone());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("nanomoe-http").enable_all().build().map_err(|e| Error::Msg(format!("cannot start the HTTP runtime: {e}")))?;
    let result = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((host, opts.port)).await.map_err(|e| Error::Msg(format!("cannot listen on {host}:{}: {e}", opts.port)))?;
        let addr = listener.local_addr().map_err(|e| Error::Msg(e.to_string()))?;
        let app = Arc::new(http::App {
            engine,
            tok,
            chat,
            name: opts.name.clone(),
            block_size,
            vocab_size,
            eos,
            api_key: opts.api_key.clone(),
            metrics,
            max_body: opts.max_body,
            created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        });
        println!(
            "nanomoe serve: model '{}' on http://{addr}/v1 (max batch {}, max queue {}, prefill chunk {}); Ctrl-C stops",
            opts.name, opts.engine.max_batch, opts.engine.max_queue, opts.engine.prefill_chunk
        );
        let _ = std::io::stdout().flush();
        let signalled = Arc::new(tokio::sync::Notify::new());
        let (on_signal, app2) = (signalled.clone(), app.clone());
        let grace = opts.shutdown_grace;
        let shutdown = async move {
            http::shutdown_signal().await;
            eprintln!("nanomoe serve: shutting down - new requests are refused, running ones get up to {} s to finish", grace.as_secs());
            app2.engine.drain();
            on_signal.notify_one();
        };
        let server = axum::serve(listener, http::router(app)).with_graceful_shutdown(shutdown);
        tokio::select! {
            r = server => r.map_err(|e| Error::Msg(format!("the HTTP server failed: {e}"))),
            _ = async { signalled.notified().await; tokio::time::sleep(grace).await } => {
                eprintln!("nanomoe serve: the grace period is over; cancelling the requests still running");
                Ok(())
            }
        }
    });
    // Dropping the runtime drops every connection and the engine's last handle: the
    // engine cancels what is left and its thread ends.
    drop(rt);
    let _ = engine_thread.join();
    eprintln!("nanomoe serve: stopped");
    result
}
