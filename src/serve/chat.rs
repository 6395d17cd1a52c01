//! Chat prompts: the tokenizer's own chat template (`chat_template` in
//! tokenizer_config.json, a Jinja template rendered as transformers renders it), or, for
//! models without one, [`PLAIN_TEMPLATE`].

use std::path::Path;

use minijinja::{Environment, ErrorKind};
use serde_json::{json, Value};

use crate::error::{input_err, Result};

/// The template of models whose tokenizer has none: each message as "Role: content"
/// followed by a blank line, then "Assistant:" for the reply.
pub const PLAIN_TEMPLATE: &str = "{% for m in messages %}{{ m.role | capitalize }}: {{ m.content }}\n\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}";

/// Instructions one rendering may run: a template is the model's file, and one that loops
/// (nested `range`s, recursion) is stopped with an error instead of holding the request.
/// Templates of real models run ~10-40 per message: a conversation that fills the largest
/// body (`--max-body`, 1 MiB) with short messages stays far below.
pub const TEMPLATE_FUEL: u64 = 20_000_000;

/// Most bytes a rendered prompt may have (a template can repeat strings: `"x" * 100000000`).
/// Far more than any context holds.
pub const MAX_PROMPT_BYTES: usize = 16 << 20;

pub struct ChatTemplate {
    env: Environment<'static>,
    pub source: String,
    /// True when the model has its own template.
    pub from_tokenizer: bool,
    bos: String,
    eos: String,
}

/// A special token in tokenizer_config.json: a string or {"content": ...}.
fn special(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// Reads tokenizer_config.json of a model directory, if any.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        let cfg: Value = match std::fs::read_to_string(&path) {
            Ok(s) => serde_json::from_str(&s).map_err(|e| input_err!("{}: not valid JSON: {e}", path.display()))?,
            Err(_) => Value::Null,
        };
        let template = match cfg.get("chat_template") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: the one named "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string),
            Some(other) => return Err(input_err!("{}: chat_template must be a string or a list of named templates, got {other}", path.display())),
        };
        let chat = Self::new(template.clone().unwrap_or_else(|| PLAIN_TEMPLATE.to_string()), template.is_some(), special(cfg.get("bos_token")), special(cfg.get("eos_token")));
        // A template that does not even parse is the model's problem: say so at start.
        chat.env.template_from_str(&chat.source).map_err(|e| input_err!("{}: chat_template does not parse: {e}", path.display()))?;
        Ok(chat)
    }

    /// The chat template of a GGUF file (`tokenizer.chat_template`, as llama.cpp's converter
    /// and nanomoe write it), with the file's bos / eos tokens; the plain template without.
    pub fn from_gguf(path: &Path) -> Result<Self> {
        let file = crate::gguf::GgufFile::open(path)?;
        let template = file.get("tokenizer.chat_template").and_then(|v| v.as_str()).map(str::to_string);
        let token = |key: &str| -> String {
            let id = file.get(key).and_then(|v| v.as_u64());
            match (id, file.get("tokenizer.ggml.tokens")) {
                (Some(id), Some(crate::gguf::Value::Array(_, toks))) => toks.get(id as usize).and_then(|t| t.as_str()).unwrap_or_default().to_string(),
                _ => String::new(),
            }
        };
        let chat = Self::new(template.clone().unwrap_or_else(|| PLAIN_TEMPLATE.to_string()), template.is_some(), token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id"));
        chat.env.template_from_str(&chat.source).map_err(|e| input_err!("{}: tokenizer.chat_template does not parse: {e}", path.display()))?;
        Ok(chat)
    }

    pub fn new(source: String, from_tokenizer: bool, bos: String, eos: String) -> Self {
        let mut env = Environment::new();
        // transformers renders chat templates with these settings and helpers.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        ChatTemplate { env, source, from_tokenizer, bos, eos }
    }

    /// The prompt of a conversation (messages as {role, content} objects with string
    /// content), ending where the assistant's reply starts.
    pub fn render(&self, messages: &[Value]) -> Result<String> {
        let ctx = json!({
            "messages": messages,
            "add_generation_prompt": true,
            "bos_token": self.bos,
            "eos_token": self.eos,
        });
        let failed = |e: minijinja::Error| {
            let mut msg = e.to_string();
            if let Some(detail) = e.detail() {
                if !msg.contains(detail) {
                    msg = format!("{msg}: {detail}");
                }
            }
            input_err!("the chat template failed: {msg}")
        };
        let template = self.env.template_from_str(&self.source).map_err(failed)?;
        let mut out = Capped { bytes: Vec::new(), over: false };
        match template.render_captured_to(ctx, &mut out) {
            Ok(_) => String::from_utf8(out.bytes).map_err(|_| input_err!("the chat template failed: its output is not UTF-8")),
            Err(_) if out.over => Err(input_err!("the chat template failed: its output exceeds {MAX_PROMPT_BYTES} bytes")),
            Err(e) => Err(failed(e)),
        }
    }
}

/// A buffer that refuses to grow past [`MAX_PROMPT_BYTES`], and says when it did.
struct Capped {
    bytes: Vec<u8>,
    over: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_PROMPT_BYTES {
            self.over = true;
            return Err(std::io::Error::other("the rendered prompt is too long"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_template_and_hf_style_templates_render() {
        let plain = ChatTemplate::new(PLAIN_TEMPLATE.into(), false, String::new(), String::new());
        let msgs = vec![json!({"role": "system", "content": "Be brief."}), json!({"role": "user", "content": "Hi"})];
        assert_eq!(plain.render(&msgs).unwrap(), "System: Be brief.\n\nUser: Hi\n\nAssistant:");
        // ChatML-like template with trim_blocks, python string methods and raise_exception.
        let src = "{% for message in messages %}\n{% if message['role'] not in ['user', 'system'] %}{{ raise_exception('bad role ' + message['role']) }}{% endif %}\n<|im_start|>{{ message['role'] }}\n{{ message['content'].strip() }}<|im_end|>\n{% endfor %}\n{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let t = ChatTemplate::new(src.into(), true, "<s>".into(), "</s>".into());
        let msgs = vec![json!({"role": "user", "content": "  Hi  "})];
        assert_eq!(t.render(&msgs).unwrap(), "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
        let e = t.render(&[json!({"role": "tool", "content": "x"})]).unwrap_err().to_string();
        assert!(e.starts_with("invalid input: the chat template failed: ") && e.contains("bad role tool"), "{e}");
    }

    /// A hostile template (it is the model's file) is stopped with a named error: one that
    /// loops ~10^10 times runs out of its instructions, one that repeats a string out of
    /// bounds hits the prompt's size limit; the same conversation renders on a real template.
    #[test]
    fn hostile_templates_stop_with_an_error() {
        let msgs = vec![json!({"role": "user", "content": "Hi"})];
        let looping = ChatTemplate::new("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}".into(), true, String::new(), String::new());
        let t = std::time::Instant::now();
        let e = looping.render(&msgs).unwrap_err().to_string();
        assert!(e.starts_with("invalid input: the chat template failed: ") && e.contains("fuel"), "{e}");
        assert!(t.elapsed().as_secs() < 30, "{:?}", t.elapsed());
        let huge = ChatTemplate::new("{% for i in range(1000) %}{{ 'x' * 1000000 }}{% endfor %}".into(), true, String::new(), String::new());
        assert_eq!(huge.render(&msgs).unwrap_err().to_string(), format!("invalid input: the chat template failed: its output exceeds {MAX_PROMPT_BYTES} bytes"));
        // The largest conversation a 1 MiB body holds: 50,000 short messages, on a ChatML
        // template, within the fuel.
        let chatml = ChatTemplate::new("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into(), true, String::new(), String::new());
        let many: Vec<Value> = (0..50_000).map(|_| json!({"role": "user", "content": "a"})).collect();
        assert_eq!(chatml.render(&many).unwrap().len(), 50_000 * "<|im_start|>user\na<|im_end|>\n".len() + "<|im_start|>assistant\n".len());
    }
}
