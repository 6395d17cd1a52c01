//! PNG plots of a run, drawn from its metrics.jsonl: `loss.png` (train and val loss against
//! the step) and `experts.png` (share of tokens each expert of each MoE layer received at
//! each eval). A small raster canvas, a 5x7 bitmap font and a stored-deflate PNG writer keep
//! this free of dependencies.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

type Rgb = [u8; 3];

const WHITE: Rgb = [255, 255, 255];
const BLACK: Rgb = [0, 0, 0];
const GRID: Rgb = [225, 225, 225];
/// Line colours (Tableau 10).
const PALETTE: [Rgb; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];

/// 5x7 glyphs, one byte per row, low 5 bits, most significant bit leftmost.
fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [14, 17, 19, 21, 25, 17, 14],
        '1' => [4, 12, 4, 4, 4, 4, 14],
        '2' => [14, 17, 1, 2, 4, 8, 31],
        '3' => [31, 2, 4, 2, 1, 17, 14],
        '4' => [2, 6, 10, 18, 31, 2, 2],
        '5' => [31, 16, 30, 1, 1, 17, 14],
        '6' => [6, 8, 16, 30, 17, 17, 14],
        '7' => [31, 1, 2, 4, 8, 8, 8],
        '8' => [14, 17, 17, 14, 17, 17, 14],
        '9' => [14, 17, 17, 15, 1, 2, 12],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        '-' => [0, 0, 0, 31, 0, 0, 0],
        '+' => [0, 4, 4, 31, 4, 4, 0],
        '%' => [24, 25, 2, 4, 8, 19, 3],
        ':' => [0, 12, 12, 0, 12, 12, 0],
        '(' => [2, 4, 8, 8, 8, 4, 2],
        ')' => [8, 4, 2, 2, 2, 4, 8],
        '/' => [0, 1, 2, 4, 8, 16, 0],
        ' ' => [0; 7],
        'a' => [0, 0, 14, 1, 15, 17, 15],
        'b' => [16, 16, 22, 25, 17, 17, 30],
        'c' => [0, 0, 14, 16, 16, 17, 14],
        'd' => [1, 1, 13, 19, 17, 17, 15],
        'e' => [0, 0, 14, 17, 31, 16, 14],
        'f' => [6, 9, 8, 28, 8, 8, 8],
        'g' => [0, 15, 17, 17, 15, 1, 14],
        'h' => [16, 16, 22, 25, 17, 17, 17],
        'i' => [4, 0, 12, 4, 4, 4, 14],
        'j' => [2, 0, 6, 2, 2, 18, 12],
        'k' => [16, 16, 18, 20, 24, 20, 18],
        'l' => [12, 4, 4, 4, 4, 4, 14],
        'm' => [0, 0, 26, 21, 21, 17, 17],
        'n' => [0, 0, 22, 25, 17, 17, 17],
        'o' => [0, 0, 14, 17, 17, 17, 14],
        'p' => [0, 0, 30, 17, 30, 16, 16],
        'q' => [0, 0, 13, 19, 15, 1, 1],
        'r' => [0, 0, 22, 25, 16, 16, 16],
        's' => [0, 0, 14, 16, 14, 1, 30],
        't' => [8, 8, 28, 8, 8, 9, 6],
        'u' => [0, 0, 17, 17, 17, 19, 13],
        'v' => [0, 0, 17, 17, 17, 10, 4],
        'w' => [0, 0, 17, 17, 21, 21, 10],
        'x' => [0, 0, 17, 10, 4, 10, 17],
        'y' => [0, 0, 17, 17, 15, 1, 14],
        'z' => [0, 0, 31, 2, 4, 8, 31],
        _ => [31, 17, 17, 17, 17, 17, 31],
    }
}

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<Rgb>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Canvas { w, h, px: vec![WHITE; w * h] }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            self.px[y as usize * self.w + x as usize] = c;
        }
    }

    /// A line two pixels wide (Bresenham).
    fn line(&mut self, x0: f64, y0: f64, x1: f64, y1: f64, c: Rgb) {
        let (mut x, mut y) = (x0.round() as i64, y0.round() as i64);
        let (x1, y1) = (x1.round() as i64, y1.round() as i64);
        let (dx, dy) = ((x1 - x).abs(), -(y1 - y).abs());
        let (sx, sy) = (if x < x1 { 1 } else { -1 }, if y < y1 { 1 } else { -1 });
        let mut err = dx + dy;
        loop {
            self.set(x, y, c);
            self.set(x + 1, y, c);
            self.set(x, y + 1, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn rect(&mut self, x: i64, y: i64, w: i64, h: i64, c: Rgb) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.set(xx, yy, c);
            }
        }
    }

    /// Text at (x, y) (top left), glyphs scaled by `s`.
    fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: Rgb) {
        for (i, ch) in s.chars().enumerate() {
            let g = glyph(ch.to_ascii_lowercase());
            for (row, bits) in g.iter().enumerate() {
                for col in 0..5 {
                    if bits & (1 << (4 - col)) != 0 {
                        self.rect(x + (i as i64 * 6 + col) * scale, y + row as i64 * scale, scale, scale, c);
                    }
                }
            }
        }
    }

    fn png(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity(self.h * (1 + 3 * self.w));
        for y in 0..self.h {
            raw.push(0); // filter: none
            for x in 0..self.w {
                raw.extend_from_slice(&self.px[y * self.w + x]);
            }
        }
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&(self.w as u32).to_be_bytes());
        ihdr.extend_from_slice(&(self.h as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
        chunk(&mut out, b"IHDR", &ihdr);
        chunk(&mut out, b"IDAT", &miniz_oxide::deflate::compress_to_vec_zlib(&raw, 6));
        chunk(&mut out, b"IEND", &[]);
        out
    }
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A line chart in the rectangle (x0, y0, w, h) of the canvas.
fn chart(cv: &mut Canvas, area: (i64, i64, i64, i64), title: &str, series: &[(String, Vec<(f64, f64)>)]) {
    let (x0, y0, w, h) = area;
    let pts: Vec<(f64, f64)> = series.iter().flat_map(|(_, s)| s.iter().copied()).filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
    cv.text(x0, y0 - 22, title, 2, BLACK);
    if pts.is_empty() {
        return;
    }
    let (mut xmin, mut xmax) = (f64::MAX, f64::MIN);
    let (mut ymin, mut ymax) = (f64::MAX, f64::MIN);
    for (x, y) in &pts {
        xmin = xmin.min(*x);
        xmax = xmax.max(*x);
        ymin = ymin.min(*y);
        ymax = ymax.max(*y);
    }
    if xmax <= xmin {
        xmax = xmin + 1.0;
    }
    if ymax <= ymin {
        ymax = ymin + 1.0;
    }
    let pad = (ymax - ymin) * 0.05;
    let (ymin, ymax) = (ymin - pad, ymax + pad);
    let px = |x: f64| x0 as f64 + (x - xmin) / (xmax - xmin) * w as f64;
    let py = |y: f64| (y0 + h) as f64 - (y - ymin) / (ymax - ymin) * h as f64;
    for i in 0..=4 {
        let fy = ymin + (ymax - ymin) * i as f64 / 4.0;
        let fx = xmin + (xmax - xmin) * i as f64 / 4.0;
        cv.line(x0 as f64, py(fy), (x0 + w) as f64, py(fy), GRID);
        cv.line(px(fx), y0 as f64, px(fx), (y0 + h) as f64, GRID);
        cv.text(x0 - 60, py(fy) as i64 - 4, &fmt_tick(fy), 1, BLACK);
        cv.text(px(fx) as i64 - 12, y0 + h + 8, &fmt_tick(fx), 1, BLACK);
    }
    cv.line(x0 as f64, (y0 + h) as f64, (x0 + w) as f64, (y0 + h) as f64, BLACK);
    cv.line(x0 as f64, y0 as f64, x0 as f64, (y0 + h) as f64, BLACK);
    for (i, (name, s)) in series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        for win in s.windows(2) {
            cv.line(px(win[0].0), py(win[0].1), px(win[1].0), py(win[1].1), c);
        }
        if s.len() == 1 {
            cv.rect(px(s[0].0) as i64 - 2, py(s[0].1) as i64 - 2, 5, 5, c);
        }
        let ly = y0 + 4 + 12 * i as i64;
        cv.rect(x0 + w - 110, ly, 10, 8, c);
        cv.text(x0 + w - 96, ly, name, 1, BLACK);
    }
}

fn write_png(path: &Path, cv: &Canvas) -> Result<()> {
    crate::tokenizer::write_atomic(path, &cv.png()).map_err(|e| Error::Msg(format!("cannot write plot: {e}")))
}

/// Redraws loss.png (and experts.png for MoE runs) in `out_dir` from its metrics.jsonl.
pub fn plot_run(out_dir: &Path) -> Result<()> {
    let text = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap_or_default();
    let rows: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let mut train = Vec::new();
    let mut val = Vec::new();
    // layer -> expert -> [(step, share)]
    let mut experts: std::collections::BTreeMap<u64, Vec<Vec<(f64, f64)>>> = Default::default();
    for r in &rows {
        let it = r["iter"].as_f64().unwrap_or(0.0);
        if let Some(l) = r.get("loss").and_then(Value::as_f64) {
            train.push((it, l));
        }
        if let Some(l) = r.get("val_loss").and_then(Value::as_f64) {
            val.push((it, l));
            for layer in r["moe"].as_array().into_iter().flatten() {
                let counts: Vec<f64> = layer["tokens_per_expert"].as_array().into_iter().flatten().filter_map(Value::as_f64).collect();
                let total: f64 = counts.iter().sum::<f64>().max(1.0);
                let entry = experts.entry(layer["layer"].as_u64().unwrap_or(0)).or_insert_with(|| vec![Vec::new(); counts.len()]);
                for (e, c) in counts.iter().enumerate() {
                    if let Some(s) = entry.get_mut(e) {
                        s.push((it, 100.0 * c / total));
                    }
                }
            }
        }
    }
    let mut cv = Canvas::new(900, 520);
    chart(&mut cv, (90, 50, 780, 420), "loss by step", &[("train".into(), train), ("val".into(), val)]);
    write_png(&out_dir.join("loss.png"), &cv)?;
    if !experts.is_empty() {
        let panel = 300i64;
        let mut cv = Canvas::new(900, 40 + panel as usize * experts.len());
        for (i, (layer, series)) in experts.iter().enumerate() {
            let named: Vec<(String, Vec<(f64, f64)>)> = series.iter().enumerate().map(|(e, s)| (format!("expert {e}"), s.clone())).collect();
            chart(&mut cv, (90, 50 + panel * i as i64, 780, panel - 90), &format!("layer {layer}: tokens per expert (%)"), &named);
        }
        write_png(&out_dir.join("experts.png"), &cv)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_container_is_well_formed() {
        let mut cv = Canvas::new(3, 2);
        cv.set(1, 1, [1, 2, 3]);
        let png = cv.png();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&png[12..16], b"IHDR");
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
        // IDAT inflates to the scanlines: 2 rows x (filter byte + 3 RGB pixels).
        let len = u32::from_be_bytes(png[33..37].try_into().unwrap()) as usize;
        assert_eq!(&png[37..41], b"IDAT");
        let raw = miniz_oxide::inflate::decompress_to_vec_zlib(&png[41..41 + len]).unwrap();
        let mut want = Vec::new();
        for y in 0..2 {
            want.push(0);
            for x in 0..3 {
                want.extend_from_slice(&cv.px[y * 3 + x]);
            }
        }
        assert_eq!(raw, want);
        assert_eq!(&raw[14..17], &[1, 2, 3]);
    }
}
