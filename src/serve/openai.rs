//! The OpenAI API's request bodies, read and checked: every field a client may send is
//! named here; unknown fields, wrong types and values out of range are errors naming the
//! field (answered with a 400 and OpenAI's error JSON).

use serde::Deserialize;
use serde_json::Value;

use crate::generate::GenerationConfig;

/// A request error: the message and the offending parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRequest {
    pub message: String,
    pub param: Option<&'static str>,
}

pub fn bad(param: &'static str, message: impl Into<String>) -> BadRequest {
    BadRequest { message: message.into(), param: Some(param) }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields shared by completions and chat completions.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Option<Value>,
    pub messages: Option<Vec<Value>>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub stop: Option<Value>,
    pub seed: Option<i64>,
    pub n: Option<i64>,
    pub echo: Option<bool>,
    /// Completions: the number of alternatives (an integer); chat: whether to return them.
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub best_of: Option<i64>,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    pub suffix: Option<String>,
    pub user: Option<String>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub response_format: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
}

/// The input of a request, after the endpoint-specific part is read.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// A checked request: prompts, sampling and output options.
#[derive(Debug, Clone)]
pub struct Params {
    pub prompts: Vec<Prompt>,
    /// None: as many as fit (chat), resolved per prompt.
    pub max_tokens: Option<usize>,
    pub gen: GenerationConfig,
    pub n: usize,
    pub stop: Vec<String>,
    pub echo: bool,
    /// Alternatives per token; Some(0) = only the chosen token's log-probability.
    pub logprobs: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
}

/// Most alternatives per token, as OpenAI allows for chat (20).
pub const MAX_LOGPROBS: usize = 20;
/// Most stop strings, as OpenAI allows.
pub const MAX_STOPS: usize = 4;

fn prompt_of(v: &Value) -> Result<Vec<Prompt>, BadRequest> {
    let id = |x: &Value| -> Result<u32, BadRequest> {
        x.as_u64().filter(|&i| i <= u32::MAX as u64).map(|i| i as u32).ok_or_else(|| bad("prompt", format!("token ids must be non-negative integers, got {x}")))
    };
    let ids = |list: &[Value]| list.iter().map(id).collect::<Result<Vec<u32>, _>>();
    let prompts = match v {
        Value::String(s) => vec![Prompt::Text(s.clone())],
        Value::Array(list) if list.is_empty() => return Err(bad("prompt", "prompt is an empty list")),
        Value::Array(list) if list.iter().all(Value::is_string) => list.iter().map(|s| Prompt::Text(s.as_str().unwrap_or_default().to_string())).collect(),
        Value::Array(list) if list.iter().all(Value::is_number) => vec![Prompt::Ids(ids(list)?)],
        Value::Array(list) if list.iter().all(Value::is_array) => list.iter().map(|r| Ok(Prompt::Ids(ids(r.as_array().map(Vec::as_slice).unwrap_or_default())?))).collect::<Result<_, BadRequest>>()?,
        other => return Err(bad("prompt", format!("prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids, got {}", kind(other)))),
    };
    if prompts.iter().any(|p| matches!(p, Prompt::Ids(r) if r.is_empty())) {
        return Err(bad("prompt", "a prompt of token ids is empty"));
    }
    Ok(prompts)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a mixed list",
        Value::Object(_) => "an object",
    }
}

/// Chat messages as {role, content} with string content (parts of type "text" joined).
pub fn messages_of(list: &[Value]) -> Result<Vec<Value>, BadRequest> {
    if list.is_empty() {
        return Err(bad("messages", "messages is empty"));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| bad("messages", format!("messages[{i}] has no role")))?;
        if !["system", "developer", "user", "assistant"].contains(&role) {
            return Err(bad("messages", format!("messages[{i}].role '{role}' is not one of system, developer, user, assistant")));
        }
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        (t, _) => return Err(bad("messages", format!("messages[{i}]: content parts of type {} are not supported (text only)", t.unwrap_or("(none)")))),
                    }
                }
                text
            }
            Some(Value::Null) | None if role == "assistant" => String::new(),
            _ => return Err(bad("messages", format!("messages[{i}].content must be a string or a list of text parts"))),
        };
        let mut msg = serde_json::Map::new();
        msg.insert("role".into(), Value::String(role.into()));
        msg.insert("content".into(), Value::String(content));
        if let Some(name) = m.get("name").and_then(Value::as_str) {
            msg.insert("name".into(), Value::String(name.into()));
        }
        out.push(Value::Object(msg));
    }
    Ok(out)
}

fn unsupported(cond: bool, param: &'static str, what: &str) -> Result<(), BadRequest> {
    if cond {
        return Err(bad(param, format!("{param} is not supported by nanomoe{what}")));
    }
    Ok(())
}

impl CompletionRequest {
    /// Checks every field. `chat` selects the chat endpoint's meaning of logprobs and
    /// the input field (messages instead of prompt, read by the caller).
    pub fn params(&self, chat: bool, max_n: usize) -> Result<Params, BadRequest> {
        unsupported(self.presence_penalty.is_some_and(|p| p != 0.0), "presence_penalty", " (use repetition_penalty)")?;
        unsupported(self.frequency_penalty.is_some_and(|p| p != 0.0), "frequency_penalty", " (use repetition_penalty)")?;
        unsupported(self.logit_bias.as_ref().is_some_and(|b| !b.is_empty()), "logit_bias", "")?;
        unsupported(self.suffix.is_some(), "suffix", "")?;
        unsupported(self.tools.as_ref().is_some_and(|t| !t.is_empty()) || self.tool_choice.is_some(), "tools", "")?;
        unsupported(self.response_format.as_ref().is_some_and(|f| f.get("type").and_then(Value::as_str) != Some("text")), "response_format", " (text only)")?;
        let prompts = if chat {
            if self.prompt.is_some() {
                return Err(bad("prompt", "chat completions take messages, not prompt"));
            }
            Vec::new()
        } else {
            if self.messages.is_some() {
                return Err(bad("messages", "completions take a prompt, not messages (use /v1/chat/completions)"));
            }
            prompt_of(self.prompt.as_ref().ok_or_else(|| bad("prompt", "prompt is required"))?)?
        };
        let max_tokens = match (self.max_tokens, self.max_completion_tokens) {
            (Some(m), _) | (None, Some(m)) if m < 1 => return Err(bad("max_tokens", format!("max_tokens must be at least 1, got {m}"))),
            (Some(m), _) | (None, Some(m)) => Some(m as usize),
            // The legacy completions endpoint's default.
            (None, None) if !chat => Some(16),
            (None, None) => None,
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(temperature >= 0.0 && temperature.is_finite()) {
            return Err(bad("temperature", format!("temperature must be >= 0, got {temperature}")));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(bad("top_p", format!("top_p must be in (0, 1], got {top_p}")));
        }
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => None,
            Some(k) if k > 0 => Some(k as usize),
            Some(k) => return Err(bad("top_k", format!("top_k must be a positive integer (or -1 for none), got {k}"))),
        };
        let min_p = self.min_p.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&min_p) {
            return Err(bad("min_p", format!("min_p must be in [0, 1], got {min_p}")));
        }
        let repetition_penalty = self.repetition_penalty.unwrap_or(1.0);
        if !(repetition_penalty > 0.0 && repetition_penalty.is_finite()) {
            return Err(bad("repetition_penalty", format!("repetition_penalty must be > 0, got {repetition_penalty}")));
        }
        let seed = match self.seed {
            Some(s) if s < 0 => return Err(bad("seed", format!("seed must be a non-negative integer, got {s}"))),
            s => s.map(|s| s as u64),
        };
        let n = self.n.unwrap_or(1);
        if n < 1 || n as usize > max_n {
            return Err(bad("n", format!("n must be between 1 and {max_n} (the server's --max-batch), got {n}")));
        }
        if let Some(b) = self.best_of {
            if b != n {
                return Err(bad("best_of", "best_of is not supported by nanomoe (other than equal to n)"));
            }
        }
        let stop = match &self.stop {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(list)) if list.iter().all(Value::is_string) => list.iter().filter_map(Value::as_str).map(str::to_string).collect(),
            Some(_) => return Err(bad("stop", "stop must be a string or a list of strings")),
        };
        if stop.len() > MAX_STOPS {
            return Err(bad("stop", format!("at most {MAX_STOPS} stop strings, got {}", stop.len())));
        }
        if stop.iter().any(String::is_empty) {
            return Err(bad("stop", "stop strings must not be empty"));
        }
        let logprobs = if chat {
            let on = match &self.logprobs {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(bad("logprobs", "logprobs must be a boolean for chat completions")),
            };
            match (on, self.top_logprobs) {
                (_, Some(t)) if t < 0 || t as usize > MAX_LOGPROBS => return Err(bad("top_logprobs", format!("top_logprobs must be between 0 and {MAX_LOGPROBS}, got {t}"))),
                (false, Some(_)) => return Err(bad("top_logprobs", "top_logprobs needs logprobs: true")),
                (true, t) => Some(t.unwrap_or(0) as usize),
                (false, None) => None,
            }
        } else {
            if self.top_logprobs.is_some() {
                return Err(bad("top_logprobs", "top_logprobs is a chat completions parameter; completions take logprobs: <number of alternatives>"));
            }
            match &self.logprobs {
                None | Some(Value::Null) => None,
                Some(Value::Number(k)) => match k.as_u64() {
                    Some(k) if k as usize <= MAX_LOGPROBS => Some(k as usize),
                    _ => return Err(bad("logprobs", format!("logprobs must be an integer between 0 and {MAX_LOGPROBS}, got {k}"))),
                },
                Some(_) => return Err(bad("logprobs", format!("logprobs must be an integer between 0 and {MAX_LOGPROBS}"))),
            }
        };
        if chat && self.echo.is_some() {
            return Err(bad("echo", "echo is a completions parameter"));
        }
        let stream = self.stream.unwrap_or(false);
        if self.stream_options.is_some() && !stream {
            return Err(bad("stream_options", "stream_options needs stream: true"));
        }
        let gen = GenerationConfig {
            max_new_tokens: max_tokens.unwrap_or(0),
            do_sample: temperature > 0.0,
            temperature: if temperature > 0.0 { temperature } else { 1.0 },
            top_k,
            top_p: (top_p < 1.0).then_some(top_p),
            min_p: (min_p > 0.0).then_some(min_p),
            repetition_penalty,
            seed,
            ..GenerationConfig::default()
        };
        Ok(Params {
            prompts,
            max_tokens,
            gen,
            n: n as usize,
            stop,
            echo: self.echo.unwrap_or(false),
            logprobs,
            stream,
            include_usage: self.stream_options.as_ref().is_some_and(|o| o.include_usage),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: Value) -> Result<CompletionRequest, String> {
        serde_json::from_value(v).map_err(|e| e.to_string())
    }

    #[test]
    fn fields_are_checked_and_named() {
        let p = req(serde_json::json!({"model": "m", "prompt": [[1, 2], [3]], "n": 2, "stop": "x", "logprobs": 3, "temperature": 0})).unwrap().params(false, 4).unwrap();
        assert_eq!(p.prompts, vec![Prompt::Ids(vec![1, 2]), Prompt::Ids(vec![3])]);
        assert_eq!((p.n, p.stop.clone(), p.logprobs, p.max_tokens, p.gen.do_sample), (2, vec!["x".to_string()], Some(3), Some(16), false));
        let e = req(serde_json::json!({"prompt": "a", "bogus": 1})).unwrap_err();
        assert!(e.starts_with("unknown field `bogus`"), "{e}");
        let cases = [
            (serde_json::json!({"prompt": "a", "n": 9}), "n", "n must be between 1 and 4 (the server's --max-batch), got 9"),
            (serde_json::json!({"prompt": "a", "top_p": 0}), "top_p", "top_p must be in (0, 1], got 0"),
            (serde_json::json!({"prompt": [1, -2]}), "prompt", "token ids must be non-negative integers, got -2"),
            (serde_json::json!({"prompt": "a", "presence_penalty": 0.5}), "presence_penalty", "presence_penalty is not supported by nanomoe (use repetition_penalty)"),
            (serde_json::json!({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}), "stop", "at most 4 stop strings, got 5"),
            (serde_json::json!({"prompt": "a", "max_tokens": 0}), "max_tokens", "max_tokens must be at least 1, got 0"),
            (serde_json::json!({}), "prompt", "prompt is required"),
        ];
        for (body, param, msg) in cases {
            let e = req(body).unwrap().params(false, 4).unwrap_err();
            assert_eq!((e.param, e.message.as_str()), (Some(param), msg));
        }
        let e = req(serde_json::json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})).unwrap().params(true, 4).unwrap_err();
        assert_eq!(e.message, "top_logprobs needs logprobs: true");
        assert_eq!(messages_of(&[serde_json::json!({"role": "robot", "content": "x"})]).unwrap_err().message, "messages[0].role 'robot' is not one of system, developer, user, assistant");
    }
}
