//! A tiny raster plotter for the demo's figures: an RGB canvas with lines,
//! filled rectangles and a 5×7 bitmap font (digits, capitals and a few
//! signs), written as PNG with stored (uncompressed) deflate blocks. No
//! dependencies: the demo must build and run anywhere, fonts included.

use std::path::Path;

pub type Rgb = [u8; 3];

pub const WHITE: Rgb = [255, 255, 255];
pub const BLACK: Rgb = [0, 0, 0];
pub const GREY: Rgb = [190, 190, 190];
pub const BLUE: Rgb = [31, 119, 180];
pub const ORANGE: Rgb = [255, 127, 14];
pub const GREEN: Rgb = [44, 160, 44];
pub const RED: Rgb = [214, 39, 40];

pub struct Canvas {
    pub width: usize,
    pub height: usize,
    pixels: Vec<Rgb>,
}

/// 5×7 glyphs, one byte per row, bit 4 = leftmost column.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '/' => [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00],
        _ => [0; 7],
    }
}

impl Canvas {
    pub fn new(width: usize, height: usize) -> Self {
        Canvas { width, height, pixels: vec![WHITE; width * height] }
    }

    pub fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            self.pixels[y as usize * self.width + x as usize] = c;
        }
    }

    pub fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb) {
        for y in y0.min(y1)..=y0.max(y1) {
            for x in x0.min(x1)..=x0.max(x1) {
                self.set(x, y, c);
            }
        }
    }

    /// A line of width `w` (Bresenham, thickened).
    pub fn line(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb, w: i64) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.rect(x - w / 2, y - w / 2, x + (w - 1) / 2, y + (w - 1) / 2, c);
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

    /// Text with its top-left corner at (x, y), glyphs scaled by `s`.
    pub fn text(&mut self, x: i64, y: i64, s: i64, c: Rgb, text: &str) {
        for (i, ch) in text.chars().enumerate() {
            let g = glyph(ch);
            for (r, row) in g.iter().enumerate() {
                for col in 0..5 {
                    if row & (0x10 >> col) != 0 {
                        let px = x + (i as i64 * 6 + col) * s;
                        let py = y + r as i64 * s;
                        self.rect(px, py, px + s - 1, py + s - 1, c);
                    }
                }
            }
        }
    }

    /// Width in pixels of `text` at scale `s`.
    pub fn text_width(text: &str, s: i64) -> i64 {
        text.chars().count() as i64 * 6 * s
    }

    /// Write as an 8-bit RGB PNG.
    pub fn save_png(&self, path: &Path) -> std::io::Result<()> {
        let mut raw = Vec::with_capacity(self.height * (1 + 3 * self.width));
        for y in 0..self.height {
            raw.push(0); // filter: none
            for x in 0..self.width {
                raw.extend_from_slice(&self.pixels[y * self.width + x]);
            }
        }
        let mut png = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&(self.width as u32).to_be_bytes());
        ihdr.extend_from_slice(&(self.height as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit, RGB
        chunk(&mut png, b"IHDR", &ihdr);
        chunk(&mut png, b"IDAT", &zlib_stored(&raw));
        chunk(&mut png, b"IEND", &[]);
        let tmp = path.with_extension("png.tmp");
        std::fs::write(&tmp, &png)?;
        std::fs::rename(&tmp, path)
    }
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A zlib stream of stored (uncompressed) deflate blocks.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01];
    let chunks: Vec<&[u8]> = data.chunks(65535).collect();
    for (i, c) in chunks.iter().enumerate() {
        out.push(u8::from(i + 1 == chunks.len()));
        out.extend_from_slice(&(c.len() as u16).to_le_bytes());
        out.extend_from_slice(&(!(c.len() as u16)).to_le_bytes());
        out.extend_from_slice(c);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + u32::from(x)) % 65521;
        b = (b + a) % 65521;
    }
    out.extend_from_slice(&((b << 16) | a).to_be_bytes());
    out
}

/// Plot frame: maps data coordinates in [0, 1]² to a panel of the canvas.
pub struct Panel {
    pub x0: i64,
    pub y0: i64,
    pub w: i64,
    pub h: i64,
}

impl Panel {
    pub fn px(&self, x: f64) -> i64 {
        self.x0 + (x.clamp(0.0, 1.0) * self.w as f64).round() as i64
    }

    pub fn py(&self, y: f64) -> i64 {
        self.y0 + self.h - (y.clamp(0.0, 1.0) * self.h as f64).round() as i64
    }

    /// Axes with ticks 0, 0.2, ..., 1 on both, labels and a title.
    pub fn axes(&self, cv: &mut Canvas, title: &str, xlabel: &str, ylabel: &str, yticks_max: f64) {
        for i in 0..=5 {
            let t = i as f64 / 5.0;
            cv.line(self.px(t), self.y0, self.px(t), self.y0 + self.h, GREY, 1);
            cv.line(self.x0, self.py(t), self.x0 + self.w, self.py(t), GREY, 1);
            let xl = format!("{t:.1}");
            cv.text(self.px(t) - Canvas::text_width(&xl, 2) / 2, self.y0 + self.h + 8, 2, BLACK, &xl);
            let yl = format!("{:.1}", t * yticks_max);
            cv.text(self.x0 - Canvas::text_width(&yl, 2) - 8, self.py(t) - 7, 2, BLACK, &yl);
        }
        cv.line(self.x0, self.y0, self.x0, self.y0 + self.h, BLACK, 2);
        cv.line(self.x0, self.y0 + self.h, self.x0 + self.w, self.y0 + self.h, BLACK, 2);
        cv.text(self.x0 + (self.w - Canvas::text_width(title, 2)) / 2, self.y0 - 26, 2, BLACK, title);
        cv.text(self.x0 + (self.w - Canvas::text_width(xlabel, 2)) / 2, self.y0 + self.h + 32, 2, BLACK, xlabel);
        // Vertical label, one character per line.
        let top = self.y0 + (self.h - ylabel.len() as i64 * 16) / 2;
        for (i, ch) in ylabel.chars().enumerate() {
            cv.text(self.x0 - 78, top + i as i64 * 16, 2, BLACK, &ch.to_string());
        }
    }
}
