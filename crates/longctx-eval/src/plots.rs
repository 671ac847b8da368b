//! The figures of an evaluation: a needle-in-a-haystack heatmap and score/perplexity curves
//! against context length, written as PNGs ready to paste into a paper.
//!
//! They have to look the same wherever the evaluation ran, so the font is compiled in rather than
//! looked up on the machine (CI runners have no fonts at all), and every problem with the input
//! becomes a `PlotError` naming the file instead of a panic at the end of a long run. A PNG only
//! appears under its final name once it is complete, so a report never links a half-drawn image.

use std::fmt::Display;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, Ranged, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle, FontTransform};

/// Why a figure could not be written, with the file it was meant for.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw {}: {reason}", path.display())]
pub struct PlotError {
    pub path: PathBuf,
    pub reason: String,
}

/// One named curve: `(context length in tokens, value)` pairs, in any order.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(usize, f64)>,
}

const FONT: &str = "sans-serif";
const INK: RGBColor = RGBColor(0x22, 0x22, 0x22);
const MUTED: RGBColor = RGBColor(0x55, 0x55, 0x55);
const GRID: RGBColor = RGBColor(0xE4, 0xE4, 0xE4);
const NOT_MEASURED: RGBColor = RGBColor(0xE6, 0xE6, 0xE6);
const SCORE_LOW: (u8, u8, u8) = (0xF0, 0x49, 0x6E);
const SCORE_MID: (u8, u8, u8) = (0xEB, 0xB8, 0x39);
const SCORE_HIGH: (u8, u8, u8) = (0x0C, 0xD7, 0x9F);
/// Tableau 10: distinguishable for most colour-blind readers and still apart in greyscale print
/// once combined with the marker shapes.
const PALETTE: [RGBColor; 10] = [
    RGBColor(0x4E, 0x79, 0xA7),
    RGBColor(0xF2, 0x8E, 0x2B),
    RGBColor(0xE1, 0x57, 0x59),
    RGBColor(0x76, 0xB7, 0xB2),
    RGBColor(0x59, 0xA1, 0x4F),
    RGBColor(0xED, 0xC9, 0x48),
    RGBColor(0xB0, 0x7A, 0xA1),
    RGBColor(0xFF, 0x9D, 0xA7),
    RGBColor(0x9C, 0x75, 0x5F),
    RGBColor(0xBA, 0xB0, 0xAC),
];

/// The heatmap colour for a score 0..=100 (clamped), as (r, g, b).
pub fn score_colour(score: f64) -> (u8, u8, u8) {
    let s = if score.is_nan() {
        0.0
    } else {
        score.clamp(0.0, 100.0)
    };
    let (from, to, t) = if s <= 50.0 {
        (SCORE_LOW, SCORE_MID, s / 50.0)
    } else {
        (SCORE_MID, SCORE_HIGH, (s - 50.0) / 50.0)
    };
    let mix = |a: u8, b: u8| (f64::from(a) + (f64::from(b) - f64::from(a)) * t).round() as u8;
    (mix(from.0, to.0), mix(from.1, to.1), mix(from.2, to.2))
}

/// "1k" for 1024, "16k" for 16384, "1.5k" for 1536, "1M" for 1048576, else the plain number
/// (e.g. "1000").
pub fn length_label(tokens: usize) -> String {
    // Context lengths are powers of two or halfway between two of them; anything else is an
    // unusual length the reader should see exactly.
    for (unit, suffix) in [(1 << 20, "M"), (1 << 10, "k")] {
        if tokens > 0 && tokens.is_multiple_of(unit / 2) {
            return if tokens.is_multiple_of(unit) {
                format!("{}{suffix}", tokens / unit)
            } else {
                format!("{}.5{suffix}", tokens / unit)
            };
        }
    }
    tokens.to_string()
}

/// A depth × length heatmap of retrieval scores (0–100), NIAH style: columns are context lengths,
/// rows are needle depths in percent (0 at the top), each cell coloured by [`score_colour`] with
/// its rounded score printed in it, and a colour bar. A `None` (not measured) or non-finite cell is
/// light grey without text. `scores[row][col]` with rows = depths, cols = lengths.
pub fn heatmap(
    path: &Path,
    title: &str,
    lengths: &[usize],
    depths: &[f64],
    scores: &[Vec<Option<f64>>],
) -> Result<(), PlotError> {
    let fail = |reason: String| PlotError {
        path: path.to_path_buf(),
        reason,
    };
    let grid = HeatGrid::new(lengths, depths, scores).map_err(fail)?;
    let layout = HeatmapLayout::new(grid.cols.len(), grid.rows.len());
    write_png(path, (layout.width, layout.height), |root| {
        draw_heatmap(root, &layout, title, &grid)
    })
    .map_err(fail)
}

/// Line chart of one or more series against context length (log₂ x axis with ticks at the
/// series' lengths), with markers, distinct colours and a legend beside the plot.
/// `y_range` fixes the y axis (values outside it are pinned to its edge); `None` fits the data.
/// `threshold` draws a dashed horizontal reference line, `fit` a thin dashed line without markers;
/// both are named in the legend.
pub fn curves(
    path: &Path,
    title: &str,
    y_label: &str,
    series: &[Series],
    y_range: Option<(f64, f64)>,
    threshold: Option<(f64, &str)>,
    fit: Option<&Series>,
) -> Result<(), PlotError> {
    let fail = |reason: String| PlotError {
        path: path.to_path_buf(),
        reason,
    };
    let chart = CurveChart::new(series, y_range, threshold, fit).map_err(fail)?;
    write_png(path, (CURVES_WIDTH, CURVES_HEIGHT), |root| {
        draw_curves(root, title, y_label, &chart)
    })
    .map_err(fail)
}

fn ensure_font() -> Result<(), String> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED
        .get_or_init(|| register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok());
    if ok {
        Ok(())
    } else {
        Err("the embedded DejaVu Sans font could not be loaded".to_string())
    }
}

fn drawing<E: Display>(e: E) -> String {
    format!("drawing failed: {e}")
}

/// Draws into a hidden sibling file and renames it into place, so that a failure leaves no
/// truncated or half-drawn image under `path`.
fn write_png<F>(path: &Path, size: (u32, u32), draw: F) -> Result<(), String>
where
    F: FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<(), String>,
{
    ensure_font()?;
    let name = path
        .file_name()
        .ok_or_else(|| "the path does not name a file".to_string())?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(format!("directory {} does not exist", dir.display()));
    }
    // The bitmap backend picks the encoder from the extension, hence ".png" on the scratch name.
    let scratch = dir.join(format!(".{}.partial.png", name.to_string_lossy()));
    let drawn = {
        let root = BitMapBackend::new(&scratch, size).into_drawing_area();
        draw(&root).and_then(|()| {
            root.present()
                .map_err(|e| format!("cannot write the PNG: {e}"))
        })
    };
    // A failed draw still leaves a file behind: the backend saves whatever it has when dropped.
    let moved = drawn.and_then(|()| {
        fs::rename(&scratch, path).map_err(|e| format!("cannot move the PNG into place: {e}"))
    });
    if moved.is_err() {
        let _ = fs::remove_file(&scratch);
    }
    moved
}

fn font(size: f64) -> TextStyle<'static> {
    (FONT, size).into_font().color(&INK)
}

/// Shrinks a title that would not fit across the image instead of letting it be clipped.
fn title_style<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
) -> Result<TextStyle<'static>, String> {
    let room = area.dim_in_pixel().0.saturating_sub(32);
    let mut size = 22.0;
    while size > 12.0
        && area
            .estimate_text_size(title, &font(size))
            .map_err(drawing)?
            .0
            > room
    {
        size -= 1.0;
    }
    Ok(font(size))
}

/// Draws `text` with its capital letters centred on `(x, y)` vertically. plotters' own vertical
/// centring with ab_glyph sits several pixels high, which shows in a 40 px heatmap cell.
fn draw_text_at<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    text: &str,
    style: &TextStyle,
    h: HPos,
    (x, y): (i32, i32),
) -> Result<(), String> {
    // With a top anchor ab_glyph puts the baseline half the font size below the anchor; DejaVu's
    // capitals and digits are about 0.62 of that size tall.
    let size = style.font.get_size();
    let top = y - (size * 0.5 - size * 0.31).round() as i32;
    area.draw_text(text, &style.pos(Pos::new(h, VPos::Top)), (x, top))
        .map_err(drawing)
}

/// Scores with rows and columns sorted so depth grows downwards and length to the right,
/// whatever order the caller measured them in.
struct HeatGrid {
    cols: Vec<usize>,
    rows: Vec<f64>,
    cells: Vec<Vec<Option<f64>>>,
}

impl HeatGrid {
    fn new(lengths: &[usize], depths: &[f64], scores: &[Vec<Option<f64>>]) -> Result<Self, String> {
        if lengths.is_empty() {
            return Err("the heatmap has no context lengths".to_string());
        }
        if depths.is_empty() {
            return Err("the heatmap has no needle depths".to_string());
        }
        // Beyond these a heatmap is wider or taller than image viewers and papers cope with.
        if lengths.len() > HEAT_MAX_COLS || depths.len() > HEAT_MAX_ROWS {
            return Err(format!(
                "{} lengths × {} depths is too many to draw; at most {HEAT_MAX_COLS} × {HEAT_MAX_ROWS}",
                lengths.len(),
                depths.len()
            ));
        }
        if let Some(d) = depths.iter().find(|d| !d.is_finite()) {
            return Err(format!("needle depth {d} is not a number"));
        }
        if scores.len() != depths.len() {
            return Err(format!(
                "{} rows of scores for {} depths",
                scores.len(),
                depths.len()
            ));
        }
        if let Some((i, row)) = scores
            .iter()
            .enumerate()
            .find(|(_, r)| r.len() != lengths.len())
        {
            return Err(format!(
                "score row {i} has {} values for {} lengths",
                row.len(),
                lengths.len()
            ));
        }
        let mut col_order: Vec<usize> = (0..lengths.len()).collect();
        col_order.sort_by_key(|&c| lengths[c]);
        let mut row_order: Vec<usize> = (0..depths.len()).collect();
        row_order.sort_by(|&a, &b| depths[a].total_cmp(&depths[b]));
        let cells: Vec<Vec<Option<f64>>> = row_order
            .iter()
            .map(|&r| {
                col_order
                    .iter()
                    .map(|&c| scores[r][c].filter(|s| s.is_finite()))
                    .collect()
            })
            .collect();
        if cells.iter().flatten().all(Option::is_none) {
            return Err("the heatmap has no finite scores".to_string());
        }
        Ok(Self {
            cols: col_order.iter().map(|&c| lengths[c]).collect(),
            rows: row_order.iter().map(|&r| depths[r]).collect(),
            cells,
        })
    }
}

/// Pixel geometry of a heatmap, shared by the drawing and the tests that probe cell colours.
struct HeatmapLayout {
    width: u32,
    height: u32,
    left: i32,
    top: i32,
    cell_w: i32,
    cell_h: i32,
    cols: i32,
    rows: i32,
}

const HEAT_LEFT: i32 = 100;
const HEAT_TOP: i32 = 66;
const HEAT_RIGHT: i32 = 116;
const HEAT_BOTTOM: i32 = 72;
const HEAT_MIN_WIDTH: i32 = 640;
const HEAT_MAX_COLS: usize = 128;
const HEAT_MAX_ROWS: usize = 256;
/// Keeps the colour bar beside the grid tall enough for its five labels.
const HEAT_MIN_GRID_HEIGHT: i32 = 200;

impl HeatmapLayout {
    fn new(cols: usize, rows: usize) -> Self {
        let cols = cols.clamp(1, HEAT_MAX_COLS) as i32;
        let rows = rows.clamp(1, HEAT_MAX_ROWS) as i32;
        let min_cell_w = (HEAT_MIN_WIDTH - HEAT_LEFT - HEAT_RIGHT + cols - 1) / cols;
        let cell_w = min_cell_w.max(120);
        let cell_h = ((HEAT_MIN_GRID_HEIGHT + rows - 1) / rows).max(40);
        Self {
            width: (HEAT_LEFT + cols * cell_w + HEAT_RIGHT) as u32,
            height: (HEAT_TOP + rows * cell_h + HEAT_BOTTOM) as u32,
            left: HEAT_LEFT,
            top: HEAT_TOP,
            cell_w,
            cell_h,
            cols,
            rows,
        }
    }

    /// Upper-left and lower-right corners of a cell, inset so neighbours are separated by a
    /// white hairline.
    fn cell(&self, row: usize, col: usize) -> ((i32, i32), (i32, i32)) {
        let x = self.left + col as i32 * self.cell_w;
        let y = self.top + row as i32 * self.cell_h;
        ((x + 1, y + 1), (x + self.cell_w - 2, y + self.cell_h - 2))
    }

    fn grid_right(&self) -> i32 {
        self.left + self.cols * self.cell_w
    }

    fn grid_bottom(&self) -> i32 {
        self.top + self.rows * self.cell_h
    }
}

fn percent_label(depth: f64) -> String {
    if (depth - depth.round()).abs() < 1e-9 {
        format!("{depth:.0}%")
    } else {
        format!("{depth:.1}%")
    }
}

fn rgb((r, g, b): (u8, u8, u8)) -> RGBColor {
    RGBColor(r, g, b)
}

fn draw_heatmap<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    layout: &HeatmapLayout,
    title: &str,
    grid: &HeatGrid,
) -> Result<(), String> {
    root.fill(&WHITE).map_err(drawing)?;
    let centre_x = layout.width as i32 / 2;
    draw_text_at(
        root,
        title,
        &title_style(root, title)?,
        HPos::Center,
        (centre_x, 28),
    )?;

    let label = font(14.0);
    let cell_text = font(15.0);
    for (r, row) in grid.cells.iter().enumerate() {
        for (c, score) in row.iter().enumerate() {
            let (ul, lr) = layout.cell(r, c);
            let fill = score.map_or(NOT_MEASURED, |s| rgb(score_colour(s)));
            root.draw(&Rectangle::new([ul, lr], fill.filled()))
                .map_err(drawing)?;
            if let Some(s) = score {
                let centre = ((ul.0 + lr.0) / 2, (ul.1 + lr.1) / 2);
                draw_text_at(
                    root,
                    // `+ 0.0` keeps a slightly negative score from printing as "-0".
                    &format!("{}", s.round() + 0.0),
                    &cell_text,
                    HPos::Center,
                    centre,
                )?;
            }
        }
    }

    let bottom = layout.grid_bottom();
    for (c, &len) in grid.cols.iter().enumerate() {
        let x = layout.left + c as i32 * layout.cell_w + layout.cell_w / 2;
        draw_text_at(
            root,
            &length_label(len),
            &label,
            HPos::Center,
            (x, bottom + 14),
        )?;
    }
    for (r, &depth) in grid.rows.iter().enumerate() {
        let y = layout.top + r as i32 * layout.cell_h + layout.cell_h / 2;
        let text = percent_label(depth);
        draw_text_at(root, &text, &label, HPos::Right, (layout.left - 10, y))?;
    }
    let desc = font(16.0);
    let grid_centre_x = (layout.left + layout.grid_right()) / 2;
    let grid_centre_y = (layout.top + bottom) / 2;
    draw_text_at(
        root,
        "Context length (tokens)",
        &desc,
        HPos::Center,
        (grid_centre_x, bottom + 46),
    )?;
    root.draw_text(
        "Needle depth",
        &desc
            .transform(FontTransform::Rotate270)
            .pos(Pos::new(HPos::Center, VPos::Center)),
        (24, grid_centre_y),
    )
    .map_err(drawing)?;

    draw_colour_bar(root, layout, grid)
}

fn draw_colour_bar<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    layout: &HeatmapLayout,
    grid: &HeatGrid,
) -> Result<(), String> {
    let x0 = layout.grid_right() + 26;
    let x1 = x0 + 18;
    let (top, bottom) = (layout.top + 1, layout.grid_bottom() - 2);
    let span = f64::from(bottom - top);
    for y in top..=bottom {
        let score = 100.0 * f64::from(bottom - y) / span;
        // A filled rectangle needs some height to draw anything; the next row overdraws the
        // extra pixel.
        root.draw(&Rectangle::new(
            [(x0, y), (x1, y + 1)],
            rgb(score_colour(score)).filled(),
        ))
        .map_err(drawing)?;
    }
    root.draw(&Rectangle::new(
        [(x0, top), (x1, bottom)],
        MUTED.stroke_width(1),
    ))
    .map_err(drawing)?;
    let label = font(13.0);
    for score in [0, 25, 50, 75, 100] {
        let y = bottom - (span * f64::from(score) / 100.0).round() as i32;
        root.draw(&PathElement::new(
            vec![(x1, y), (x1 + 4, y)],
            MUTED.stroke_width(1),
        ))
        .map_err(drawing)?;
        draw_text_at(root, &score.to_string(), &label, HPos::Left, (x1 + 8, y))?;
    }
    root.draw_text(
        "Score",
        &label.pos(Pos::new(HPos::Center, VPos::Bottom)),
        ((x0 + x1) / 2, layout.top - 10),
    )
    .map_err(drawing)?;
    if grid.cells.iter().flatten().any(Option::is_none) {
        let y = layout.grid_bottom() + 7;
        root.draw(&Rectangle::new(
            [(x0, y), (x1, y + 14)],
            NOT_MEASURED.filled(),
        ))
        .map_err(drawing)?;
        draw_text_at(root, "n/a", &label, HPos::Left, (x1 + 8, y + 7))?;
    }
    Ok(())
}

const CURVES_WIDTH: u32 = 900;
const CURVES_HEIGHT: u32 = 560;

/// Curve data mapped to the plot's coordinates: x is log₂ of the length.
struct CurveChart {
    lines: Vec<(String, Vec<(f64, f64)>)>,
    fit: Option<(String, Vec<(f64, f64)>)>,
    threshold: Option<(f64, String)>,
    /// Lengths that get a tick: those of the series, not of the fit, which may be sampled densely.
    ticks: Vec<usize>,
    x: (f64, f64),
    y: (f64, f64),
}

fn plottable(points: &[(usize, f64)]) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = points
        .iter()
        .filter(|&&(len, v)| len > 0 && v.is_finite())
        .map(|&(len, v)| ((len as f64).log2(), v))
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

impl CurveChart {
    fn new(
        series: &[Series],
        y_range: Option<(f64, f64)>,
        threshold: Option<(f64, &str)>,
        fit: Option<&Series>,
    ) -> Result<Self, String> {
        if series.is_empty() {
            return Err("no series to plot".to_string());
        }
        let lines: Vec<(String, Vec<(f64, f64)>)> = series
            .iter()
            .map(|s| (s.name.clone(), plottable(&s.points)))
            .collect();
        if lines.iter().all(|(_, p)| p.is_empty()) {
            return Err("no series has a finite value at a positive context length".to_string());
        }
        let fit = fit.map(|f| (f.name.clone(), plottable(&f.points)));
        if let Some((t, _)) = threshold.filter(|(t, _)| !t.is_finite()) {
            return Err(format!("threshold {t} is not a number"));
        }
        let mut ticks: Vec<usize> = series
            .iter()
            .flat_map(|s| &s.points)
            .filter(|(len, v)| *len > 0 && v.is_finite())
            .map(|&(len, _)| len)
            .collect();
        ticks.sort_unstable();
        ticks.dedup();

        let drawn = || {
            lines
                .iter()
                .chain(&fit)
                .flat_map(|(_, p)| p.iter().copied())
        };
        let x = padded(drawn().map(|p| p.0), 0.05, 0.3);
        let y = match y_range {
            Some((lo, hi)) if lo.is_finite() && hi.is_finite() && lo < hi => (lo, hi),
            Some((lo, hi)) => return Err(format!("y range {lo}..{hi} is empty or not finite")),
            None => padded(
                drawn().map(|p| p.1).chain(threshold.map(|t| t.0)),
                0.08,
                0.5,
            ),
        };
        if !(y.0.is_finite() && y.1.is_finite()) {
            return Err("the values are too large to plot".to_string());
        }
        Ok(Self {
            lines,
            fit,
            threshold: threshold.map(|(t, label)| (t, label.to_string())),
            ticks,
            x,
            y,
        })
    }
}

/// The values' range widened by `frac` of its span on each side, and by at least `min_pad` so
/// that a single value still gets an axis around it.
fn padded(values: impl Iterator<Item = f64>, frac: f64, min_pad: f64) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let pad = ((hi - lo) * frac).max(min_pad.max(hi.abs().max(lo.abs()) * 0.02));
    (lo - pad, hi + pad)
}

/// Round tick values (1, 2 or 5 × 10ⁿ apart) within `lo..=hi`, and the decimals they need.
fn nice_ticks(lo: f64, hi: f64, at_most: usize) -> (Vec<f64>, usize) {
    let raw = (hi - lo) / at_most as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * magnitude);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    // `+ 0.0` turns -0.0 into 0.0 so no axis reads "-0".
    let ticks = (first..=last).map(|i| i as f64 * step + 0.0).collect();
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    (ticks, decimals)
}

/// A linear axis with exactly the given ticks and their own labels, which plotters' stock
/// axes cannot combine.
struct Axis {
    scale: RangedCoordf64,
    ticks: Vec<f64>,
    labels: AxisLabels,
}

#[derive(Clone, Copy)]
enum AxisLabels {
    /// The value is log₂ of a context length.
    Length,
    Decimals(usize),
}

impl Ranged for Axis {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.scale.map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        // Plotters asks separately for the light grid lines; these charts have none.
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.scale.range()
    }
}

impl ValueFormatter<f64> for Axis {
    fn format_ext(&self, value: &f64) -> String {
        match self.labels {
            AxisLabels::Length => length_label(value.exp2().round() as usize),
            AxisLabels::Decimals(d) => format!("{value:.d$}"),
        }
    }
}

enum Swatch {
    Series(usize),
    Fit,
    Threshold,
}

const FIT_COLOUR: RGBColor = RGBColor(0x66, 0x66, 0x66);
const THRESHOLD_COLOUR: RGBColor = RGBColor(0x44, 0x44, 0x44);
const LEGEND_MAX_WIDTH: u32 = 280;

fn draw_curves<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    y_label: &str,
    chart_data: &CurveChart,
) -> Result<(), String> {
    root.fill(&WHITE).map_err(drawing)?;
    let (width, _) = root.dim_in_pixel();
    draw_text_at(
        root,
        title,
        &title_style(root, title)?,
        HPos::Center,
        (width as i32 / 2, 26),
    )?;
    let body = root.margin(48, 0, 0, 0);

    let legend_font = font(14.0);
    let mut entries: Vec<(String, Swatch)> = chart_data
        .lines
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (name.clone(), Swatch::Series(i)))
        .collect();
    if let Some((name, _)) = &chart_data.fit {
        entries.push((name.clone(), Swatch::Fit));
    }
    if let Some((value, label)) = &chart_data.threshold {
        entries.push((format!("{label} ({value})"), Swatch::Threshold));
    }
    let text_room = LEGEND_MAX_WIDTH - 60;
    for (text, _) in &mut entries {
        *text = fit_text(root, text, &legend_font, text_room)?;
    }
    let widest = entries.iter().try_fold(0, |w, (text, _)| {
        root.estimate_text_size(text, &legend_font)
            .map(|(tw, _)| w.max(tw))
            .map_err(drawing)
    })?;
    let legend_width = (widest + 60).min(LEGEND_MAX_WIDTH);
    let (plot_area, legend_area) = body.split_horizontally(width - legend_width);

    let (margin, y_label_area, x_label_area) = (14, 64, 50);
    let plot_px = plot_area.dim_in_pixel().0 as f64 - f64::from(2 * margin + y_label_area);
    let (x0, x1) = chart_data.x;
    // Ticks closer than a label's width would print on top of each other.
    let min_gap = (x1 - x0) * 46.0 / plot_px;
    let mut x_ticks: Vec<f64> = Vec::new();
    for len in &chart_data.ticks {
        let x = (*len as f64).log2();
        if x_ticks.last().is_none_or(|&last| x - last >= min_gap) {
            x_ticks.push(x);
        }
    }
    let (y0, y1) = chart_data.y;
    let (y_ticks, decimals) = nice_ticks(y0, y1, 8);

    let mut chart = ChartBuilder::on(&plot_area)
        .margin(margin)
        .x_label_area_size(x_label_area)
        .y_label_area_size(y_label_area)
        .build_cartesian_2d(
            Axis {
                scale: (x0..x1).into(),
                ticks: x_ticks,
                labels: AxisLabels::Length,
            },
            Axis {
                scale: (y0..y1).into(),
                ticks: y_ticks,
                labels: AxisLabels::Decimals(decimals),
            },
        )
        .map_err(drawing)?;
    chart
        .configure_mesh()
        .x_desc("Context length (tokens)")
        .y_desc(y_label)
        .label_style(font(14.0))
        .axis_desc_style(font(16.0))
        .bold_line_style(GRID)
        .axis_style(MUTED)
        .draw()
        .map_err(drawing)?;

    let clamp = |p: &(f64, f64)| (p.0, p.1.clamp(y0, y1));
    // A threshold outside a fixed y range would be drawn over the labels; the legend still names it.
    if let Some(&(value, _)) = chart_data
        .threshold
        .as_ref()
        .filter(|t| (y0..=y1).contains(&t.0))
    {
        chart
            .draw_series(std::iter::once(DashedPathElement::new(
                vec![(x0, value), (x1, value)],
                9,
                6,
                THRESHOLD_COLOUR.stroke_width(2),
            )))
            .map_err(drawing)?;
    }
    if let Some((_, points)) = &chart_data.fit {
        chart
            .draw_series(std::iter::once(DashedPathElement::new(
                points.iter().map(clamp).collect::<Vec<_>>(),
                5,
                4,
                FIT_COLOUR.stroke_width(1),
            )))
            .map_err(drawing)?;
    }
    for (i, (_, points)) in chart_data.lines.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().map(clamp),
                colour.stroke_width(2),
            ))
            .map_err(drawing)?;
        for p in points {
            draw_marker(root, i, chart.backend_coord(&clamp(p)))?;
        }
    }

    let x = 4;
    let mut y = margin + 10;
    let room = legend_area.dim_in_pixel().1 as i32 - y;
    let step = (room / entries.len().max(1) as i32).clamp(14, 24);
    for (text, swatch) in &entries {
        let line = [(x, y), (x + 30, y)];
        match swatch {
            Swatch::Series(i) => {
                let colour = PALETTE[i % PALETTE.len()];
                legend_area
                    .draw(&PathElement::new(line, colour.stroke_width(2)))
                    .map_err(drawing)?;
                draw_marker(&legend_area, *i, (x + 15, y))?;
            }
            Swatch::Fit => legend_area
                .draw(&DashedPathElement::new(
                    line,
                    5,
                    4,
                    FIT_COLOUR.stroke_width(1),
                ))
                .map_err(drawing)?,
            Swatch::Threshold => legend_area
                .draw(&DashedPathElement::new(
                    line,
                    9,
                    6,
                    THRESHOLD_COLOUR.stroke_width(2),
                ))
                .map_err(drawing)?,
        }
        draw_text_at(&legend_area, text, &legend_font, HPos::Left, (x + 40, y))?;
        y += step;
    }
    Ok(())
}

/// Series `i` gets colour `i mod 10` and one of three marker shapes, so series stay apart past
/// the palette's length and in greyscale.
fn draw_marker<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    i: usize,
    (x, y): (i32, i32),
) -> Result<(), String> {
    let style = PALETTE[i % PALETTE.len()].filled();
    match i % 3 {
        0 => area.draw(&Circle::new((x, y), 4, style)),
        1 => area.draw(&Rectangle::new([(x - 4, y - 4), (x + 4, y + 4)], style)),
        _ => area.draw(&Polygon::new(
            vec![(x, y - 5), (x + 5, y + 4), (x - 5, y + 4)],
            style,
        )),
    }
    .map_err(drawing)
}

/// Shortens `text` with an ellipsis until it fits in `room` pixels.
fn fit_text<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    text: &str,
    style: &TextStyle,
    room: u32,
) -> Result<String, String> {
    let width = |t: &str| {
        area.estimate_text_size(t, style)
            .map(|s| s.0)
            .map_err(drawing)
    };
    if width(text)? <= room {
        return Ok(text.to_string());
    }
    // No legend has room for more than this many characters, and each try costs a layout.
    let mut chars: Vec<char> = text.chars().take(60).collect();
    while !chars.is_empty() {
        chars.pop();
        let shortened: String = chars.iter().chain(['…'].iter()).collect();
        if width(&shortened)? <= room {
            return Ok(shortened);
        }
    }
    Ok("…".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_size(path: &Path) -> (u32, u32) {
        let bytes = fs::read(path).unwrap();
        assert_eq!(
            &bytes[..8],
            b"\x89PNG\r\n\x1a\n",
            "not a PNG: {}",
            path.display()
        );
        assert_eq!(&bytes[12..16], b"IHDR");
        let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
        (be(16), be(20))
    }

    fn niah() -> (Vec<usize>, Vec<f64>, Vec<Vec<Option<f64>>>) {
        let lengths = vec![1024, 2048, 4096, 8192, 16384, 32768];
        let depths: Vec<f64> = (0..=10).map(|d| f64::from(d) * 10.0).collect();
        let scores = depths
            .iter()
            .map(|d| {
                lengths
                    .iter()
                    .map(|&l| {
                        if l == 32768 && *d > 50.0 {
                            None
                        } else {
                            Some((100.0 - (l as f64).log2() * 4.0 - d * 0.3).max(0.0))
                        }
                    })
                    .collect()
            })
            .collect();
        (lengths, depths, scores)
    }

    #[test]
    fn colour_scale_endpoints_and_midpoint() {
        assert_eq!(score_colour(0.0), (0xF0, 0x49, 0x6E));
        assert_eq!(score_colour(50.0), (0xEB, 0xB8, 0x39));
        assert_eq!(score_colour(100.0), (0x0C, 0xD7, 0x9F));
        assert_eq!(score_colour(-5.0), score_colour(0.0));
        assert_eq!(score_colour(250.0), score_colour(100.0));
        assert_eq!(score_colour(25.0), (0xEE, 0x81, 0x54));
    }

    #[test]
    fn length_labels() {
        assert_eq!(length_label(1024), "1k");
        assert_eq!(length_label(16384), "16k");
        assert_eq!(length_label(131072), "128k");
        assert_eq!(length_label(1536), "1.5k");
        assert_eq!(length_label(512), "0.5k");
        assert_eq!(length_label(1000), "1000");
        assert_eq!(length_label(1280), "1280");
        assert_eq!(length_label(0), "0");
        assert_eq!(length_label(1 << 20), "1M");
        assert_eq!(length_label(3 << 19), "1.5M");
    }

    #[test]
    fn heatmap_writes_a_png_of_the_expected_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("niah.png");
        let (lengths, depths, scores) = niah();
        heatmap(&path, "Needle in a haystack", &lengths, &depths, &scores).unwrap();
        let layout = HeatmapLayout::new(lengths.len(), depths.len());
        assert_eq!(png_size(&path), (layout.width, layout.height));
        assert_eq!(layout.width, 100 + 6 * 120 + 116);
        assert_eq!(layout.height, 66 + 11 * 40 + 72);
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "the scratch file must be renamed away");
    }

    #[test]
    fn small_heatmap_keeps_a_minimum_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("one.png");
        heatmap(&path, "One cell", &[4096], &[50.0], &[vec![Some(75.0)]]).unwrap();
        let (w, h) = png_size(&path);
        assert!(w >= 640, "width {w}");
        assert!(h >= 66 + 200 + 72, "height {h}");
    }

    #[test]
    fn heatmap_cells_take_the_score_colour() {
        let lengths = [1000, 2048];
        let depths = [100.0, 0.0];
        // Rows given bottom-up and with a missing cell, to check the sorting and the grey.
        let scores = vec![vec![Some(0.0), None], vec![Some(100.0), Some(50.0)]];
        let grid = HeatGrid::new(&lengths, &depths, &scores).unwrap();
        let layout = HeatmapLayout::new(2, 2);
        let (w, h) = (layout.width, layout.height);
        let mut buffer = vec![0u8; (w * h * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut buffer, (w, h)).into_drawing_area();
            ensure_font().unwrap();
            draw_heatmap(&root, &layout, "test", &grid).unwrap();
            root.present().unwrap();
        }
        // The score is printed in the middle of the cell, so probe beside it, at the middle height.
        let pixel = |row: usize, col: usize| {
            let ((x0, y0), (_, y1)) = layout.cell(row, col);
            let (x, y) = (x0 + 6, (y0 + y1) / 2);
            let i = ((y as u32 * w + x as u32) * 3) as usize;
            (buffer[i], buffer[i + 1], buffer[i + 2])
        };
        assert_eq!(pixel(0, 0), (0x0C, 0xD7, 0x9F), "depth 0 %, score 100");
        assert_eq!(pixel(0, 1), (0xEB, 0xB8, 0x39), "depth 0 %, score 50");
        assert_eq!(pixel(1, 0), (0xF0, 0x49, 0x6E), "depth 100 %, score 0");
        assert_eq!(pixel(1, 1), (0xE6, 0xE6, 0xE6), "not measured");
    }

    #[test]
    fn curves_write_a_png_of_the_expected_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("curves.png");
        let series = [
            Series {
                name: "passkey".into(),
                points: vec![(4096, 100.0), (1024, 100.0), (16384, 92.0), (65536, 70.0)],
            },
            Series {
                name: "niah".into(),
                points: vec![(1024, 98.0), (4096, f64::NAN), (16384, 80.0), (65536, 41.0)],
            },
        ];
        let fit = Series {
            name: "log-length fit".into(),
            points: vec![(1024, 101.0), (65536, 55.0)],
        };
        curves(
            &path,
            "Scores",
            "Score",
            &series,
            Some((0.0, 100.0)),
            Some((85.6, "MECW threshold")),
            Some(&fit),
        )
        .unwrap();
        assert_eq!(png_size(&path), (900, 560));
    }

    #[test]
    fn a_single_point_still_draws() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("one.png");
        let series = [Series {
            name: "ppl".into(),
            points: vec![(8192, 6.5)],
        }];
        curves(&path, "Perplexity", "Perplexity", &series, None, None, None).unwrap();
        assert_eq!(png_size(&path), (900, 560));
    }

    #[test]
    fn nice_ticks_are_round() {
        assert_eq!(
            nice_ticks(0.0, 100.0, 8),
            (vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0], 0)
        );
        let (ticks, decimals) = nice_ticks(5.2, 7.9, 8);
        assert_eq!(decimals, 1);
        assert_eq!(ticks.len(), 5);
        assert!((ticks[0] - 5.5).abs() < 1e-9);
    }

    fn err_of(result: Result<(), PlotError>) -> String {
        result.unwrap_err().to_string()
    }

    #[test]
    fn bad_heatmap_input_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.png");
        let one_row = [vec![Some(1.0)]];
        let cases = [
            (
                err_of(heatmap(&path, "t", &[], &[0.0], &[vec![]])),
                "no context lengths",
            ),
            (
                err_of(heatmap(&path, "t", &[1024], &[], &[])),
                "no needle depths",
            ),
            (
                err_of(heatmap(&path, "t", &[1024], &[0.0, 50.0], &one_row)),
                "1 rows of scores for 2 depths",
            ),
            (
                err_of(heatmap(&path, "t", &[1024, 2048], &[0.0], &one_row)),
                "score row 0 has 1 values for 2 lengths",
            ),
            (
                err_of(heatmap(
                    &path,
                    "t",
                    &[1024],
                    &[0.0],
                    &[vec![Some(f64::NAN)]],
                )),
                "no finite scores",
            ),
            (
                err_of(heatmap(&path, "t", &[1024], &[f64::NAN], &one_row)),
                "is not a number",
            ),
        ];
        for (message, expected) in cases {
            assert!(message.contains(expected), "{message}");
            assert!(message.contains(&path.display().to_string()), "{message}");
        }
        assert!(!path.exists());
    }

    #[test]
    fn bad_curves_input_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.png");
        let empty = [Series {
            name: "nothing".into(),
            points: vec![(1024, f64::NAN), (0, 5.0), (2048, f64::INFINITY)],
        }];
        let good = [Series {
            name: "good".into(),
            points: vec![(1024, 1.0)],
        }];
        let cases = [
            (
                err_of(curves(&path, "t", "y", &[], None, None, None)),
                "no series",
            ),
            (
                err_of(curves(&path, "t", "y", &empty, None, None, None)),
                "no series has a finite value",
            ),
            (
                err_of(curves(&path, "t", "y", &good, Some((5.0, 5.0)), None, None)),
                "y range",
            ),
            (
                err_of(curves(
                    &path,
                    "t",
                    "y",
                    &good,
                    None,
                    Some((f64::NAN, "x")),
                    None,
                )),
                "threshold",
            ),
        ];
        for (message, expected) in cases {
            assert!(message.contains(expected), "{message}");
        }
        assert!(!path.exists());
        // One empty series beside a good one is only left out, not an error.
        curves(
            &path,
            "t",
            "y",
            &[empty[0].clone(), good[0].clone()],
            None,
            None,
            None,
        )
        .unwrap();
        assert!(path.exists());
    }

    #[test]
    fn oversized_heatmap_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.png");
        let lengths: Vec<usize> = (1..=1000).map(|i| i * 1024).collect();
        let scores = vec![vec![Some(50.0); lengths.len()]];
        let message = err_of(heatmap(&path, "t", &lengths, &[0.0], &scores));
        assert!(message.contains("too many"), "{message}");
    }

    #[test]
    fn a_threshold_outside_a_fixed_range_still_draws() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.png");
        let series = [Series {
            name: "s".into(),
            points: vec![(1024, 50.0), (2048, 40.0)],
        }];
        curves(
            &path,
            "t",
            "y",
            &series,
            Some((0.0, 100.0)),
            Some((120.0, "above")),
            None,
        )
        .unwrap();
        assert_eq!(png_size(&path), (900, 560));
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent").join("plot.png");
        let series = [Series {
            name: "s".into(),
            points: vec![(1024, 1.0)],
        }];
        let message = err_of(curves(&path, "t", "y", &series, None, None, None));
        assert!(message.contains("does not exist"), "{message}");
        assert!(
            message.starts_with(&format!("cannot draw {}", path.display())),
            "{message}"
        );
        let message = err_of(heatmap(&path, "t", &[1024], &[0.0], &[vec![Some(1.0)]]));
        assert!(message.contains("does not exist"), "{message}");
    }
}
