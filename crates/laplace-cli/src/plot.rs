//! The demo's figures, drawn with `plotters` and written twice: as a
//! compressed PNG and as an SVG.
//!
//! Text uses DejaVu Sans, embedded (a subset, `fonts/`, with its license):
//! plotters' `ab_glyph` font path needs no system fonts or fontconfig, so the
//! figures look the same on any machine, CI included. plotters 0.3.7 places
//! each ab_glyph glyph at its ink box and drops the side bearings (letters
//! crowd and spaces vanish), so PNG text goes through [`GlyphText`], which
//! lays glyphs out on their advances. Legends are drawn in a strip of their
//! own above the panels, so they can never cover data.

use std::path::{Path, PathBuf};
use std::sync::Once;

use ab_glyph::{Font, FontRef, ScaleFont};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters_backend::{BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingErrorKind};

/// DejaVu Sans, subset to Latin-1, Greek and a few symbols (see `fonts/README.md`).
const FONT: &[u8] = include_bytes!("../fonts/DejaVuSans-subset.ttf");
const FAMILY: &str = "sans-serif";

/// Tableau colours, as matplotlib's defaults: familiar and colour-blind friendly enough.
pub const PALETTE: [RGBColor; 4] = [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40)];
const GREY: RGBColor = RGBColor(120, 120, 120);

/// Everything a figure can fail with, as text (plotters' errors are generic over the backend).
type DrawResult = Result<(), String>;

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are compiled in and tested (`figures_render`): a failure is a build defect.
        if plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_err() {
            panic!("the embedded font does not parse");
        }
    });
}

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

fn font(size: f64) -> TextStyle<'static> {
    (FAMILY, size).into_font().into()
}

/// A figure that any plotters backend can draw.
pub trait Figure {
    /// Width and height in pixels (the SVG uses the same numbers).
    fn size(&self) -> (u32, u32);
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult;
}

/// Write `fig` as `<stem>.png` and `<stem>.svg` (each through a temporary
/// file and a rename, so that a failure leaves no half-written figure).
pub fn save(fig: &impl Figure, stem: &Path) -> laplace::Result<[PathBuf; 2]> {
    register_font();
    let (w, h) = fig.size();
    let fail = |what: &str, e: String| laplace::Error::Invalid(format!("drawing {}: {what}: {e}", stem.display()));

    let mut rgb = vec![0u8; (w * h * 3) as usize];
    {
        let font = FontRef::try_from_slice(FONT).map_err(|e| fail("PNG", err(e)))?;
        let root = GlyphText { inner: BitMapBackend::with_buffer(&mut rgb, (w, h)), font }.into_drawing_area();
        root.fill(&WHITE).map_err(err).and_then(|_| fig.draw(&root)).map_err(|e| fail("PNG", e))?;
        root.present().map_err(|e| fail("PNG", err(e)))?;
    }
    let png_path = stem.with_extension("png");
    write_atomic(&png_path, &encode_png(&rgb, w, h).map_err(|e| fail("PNG", err(e)))?)?;

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(err).and_then(|_| fig.draw(&root)).map_err(|e| fail("SVG", e))?;
        root.present().map_err(|e| fail("SVG", err(e)))?;
    }
    let svg_path = stem.with_extension("svg");
    write_atomic(&svg_path, svg.as_bytes())?;
    Ok([png_path, svg_path])
}

/// A bitmap backend whose text is laid out on glyph advances (with kerning)
/// and rasterized by ab_glyph; everything else is the bitmap backend's.
struct GlyphText<'a> {
    inner: BitMapBackend<'a>,
    font: FontRef<'static>,
}

type Drawn<'a> = Result<(), DrawingErrorKind<<BitMapBackend<'a> as DrawingBackend>::ErrorType>>;

impl GlyphText<'_> {
    /// Width and height (ascent − descent) of `text` at `size` pixels.
    fn layout(&self, text: &str, size: f64) -> (f32, f32) {
        let f = self.font.as_scaled(size as f32);
        let mut prev = None;
        let mut w = 0.0;
        for c in text.chars() {
            let id = f.glyph_id(c);
            if let Some(p) = prev {
                w += f.kern(p, id);
            }
            w += f.h_advance(id);
            prev = Some(id);
        }
        (w, f.ascent() - f.descent())
    }
}

impl<'a> DrawingBackend for GlyphText<'a> {
    type ErrorType = <BitMapBackend<'a> as DrawingBackend>::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }
    fn ensure_prepared(&mut self) -> Drawn<'a> {
        self.inner.ensure_prepared()
    }
    fn present(&mut self) -> Drawn<'a> {
        self.inner.present()
    }
    fn draw_pixel(&mut self, p: BackendCoord, c: BackendColor) -> Drawn<'a> {
        self.inner.draw_pixel(p, c)
    }
    fn draw_line<S: BackendStyle>(&mut self, from: BackendCoord, to: BackendCoord, s: &S) -> Drawn<'a> {
        self.inner.draw_line(from, to, s)
    }
    fn draw_rect<S: BackendStyle>(&mut self, a: BackendCoord, b: BackendCoord, s: &S, fill: bool) -> Drawn<'a> {
        self.inner.draw_rect(a, b, s, fill)
    }
    fn draw_path<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(&mut self, path: I, s: &S) -> Drawn<'a> {
        self.inner.draw_path(path, s)
    }
    fn draw_circle<S: BackendStyle>(&mut self, c: BackendCoord, r: u32, s: &S, fill: bool) -> Drawn<'a> {
        self.inner.draw_circle(c, r, s, fill)
    }
    fn fill_polygon<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(&mut self, v: I, s: &S) -> Drawn<'a> {
        self.inner.fill_polygon(v, s)
    }
    fn blit_bitmap(&mut self, pos: BackendCoord, size: (u32, u32), src: &[u8]) -> Drawn<'a> {
        self.inner.blit_bitmap(pos, size, src)
    }

    fn estimate_text_size<T: BackendTextStyle>(&self, text: &str, style: &T) -> Result<(u32, u32), DrawingErrorKind<Self::ErrorType>> {
        let (w, h) = self.layout(text, style.size());
        Ok((w.ceil() as u32, h.ceil() as u32))
    }

    fn draw_text<T: BackendTextStyle>(&mut self, text: &str, style: &T, pos: BackendCoord) -> Drawn<'a> {
        let color = style.color();
        let (width, height) = self.layout(text, style.size());
        // Offset of the text box's top-left corner from the anchor.
        let dx = match style.anchor().h_pos {
            HPos::Left => 0.0,
            HPos::Center => -width / 2.0,
            HPos::Right => -width,
        };
        let dy = match style.anchor().v_pos {
            VPos::Top => 0.0,
            VPos::Center => -height / 2.0,
            VPos::Bottom => -height,
        };
        let trans = style.transform();
        let f = self.font.as_scaled(style.size() as f32);
        let mut pixels = Vec::new();
        let (mut caret, mut prev) = (0.0f32, None);
        for c in text.chars() {
            let id = f.glyph_id(c);
            if let Some(p) = prev {
                caret += f.kern(p, id);
            }
            let glyph = id.with_scale_and_position(f.scale(), ab_glyph::point(dx + caret, dy + f.ascent()));
            if let Some(outline) = f.outline_glyph(glyph) {
                let b = outline.px_bounds();
                outline.draw(|x, y, cov| pixels.push((b.min.x as i32 + x as i32, b.min.y as i32 + y as i32, cov)));
            }
            caret += f.h_advance(id);
            prev = Some(id);
        }
        let (w, h) = self.get_size();
        for (x, y, cov) in pixels {
            let (x, y) = trans.transform(x, y);
            let (x, y) = (pos.0 + x, pos.1 + y);
            if cov > 0.0 && x >= 0 && y >= 0 && x < w as i32 && y < h as i32 {
                self.inner.draw_pixel((x, y), BackendColor { alpha: color.alpha * f64::from(cov.min(1.0)), rgb: color.rgb })?;
            }
        }
        Ok(())
    }
}

/// 8-bit RGB PNG, best compression (flat-coloured plots shrink ~50×).
fn encode_png(rgb: &[u8], w: u32, h: u32) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Best);
    enc.set_filter(png::FilterType::Paeth);
    let mut writer = enc.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(out)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> laplace::Result<()> {
    let io = |e| laplace::Error::Io { path: path.to_path_buf(), source: e };
    let tmp = path.with_extension(format!("{}.tmp", path.extension().and_then(|e| e.to_str()).unwrap_or("")));
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// The figure's title and a legend strip under it; returns the area left for the panels.
fn header<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, title: &str, legend: &[(&str, Swatch)]) -> Result<DrawingArea<DB, Shift>, String> {
    let (w, _) = root.dim_in_pixel();
    let (top, rest) = root.split_vertically(72);
    top.draw(&Text::new(title.to_string(), (w as i32 / 2, 8), font(20.0).pos(Pos::new(HPos::Center, VPos::Top))))
        .map_err(err)?;
    // Legend entries centred as a row: measure them first.
    let style = font(15.0);
    let widths: Vec<i32> = legend
        .iter()
        .map(|(label, _)| top.estimate_text_size(label, &style).map(|(tw, _)| tw as i32 + 34).map_err(err))
        .collect::<Result<_, _>>()?;
    let gap = 24;
    let total: i32 = widths.iter().sum::<i32>() + gap * (widths.len() as i32 - 1).max(0);
    let (mut x, y) = (w as i32 / 2 - total / 2, 48);
    for ((label, swatch), width) in legend.iter().zip(&widths) {
        swatch.draw(&top, x, y)?;
        top.draw(&Text::new(label.to_string(), (x + 28, y), style.pos(Pos::new(HPos::Left, VPos::Center)))).map_err(err)?;
        x += width + gap;
    }
    Ok(rest)
}

/// What a legend entry shows.
#[derive(Clone, Copy)]
pub enum Swatch {
    Box(RGBColor),
    Dot(RGBColor),
    Dashed(RGBColor),
    /// A sample of text, as the figure writes it.
    Label(&'static str),
}

impl Swatch {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>, x: i32, y: i32) -> DrawResult {
        match *self {
            Swatch::Box(c) => area.draw(&Rectangle::new([(x, y - 7), (x + 20, y + 7)], c.mix(0.8).filled())),
            Swatch::Dot(c) => area.draw(&Circle::new((x + 10, y), 5, c.filled())),
            Swatch::Label(t) => area.draw(&Text::new(t, (x + 10, y), font(13.0).pos(Pos::new(HPos::Center, VPos::Center)))),
            Swatch::Dashed(c) => {
                for k in 0..3 {
                    area.draw(&PathElement::new(vec![(x + 8 * k, y), (x + 8 * k + 5, y)], Color::stroke_width(&c, 2))).map_err(err)?;
                }
                return Ok(());
            }
        }
        .map_err(err)
    }
}

/// One method's reliability diagram: per-bin (mean confidence, accuracy,
/// count) of the top-class confidence, as `metrics::reliability` computes them.
pub struct ReliabilityPanel {
    pub title: String,
    pub bins: Vec<(f64, f64, usize)>,
}

/// Reliability diagrams side by side: accuracy per confidence bin as bars,
/// the bin's mean confidence as a dot (the gap between them is the
/// miscalibration), the diagonal, and the number of points above each bar.
pub struct Reliability {
    pub title: String,
    pub panels: Vec<ReliabilityPanel>,
}

impl Figure for Reliability {
    fn size(&self) -> (u32, u32) {
        (20 + 400 * self.panels.len() as u32, 500)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        let legend = [
            ("accuracy in the bin", Swatch::Box(PALETTE[0])),
            ("mean confidence in the bin", Swatch::Dot(PALETTE[3])),
            ("perfect calibration", Swatch::Dashed(GREY)),
            ("points in the bin", Swatch::Label("n")),
        ];
        let rest = header(root, &self.title, &legend)?;
        let areas = rest.margin(0, 0, 10, 10).split_evenly((1, self.panels.len()));
        for (panel, area) in self.panels.iter().zip(&areas) {
            let mut chart = ChartBuilder::on(area)
                .caption(&panel.title, font(17.0))
                .margin(12)
                .x_label_area_size(44)
                .y_label_area_size(54)
                // Headroom above 1 for the counts over full bars.
                .build_cartesian_2d(0f64..1f64, 0f64..1.12f64)
                .map_err(err)?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .y_labels(7)
                .y_label_formatter(&|v| if *v <= 1.0 + 1e-9 { format!("{v:.1}") } else { String::new() })
                .x_labels(6)
                .x_label_formatter(&|v| format!("{v:.1}"))
                .x_desc("confidence (top-class probability)")
                .y_desc("accuracy")
                .label_style(font(13.0))
                .axis_desc_style(font(14.0))
                .light_line_style(WHITE)
                .bold_line_style(RGBColor(225, 225, 225))
                .draw()
                .map_err(err)?;
            let k = panel.bins.len().max(1) as f64;
            let filled: Vec<(usize, &(f64, f64, usize))> = panel.bins.iter().enumerate().filter(|(_, b)| b.2 > 0).collect();
            chart
                .draw_series(filled.iter().map(|(i, b)| {
                    let x0 = *i as f64 / k;
                    Rectangle::new([(x0 + 0.008, 0.0), (x0 + 1.0 / k - 0.008, b.1)], PALETTE[0].mix(0.8).filled())
                }))
                .map_err(err)?;
            chart
                .draw_series(DashedLineSeries::new([(0.0, 0.0), (1.0, 1.0)], 6, 4, Color::stroke_width(&GREY, 2)))
                .map_err(err)?;
            chart.draw_series(filled.iter().map(|(_, b)| Circle::new((b.0, b.0), 4, PALETTE[3].filled()))).map_err(err)?;
            chart
                .draw_series(filled.iter().map(|(i, b)| {
                    let centre = (*i as f64 + 0.5) / k;
                    // Above the bar and its confidence dot, whichever is higher.
                    Text::new(b.2.to_string(), (centre, b.1.max(b.0) + 0.02), font(12.0).pos(Pos::new(HPos::Center, VPos::Bottom)))
                }))
                .map_err(err)?;
        }
        Ok(())
    }
}

/// One method's confidence histograms: named sets of top-class confidences.
pub struct ConfidencePanel {
    pub title: String,
    pub sets: Vec<Vec<f64>>,
}

/// Histograms of the top-class confidence, one panel per method, one bar
/// colour per input set (in-distribution and out-of-distribution), as the
/// fraction of each set per bin.
pub struct ConfidenceHistograms {
    pub title: String,
    pub set_names: Vec<String>,
    pub panels: Vec<ConfidencePanel>,
    pub bins: usize,
}

impl Figure for ConfidenceHistograms {
    fn size(&self) -> (u32, u32) {
        (20 + 400 * self.panels.len() as u32, 480)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        let legend: Vec<(&str, Swatch)> = self.set_names.iter().enumerate().map(|(i, n)| (n.as_str(), Swatch::Box(PALETTE[i % 4]))).collect();
        let rest = header(root, &self.title, &legend)?;
        let areas = rest.margin(0, 0, 10, 10).split_evenly((1, self.panels.len()));
        let bins = self.bins.max(1);
        for (panel, area) in self.panels.iter().zip(&areas) {
            let mut chart = ChartBuilder::on(area)
                .caption(&panel.title, font(17.0))
                .margin(12)
                .x_label_area_size(44)
                .y_label_area_size(54)
                .build_cartesian_2d(0f64..1f64, 0f64..1f64)
                .map_err(err)?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(6)
                .x_label_formatter(&|v| format!("{v:.1}"))
                .y_label_formatter(&|v| format!("{v:.1}"))
                .x_desc("confidence (top-class probability)")
                .y_desc("fraction of the set")
                .label_style(font(13.0))
                .axis_desc_style(font(14.0))
                .light_line_style(WHITE)
                .bold_line_style(RGBColor(225, 225, 225))
                .draw()
                .map_err(err)?;
            let n_sets = panel.sets.len().max(1) as f64;
            let width = 1.0 / bins as f64;
            for (s, conf) in panel.sets.iter().enumerate() {
                let hist = histogram(conf, bins);
                let color = PALETTE[s % 4];
                chart
                    .draw_series(hist.iter().enumerate().filter(|(_, f)| **f > 0.0).map(|(b, f)| {
                        let x0 = b as f64 * width + 0.006 + s as f64 * (width - 0.012) / n_sets;
                        let x1 = x0 + (width - 0.012) / n_sets;
                        Rectangle::new([(x0, 0.0), (x1, *f)], color.mix(0.85).filled())
                    }))
                    .map_err(err)?;
            }
        }
        Ok(())
    }
}

/// Fraction of `values` in each of `bins` equal-width bins (k/B, (k+1)/B]
/// of [0, 1] (the first bin also takes 0), as the ECE bins.
pub fn histogram(values: &[f64], bins: usize) -> Vec<f64> {
    let mut h = vec![0.0; bins];
    for v in values {
        h[((v * bins as f64).ceil() as usize).clamp(1, bins) - 1] += 1.0;
    }
    let n = values.len().max(1) as f64;
    h.iter().map(|c| c / n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_bins_like_the_ece() {
        // (0, .5] and (.5, 1]; 0.5 itself belongs to the first bin, 0 too.
        assert_eq!(histogram(&[0.0, 0.5, 0.51, 1.0], 2), vec![0.5, 0.5]);
    }

    #[test]
    fn figures_render() {
        let dir = std::env::temp_dir().join(format!("laplace-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rel = Reliability {
            title: "reliability".into(),
            panels: vec![ReliabilityPanel { title: "MAP".into(), bins: vec![(0.0, 0.0, 0), (0.9, 0.8, 5)] }],
        };
        let [png, svg] = save(&rel, &dir.join("r")).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        let decoder = png::Decoder::new(std::io::Cursor::new(&bytes));
        let info = decoder.read_info().unwrap().info().clone();
        assert_eq!((info.width, info.height), rel.size());
        // Compressed: far below the 3 bytes per pixel of the raw image.
        assert!(bytes.len() < (info.width * info.height) as usize / 4, "{} bytes", bytes.len());
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.starts_with("<svg") && text.contains("perfect calibration") && text.contains("\n5\n"), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
