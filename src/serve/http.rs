//! The HTTP side: axum routes on tokio, OpenAI's JSON and Server-Sent Events, API keys,
//! body limits, and graceful shutdown. Nothing here runs the model: requests become
//! [`Job`]s for the engine, whose events come back over a channel.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::chat::ChatTemplate;
use super::engine::{EngineHandle, Event, Finish, Job, Refused, TokenLogprob};
use super::metrics::Metrics;
use super::openai::{bad, messages_of, BadRequest, CompletionRequest, Params, Prompt};
use super::text::TextStream;
use crate::tokenizer::Tokenizer;

/// Everything a handler needs.
pub struct App {
    pub engine: EngineHandle,
    pub tok: Tokenizer,
    pub chat: ChatTemplate,
    /// The model's name in requests and responses.
    pub name: String,
    pub block_size: usize,
    pub vocab_size: usize,
    pub eos: Option<u32>,
    pub api_key: Option<String>,
    pub metrics: Arc<Metrics>,
    pub max_body: usize,
    pub created: u64,
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(not_found)
        .with_state(app)
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

/// OpenAI's error body.
fn error(status: StatusCode, message: &str, kind: &str, param: Option<&str>, code: Option<&str>) -> Response {
    json_response(status, &json!({"error": {"message": message, "type": kind, "param": param, "code": code}}))
}

/// An error's message without the "invalid input: " prefix of `Error::Input`.
fn message(e: &crate::Error) -> String {
    match e {
        crate::Error::Input(m) => m.clone(),
        e => e.to_string(),
    }
}

fn bad_request(e: BadRequest) -> Response {
    error(StatusCode::BAD_REQUEST, &e.message, "invalid_request_error", e.param, None)
}

fn authorize(app: &App, headers: &HeaderMap) -> Result<(), Response> {
    let Some(key) = &app.api_key else { return Ok(()) };
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if g.len() == key.len() && g.bytes().zip(key.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0 => Ok(()),
        Some(_) => Err(error(StatusCode::UNAUTHORIZED, "incorrect API key", "invalid_request_error", None, Some("invalid_api_key"))),
        None => Err(error(StatusCode::UNAUTHORIZED, "this server needs an API key: send the header Authorization: Bearer <key>", "invalid_request_error", None, Some("invalid_api_key"))),
    }
}

async fn health(State(app): State<Arc<App>>) -> Response {
    if app.engine.is_draining() {
        return json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"status": "shutting down"}));
    }
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

async fn metrics(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&app, &headers) {
        return r;
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render()).into_response()
}

async fn models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&app, &headers) {
        return r;
    }
    json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": [{
            "id": app.name, "object": "model", "created": app.created, "owned_by": "nanomoe",
            "max_model_len": app.block_size,
            "chat_template": {"source": if app.chat.from_tokenizer { "tokenizer_config.json" } else { "plain" }, "template": app.chat.source},
        }]}),
    )
}

async fn not_found(method: Method, uri: Uri) -> Response {
    error(StatusCode::NOT_FOUND, &format!("no route for {method} {}", uri.path()), "invalid_request_error", None, Some("not_found"))
}

async fn completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    let r = generate(&app, &headers, body, false).await;
    app.metrics.request("/v1/completions", r.status().as_u16());
    r
}

async fn chat_completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    let r = generate(&app, &headers, body, true).await;
    app.metrics.request("/v1/chat/completions", r.status().as_u16());
    r
}

/// A request, read and tokenized.
struct Request {
    params: Params,
    /// Token ids of each prompt and its text (for echo).
    prompts: Vec<(Vec<u32>, String)>,
}

fn read_request(app: &App, body: &[u8], chat: bool) -> Result<Request, Response> {
    let req: CompletionRequest = serde_json::from_slice(body).map_err(|e| error(StatusCode::BAD_REQUEST, &format!("invalid JSON body: {e}"), "invalid_request_error", None, None))?;
    if let Some(m) = &req.model {
        if m != &app.name {
            return Err(error(StatusCode::BAD_REQUEST, &format!("the model '{m}' is not served here; this server serves '{}'", app.name), "invalid_request_error", Some("model"), Some("model_not_found")));
        }
    }
    let params = req.params(chat, app.engine.options.max_batch).map_err(bad_request)?;
    let texts = if chat {
        let messages = messages_of(req.messages.as_deref().ok_or_else(|| bad_request(bad("messages", "messages is required")))?).map_err(bad_request)?;
        vec![Prompt::Text(app.chat.render(&messages).map_err(|e| bad_request(bad("messages", message(&e))))?)]
    } else {
        params.prompts.clone()
    };
    let param = if chat { "messages" } else { "prompt" };
    let mut prompts = Vec::with_capacity(texts.len());
    for p in texts {
        let (ids, text) = match p {
            Prompt::Text(t) => {
                let ids = app.tok.encode(&t).map_err(|e| bad_request(bad(param, format!("the prompt cannot be tokenized: {}", message(&e)))))?;
                (ids, t)
            }
            Prompt::Ids(ids) => {
                if let Some(&id) = ids.iter().find(|&&t| t as usize >= app.vocab_size) {
                    return Err(bad_request(bad(param, format!("token id {id} is out of range for vocab_size {}", app.vocab_size))));
                }
                let text = app.tok.decode(&ids).unwrap_or_default();
                (ids, text)
            }
        };
        if ids.is_empty() {
            return Err(bad_request(bad(param, "the prompt encodes to no tokens")));
        }
        let len = ids.len();
        let max = params.max_tokens.unwrap_or(app.block_size.saturating_sub(len));
        if len >= app.block_size || len + max > app.block_size {
            return Err(error(
                StatusCode::BAD_REQUEST,
                &format!("this model's context is {} tokens; the prompt has {len} and max_tokens asks for {max} more ({} in all)", app.block_size, len + max),
                "invalid_request_error",
                Some(if params.max_tokens.is_some() && len < app.block_size { "max_tokens" } else { param }),
                Some("context_length_exceeded"),
            ));
        }
        prompts.push((ids, text));
    }
    Ok(Request { params, prompts })
}

/// One choice's text, finish and log-probabilities as the engine's events come in.
struct ChoiceState {
    text: TextStream,
    out: String,
    finish: Option<Finish>,
    logprobs: Vec<TokenLogprob>,
}

/// Turns engine events into per-choice updates (stop strings applied).
struct Collector {
    choices: Vec<ChoiceState>,
    stopped: Vec<Arc<Vec<AtomicBool>>>,
    n: usize,
    prompt_lp: Vec<Option<Vec<Option<TokenLogprob>>>>,
    completion_tokens: usize,
    open: usize,
    eos: Option<u32>,
}

enum Update {
    Text { choice: usize, text: String, logprob: Option<TokenLogprob> },
    Finish { choice: usize, finish: Finish, text: String },
    Error(String),
}

impl Collector {
    fn on_event(&mut self, tok: &Tokenizer, ev: Event) -> Vec<Update> {
        match ev {
            Event::Prompt { choice_base, logprobs } => {
                self.prompt_lp[choice_base / self.n] = Some(logprobs);
                Vec::new()
            }
            Event::Error { message } => vec![Update::Error(message)],
            Event::Token { choice, id, logprob } => {
                let c = &mut self.choices[choice];
                if c.finish.is_some() {
                    return Vec::new();
                }
                self.completion_tokens += 1;
                if Some(id) == self.eos {
                    return Vec::new(); // the end: its Done event follows
                }
                if let Some(lp) = &logprob {
                    c.logprobs.push(lp.clone());
                }
                let text = match c.text.push(tok, id) {
                    Ok(t) => t,
                    Err(e) => return vec![Update::Error(e.to_string())],
                };
                c.out.push_str(&text);
                // One update per token, also when its text is held back (an incomplete
                // character, a possible stop string): streams send a chunk per token, as
                // vLLM does, with the text it releases, "" included. Not when the token
                // ended the text at a stop string with nothing to add: the finish follows.
                let mut out = Vec::new();
                if !(c.text.stopped && text.is_empty() && logprob.is_none()) {
                    out.push(Update::Text { choice, text, logprob });
                }
                if c.text.stopped {
                    c.finish = Some(Finish::Stop);
                    self.stopped[choice / self.n][choice % self.n].store(true, Ordering::SeqCst);
                    self.open -= 1;
                    out.push(Update::Finish { choice, finish: Finish::Stop, text: String::new() });
                }
                out
            }
            Event::Done { choice, finish } => {
                let c = &mut self.choices[choice];
                if c.finish.is_some() {
                    return Vec::new();
                }
                c.finish = Some(finish);
                let text = c.text.flush();
                c.out.push_str(&text);
                self.open -= 1;
                vec![Update::Finish { choice, finish, text }]
            }
        }
    }
}

fn token_text(tok: &Tokenizer, id: u32) -> String {
    tok.decode(&[id]).unwrap_or_default()
}

/// Completions' logprobs object for tokens (None = a prompt's first token).
fn completion_logprobs(tok: &Tokenizer, items: &[Option<&TokenLogprob>], ids: &[u32], start_offset: usize) -> Value {
    let mut offset = start_offset;
    let (mut tokens, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for (item, &id) in items.iter().zip(ids) {
        let text = token_text(tok, id);
        offsets.push(offset);
        offset += text.len();
        tokens.push(text);
        match item {
            Some(lp) => {
                lps.push(json!(lp.logprob));
                let top: serde_json::Map<String, Value> = lp.top.iter().map(|&(t, l)| (token_text(tok, t), json!(l))).collect();
                tops.push(Value::Object(top));
            }
            None => {
                lps.push(Value::Null);
                tops.push(Value::Null);
            }
        }
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

fn chat_logprob_entry(tok: &Tokenizer, lp: &TokenLogprob) -> Value {
    let one = |id: u32, l: f32| {
        let t = token_text(tok, id);
        json!({"token": t, "logprob": l, "bytes": t.as_bytes()})
    };
    let mut e = one(lp.id, lp.logprob);
    e["top_logprobs"] = Value::Array(lp.top.iter().map(|&(t, l)| one(t, l)).collect());
    e
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// The common path of both endpoints.
async fn generate(app: &Arc<App>, headers: &HeaderMap, body: Body, chat: bool) -> Response {
    if let Err(r) = authorize(app, headers) {
        return r;
    }
    let too_big = || error(StatusCode::PAYLOAD_TOO_LARGE, &format!("the request body exceeds the server's limit of {} bytes (--max-body)", app.max_body), "invalid_request_error", None, Some("request_too_large"));
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|l| l > app.max_body as u64) {
        return too_big();
    }
    let bytes: Bytes = match axum::body::to_bytes(body, app.max_body).await {
        Ok(b) => b,
        Err(_) => return too_big(),
    };
    let req = match read_request(app, &bytes, chat) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let (tx, rx) = unbounded_channel();
    let n = req.params.n;
    let mut stopped = Vec::new();
    let mut jobs = Vec::new();
    let arrived = Instant::now();
    for (j, (ids, _)) in req.prompts.iter().enumerate() {
        let flags = Arc::new((0..n).map(|_| AtomicBool::new(false)).collect::<Vec<_>>());
        stopped.push(flags.clone());
        let mut gen = req.params.gen.clone();
        gen.max_new_tokens = req.params.max_tokens.unwrap_or(app.block_size - ids.len());
        gen.eos_token_id = app.eos;
        jobs.push(Job {
            prompt: ids.clone(),
            n,
            choice_base: j * n,
            gen,
            logprobs: req.params.logprobs,
            prompt_logprobs: req.params.echo && req.params.logprobs.is_some() && !req.params.stream,
            events: tx.clone(),
            stopped: flags,
            arrived,
        });
    }
    drop(tx);
    match app.engine.submit(jobs) {
        Ok(()) => {}
        Err(Refused::QueueFull(w)) => {
            return error(StatusCode::TOO_MANY_REQUESTS, &format!("the server is busy: {w} requests are waiting (--max-queue {}); retry later", app.engine.options.max_queue), "rate_limit_error", None, Some("queue_full"))
        }
        Err(Refused::TooMany(n)) => {
            return error(StatusCode::BAD_REQUEST, &format!("this request holds {n} prompts; the server queues at most {} (--max-queue)", app.engine.options.max_queue), "invalid_request_error", Some("prompt"), None)
        }
        Err(Refused::ShuttingDown) => return error(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down", "server_error", None, Some("shutting_down")),
    }
    let total = req.prompts.len() * n;
    let collector = Collector {
        choices: (0..total).map(|_| ChoiceState { text: TextStream::new(req.params.stop.clone()), out: String::new(), finish: None, logprobs: Vec::new() }).collect(),
        stopped,
        n,
        prompt_lp: vec![None; req.prompts.len()],
        completion_tokens: 0,
        open: total,
        eos: app.eos,
    };
    let meta = Meta {
        id: format!("{}-{:016x}", if chat { "chatcmpl" } else { "cmpl" }, rand::random::<u64>()),
        created: now_secs(),
        chat,
    };
    if req.params.stream {
        return stream_response(app.clone(), rx, collector, req, meta);
    }
    complete_response(app, rx, collector, req, meta).await
}

struct Meta {
    id: String,
    created: u64,
    chat: bool,
}

async fn complete_response(app: &App, mut rx: UnboundedReceiver<Event>, mut col: Collector, req: Request, meta: Meta) -> Response {
    while col.open > 0 {
        let Some(ev) = rx.recv().await else {
            return error(StatusCode::INTERNAL_SERVER_ERROR, "the engine stopped before the request finished", "server_error", None, None);
        };
        for u in col.on_event(&app.tok, ev) {
            if let Update::Error(message) = u {
                return error(StatusCode::INTERNAL_SERVER_ERROR, &message, "server_error", None, None);
            }
        }
    }
    let prompt_tokens: usize = req.prompts.iter().map(|(ids, _)| ids.len()).sum();
    let n = req.params.n;
    let choices: Vec<Value> = col
        .choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let finish = c.finish.map(Finish::as_str);
            let gen_ids: Vec<u32> = c.logprobs.iter().map(|l| l.id).collect();
            if meta.chat {
                let logprobs = req.params.logprobs.map(|_| json!({"content": c.logprobs.iter().map(|lp| chat_logprob_entry(&app.tok, lp)).collect::<Vec<_>>(), "refusal": null}));
                json!({"index": i, "message": {"role": "assistant", "content": c.out}, "logprobs": logprobs, "finish_reason": finish})
            } else {
                let (ids, prompt_text) = &req.prompts[i / n];
                let text = if req.params.echo { format!("{prompt_text}{}", c.out) } else { c.out.clone() };
                let logprobs = req.params.logprobs.map(|_| {
                    let mut items: Vec<Option<&TokenLogprob>> = Vec::new();
                    let mut all_ids = Vec::new();
                    if req.params.echo {
                        if let Some(p) = &col.prompt_lp[i / n] {
                            items.extend(p.iter().map(Option::as_ref));
                            all_ids.extend_from_slice(ids);
                        }
                    }
                    items.extend(c.logprobs.iter().map(Some));
                    all_ids.extend_from_slice(&gen_ids);
                    completion_logprobs(&app.tok, &items, &all_ids, 0)
                });
                json!({"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish})
            }
        })
        .collect();
    let object = if meta.chat { "chat.completion" } else { "text_completion" };
    json_response(
        StatusCode::OK,
        &json!({"id": meta.id, "object": object, "created": meta.created, "model": app.name, "choices": choices, "usage": usage(prompt_tokens, col.completion_tokens), "system_fingerprint": null}),
    )
}

/// Server-Sent Events as OpenAI sends them: `data: {chunk}` per update, then the usage
/// chunk when asked for, then `data: [DONE]`.
fn stream_response(app: Arc<App>, rx: UnboundedReceiver<Event>, col: Collector, req: Request, meta: Meta) -> Response {
    struct St {
        app: Arc<App>,
        rx: UnboundedReceiver<Event>,
        col: Collector,
        req: Request,
        meta: Meta,
        started: bool,
        finished: bool,
    }
    let st = St { app, rx, col, req, meta, started: false, finished: false };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        if st.finished {
            return None;
        }
        let mut out = String::new();
        let object = if st.meta.chat { "chat.completion.chunk" } else { "text_completion" };
        let include_usage = st.req.params.include_usage;
        let chunk = |st: &St, choices: Vec<Value>| -> String {
            let mut v = json!({"id": st.meta.id, "object": object, "created": st.meta.created, "model": st.app.name, "choices": choices, "system_fingerprint": null});
            if include_usage {
                v["usage"] = Value::Null;
            }
            format!("data: {v}\n\n")
        };
        if !st.started {
            st.started = true;
            let total = st.col.choices.len();
            for i in 0..total {
                if st.meta.chat {
                    let c = json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
                    out.push_str(&chunk(&st, vec![c]));
                } else if st.req.params.echo {
                    let c = json!({"index": i, "text": st.req.prompts[i / st.req.params.n].1, "logprobs": null, "finish_reason": null});
                    out.push_str(&chunk(&st, vec![c]));
                }
            }
            if !out.is_empty() {
                return Some((Ok::<_, Infallible>(Bytes::from(out)), st));
            }
        }
        loop {
            if st.col.open == 0 {
                if include_usage {
                    let prompt_tokens: usize = st.req.prompts.iter().map(|(ids, _)| ids.len()).sum();
                    let v = json!({"id": st.meta.id, "object": object, "created": st.meta.created, "model": st.app.name, "choices": [], "usage": usage(prompt_tokens, st.col.completion_tokens), "system_fingerprint": null});
                    out.push_str(&format!("data: {v}\n\n"));
                }
                out.push_str("data: [DONE]\n\n");
                st.finished = true;
                return Some((Ok(Bytes::from(out)), st));
            }
            let Some(ev) = st.rx.recv().await else {
                let v = json!({"error": {"message": "the engine stopped before the request finished", "type": "server_error", "param": null, "code": null}});
                st.finished = true;
                return Some((Ok(Bytes::from(format!("data: {v}\n\ndata: [DONE]\n\n"))), st));
            };
            let updates = st.col.on_event(&st.app.tok, ev);
            for u in updates {
                match u {
                    Update::Error(message) => {
                        let v = json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}});
                        out.push_str(&format!("data: {v}\n\ndata: [DONE]\n\n"));
                        st.finished = true;
                        return Some((Ok(Bytes::from(out)), st));
                    }
                    Update::Text { choice, text, logprob } => {
                        let c = if st.meta.chat {
                            let lp = logprob.as_ref().map(|lp| json!({"content": [chat_logprob_entry(&st.app.tok, lp)], "refusal": null}));
                            json!({"index": choice, "delta": {"content": text}, "logprobs": lp, "finish_reason": null})
                        } else {
                            let lp = logprob.as_ref().map(|lp| completion_logprobs(&st.app.tok, &[Some(lp)], &[lp.id], 0));
                            json!({"index": choice, "text": text, "logprobs": lp, "finish_reason": null})
                        };
                        out.push_str(&chunk(&st, vec![c]));
                    }
                    Update::Finish { choice, finish, text } => {
                        let c = if st.meta.chat {
                            if !text.is_empty() {
                                let c = json!({"index": choice, "delta": {"content": text}, "logprobs": null, "finish_reason": null});
                                out.push_str(&chunk(&st, vec![c]));
                            }
                            json!({"index": choice, "delta": {}, "logprobs": null, "finish_reason": finish.as_str()})
                        } else {
                            json!({"index": choice, "text": text, "logprobs": null, "finish_reason": finish.as_str()})
                        };
                        out.push_str(&chunk(&st, vec![c]));
                    }
                }
            }
            if !out.is_empty() {
                return Some((Ok(Bytes::from(out)), st));
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "could not build the response", "server_error", None, None))
}

/// Waits for SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
