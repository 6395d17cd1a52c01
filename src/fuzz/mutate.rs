//! A seeded mutator for the fuzz harness: byte-level edits for any file, and structure-aware
//! edits for JSON and TOML (values swapped for absurd sizes, wrong types, deep nesting).

use rand::rngs::StdRng;
use rand::Rng;
use serde_json::Value;

/// Numbers that break size arithmetic and parsers.
const NUMBERS: &[&str] = &[
    "0", "-1", "1", "2", "3", "255", "256", "65535", "65536", "2147483647", "2147483648", "4294967295", "4294967296",
    "1000000000", "1000000000000", "4611686018427387904", "9223372036854775807", "18446744073709551615",
    "18446744073709551616", "1e9", "1e308", "-1e308", "1e-45", "0.5", "-0.0", "NaN", "Infinity", "123",
];

/// JSON values swapped in for a leaf.
fn json_value(rng: &mut StdRng) -> Value {
    match rng.random_range(0..9) {
        0..=2 => serde_json::from_str(NUMBERS[rng.random_range(0..NUMBERS.len())]).unwrap_or(Value::from(u64::MAX)),
        3 => Value::from(["", "gelu", "relu2", "swiglu", "rmsnorm", "start", "gpt2", "nanomoe_gpt", "Sequence", "BPE"][rng.random_range(0..10)]),
        4 => Value::Null,
        5 => Value::Bool(rng.random()),
        6 => Value::Array(vec![Value::from(1), Value::from("x")]),
        7 => Value::Object(Default::default()),
        _ => {
            // Deep nesting.
            let mut v = Value::from(0);
            for _ in 0..rng.random_range(10..2000) {
                v = Value::Array(vec![v]);
            }
            v
        }
    }
}

/// Every path to a value in `v`, depth-first, at most `limit` of them.
fn paths(v: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>, limit: usize) {
    if out.len() >= limit {
        return;
    }
    out.push(prefix.clone());
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                prefix.push(k.clone());
                paths(x, prefix, out, limit);
                prefix.pop();
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate().take(64) {
                prefix.push(i.to_string());
                paths(x, prefix, out, limit);
                prefix.pop();
            }
        }
        _ => {}
    }
}

fn at<'a>(v: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    let mut cur = v;
    for p in path {
        cur = match cur {
            Value::Object(m) => m.get_mut(p)?,
            Value::Array(a) => a.get_mut(p.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// A structure-aware edit of a JSON document; `None` if `bytes` is not JSON.
fn mutate_json(bytes: &[u8], rng: &mut StdRng) -> Option<Vec<u8>> {
    let mut v: Value = serde_json::from_slice(bytes).ok()?;
    let mut all = Vec::new();
    paths(&v, &mut Vec::new(), &mut all, 20_000);
    let path = all[rng.random_range(0..all.len())].clone();
    match rng.random_range(0..6) {
        0 if !path.is_empty() => {
            // Delete the value.
            let (last, parent) = path.split_last().expect("non-empty");
            match at(&mut v, parent) {
                Some(Value::Object(m)) => {
                    m.remove(last);
                }
                Some(Value::Array(a)) => {
                    if let Ok(i) = last.parse::<usize>() {
                        if i < a.len() {
                            a.remove(i);
                        }
                    }
                }
                _ => {}
            }
        }
        1 => {
            // Add an unknown or duplicated key.
            if let Some(Value::Object(m)) = at(&mut v, &path) {
                let k = ["rope_theta", "n_layer", "n_embd", "vocab_size", "decoder", "weight_map", "dtype", "zzz"][rng.random_range(0..8)];
                m.insert(k.into(), json_value(rng));
            }
        }
        _ => {
            if let Some(x) = at(&mut v, &path) {
                *x = json_value(rng);
            }
        }
    }
    serde_json::to_vec(&v).ok()
}

/// Replaces one number in a text (TOML, JSON) with an absurd one.
fn mutate_number(bytes: &[u8], rng: &mut StdRng) -> Option<Vec<u8>> {
    let starts: Vec<usize> = (0..bytes.len()).filter(|&i| bytes[i].is_ascii_digit() && (i == 0 || !bytes[i - 1].is_ascii_alphanumeric())).collect();
    if starts.is_empty() {
        return None;
    }
    let s = starts[rng.random_range(0..starts.len())];
    let e = (s..bytes.len()).find(|&i| !(bytes[i].is_ascii_digit() || bytes[i] == b'.' || bytes[i] == b'e')).unwrap_or(bytes.len());
    let mut out = bytes[..s].to_vec();
    out.extend(NUMBERS[rng.random_range(0..NUMBERS.len())].as_bytes());
    out.extend(&bytes[e..]);
    Some(out)
}

/// Byte-level edits: flips, interesting bytes and little-endian integers, insertions,
/// deletions, duplicated chunks, truncation.
fn mutate_bytes(bytes: &[u8], rng: &mut StdRng) -> Vec<u8> {
    let mut b = bytes.to_vec();
    let n = 1 + rng.random_range(0..4);
    for _ in 0..n {
        if b.is_empty() {
            b.push(rng.random());
            continue;
        }
        // Headers (where sizes live) are edited more often than bulk data.
        let i = if rng.random_bool(0.6) { rng.random_range(0..b.len().min(512)) } else { rng.random_range(0..b.len()) };
        match rng.random_range(0..8) {
            0 => b[i] ^= 1 << rng.random_range(0..8),
            1 => b[i] = [0u8, 0xff, 0x7f, 0x80, b'0', b'9', b'"', b'{', b'['][rng.random_range(0..9)],
            2 => {
                let v: u64 = [0, u32::MAX as u64, u64::MAX, 1 << 31, 1 << 40][rng.random_range(0..5)];
                let w = [2, 4, 8][rng.random_range(0..3)];
                for (k, byte) in v.to_le_bytes().iter().take(w).enumerate() {
                    if i + k < b.len() {
                        b[i + k] = *byte;
                    }
                }
            }
            3 => {
                let len = rng.random_range(1..64);
                let ins: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                b.splice(i..i, ins);
            }
            4 => {
                let end = (i + rng.random_range(1..64)).min(b.len());
                b.drain(i..end);
            }
            5 => {
                let end = (i + rng.random_range(1..256)).min(b.len());
                let chunk = b[i..end].to_vec();
                let at = rng.random_range(0..=b.len());
                b.splice(at..at, chunk);
            }
            6 => b.truncate(i),
            _ => b[i] = rng.random(),
        }
    }
    b
}

/// A safetensors file (u64 header length, JSON header, data) with its header edited as JSON
/// and its length field rewritten to match; `None` if `bytes` is not one.
fn mutate_safetensors(bytes: &[u8], rng: &mut StdRng) -> Option<Vec<u8>> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header = bytes.get(8..8usize.checked_add(n)?)?;
    if header.first() != Some(&b'{') {
        return None;
    }
    let new = mutate_json(header, rng)?;
    let mut out = (new.len() as u64).to_le_bytes().to_vec();
    out.extend(new);
    out.extend(&bytes[8 + n..]);
    Some(out)
}

/// One mutation of a file's bytes.
pub fn mutate(bytes: &[u8], rng: &mut StdRng) -> Vec<u8> {
    let r = rng.random_range(0..10);
    let out = match r {
        0..=3 => mutate_safetensors(bytes, rng).or_else(|| mutate_json(bytes, rng)),
        4..=5 => mutate_number(bytes, rng),
        _ => None,
    };
    out.unwrap_or_else(|| mutate_bytes(bytes, rng))
}
