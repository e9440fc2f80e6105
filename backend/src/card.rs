//! Link-preview images: a neuron's card (its top tokens as bars) and a concept's card (every
//! neuron's score, layer by layer) as 1200 × 630 PNGs (the size Open Graph and Twitter cards show), drawn with plotters on a bitmap and encoded with `png`. The font (DejaVu Sans,
//! free licence, see `assets/DejaVuSans.LICENSE`) is compiled in, so the image is the same on any
//! machine and needs no system fonts.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{Error, Result};

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
pub const WIDTH: u32 = 1200;
pub const HEIGHT: u32 = 630;

fn font_ready() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::other("the card font could not be loaded").into())
    }
}

fn draw_err(e: impl std::fmt::Display) -> Error {
    std::io::Error::other(format!("drawing the card: {e}")).into()
}

const BACKGROUND: RGBColor = RGBColor(248, 249, 251);
const INK: RGBColor = RGBColor(29, 35, 48);
const MUTED: RGBColor = RGBColor(90, 98, 112);
const WARM: RGBColor = RGBColor(216, 87, 42);
const COOL: RGBColor = RGBColor(59, 111, 216);

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// Draw a card's frame, title and subtitle, let `body` draw the rest, and encode the PNG.
fn card(title: &str, subtitle: &str, body: impl FnOnce(&Area) -> Result<()>) -> Result<Vec<u8>> {
    font_ready()?;
    let (w, h) = (WIDTH as i32, HEIGHT as i32);
    let mut rgb = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&BACKGROUND).map_err(draw_err)?;
        root.draw(&Rectangle::new([(0, 0), (w, 12)], INK.filled())).map_err(draw_err)?;
        root.draw_text(&shorten(title, 34), &("sans-serif", 58).into_font().color(&INK), (48, 40)).map_err(draw_err)?;
        root.draw_text(&shorten(subtitle, 72), &("sans-serif", 28).into_font().color(&MUTED), (50, 112)).map_err(draw_err)?;
        body(&root)?;
        root.draw_text("Flash Interp", &("sans-serif", 24).into_font().color(&MUTED), (w - 200, h - 44)).map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    let mut out = Vec::with_capacity(64 << 10);
    {
        let mut enc = png::Encoder::new(&mut out, WIDTH, HEIGHT);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(draw_err)?;
        writer.write_image_data(&rgb).map_err(draw_err)?;
    }
    Ok(out)
}

/// A card: a title, a subtitle, and up to ten labelled bars (`(label, value)`, the largest
/// first), as PNG bytes.
pub fn bars_png(title: &str, subtitle: &str, bars: &[(String, f32)]) -> Result<Vec<u8>> {
    let w = WIDTH as i32;
    card(title, subtitle, |root| {
        let ink = INK;
        let bars = &bars[..bars.len().min(10)];
        let max = bars.iter().map(|b| b.1).fold(f32::MIN_POSITIVE, f32::max);
        let (x0, x1, top, row) = (330, w - 150, 175, 42);
        let label = ("sans-serif", 30).into_font().color(&ink).pos(Pos::new(HPos::Right, VPos::Center));
        let value = ("sans-serif", 24).into_font().color(&RGBColor(90, 98, 112)).pos(Pos::new(HPos::Left, VPos::Center));
        for (i, (text, v)) in bars.iter().enumerate() {
            let y = top + i as i32 * row;
            let len = ((v / max).clamp(0.0, 1.0) * (x1 - x0) as f32) as i32;
            root.draw(&Rectangle::new([(x0, y + 6), (x0 + len.max(2), y + row - 6)], RGBColor(216, 87, 42).filled())).map_err(draw_err)?;
            root.draw_text(&format!("“{}”", shorten(text, 22)), &label, (x0 - 16, y + row / 2)).map_err(draw_err)?;
            root.draw_text(&format!("{v:.2}"), &value, (x0 + len.max(2) + 10, y + row / 2)).map_err(draw_err)?;
        }
        Ok(())
    })
}

/// Where a concept card's plot sits: x from `PLOT_X0` to `PLOT_X1`, y from `PLOT_Y0` (top) to
/// `PLOT_Y1`.
pub const PLOT_X0: i32 = 90;
pub const PLOT_X1: i32 = 1150;
pub const PLOT_Y0: i32 = 170;
pub const PLOT_Y1: i32 = 540;

/// A concept's card: every neuron's signed score (`layers[l][n]`, pos above zero, neg below),
/// layer after layer as on the search page, in alternating bands; each pixel column shows the
/// range of the neurons it covers, so no neuron's spike is lost at any model size. `marks` label
/// the strongest neurons (`(layer, neuron, label)`).
pub fn layers_png(title: &str, subtitle: &str, layers: &[Vec<f32>], marks: &[(usize, usize, String)]) -> Result<Vec<u8>> {
    let d_ff = layers.first().map_or(0, |l| l.len());
    let total = layers.len() * d_ff;
    if total == 0 {
        return Err(Error::bad("a concept card needs at least one neuron"));
    }
    card(title, subtitle, |root| {
        let scores = || layers.iter().flatten().copied().filter(|x| x.is_finite());
        let top = scores().fold(0.0f32, f32::max).max(1e-6);
        let bottom = scores().fold(0.0f32, f32::min).min(-1e-6);
        let span = top - bottom;
        let y = |v: f32| PLOT_Y1 - (((v - bottom) / span).clamp(0.0, 1.0) * (PLOT_Y1 - PLOT_Y0) as f32).round() as i32;
        let width = (PLOT_X1 - PLOT_X0) as usize;
        let x_of = |i: usize| PLOT_X0 + (i * width / total) as i32;
        let label = ("sans-serif", 20).into_font().color(&MUTED).pos(Pos::new(HPos::Center, VPos::Top));
        for l in 0..layers.len() {
            let (a, b) = (x_of(l * d_ff), x_of((l + 1) * d_ff));
            if l % 2 == 1 {
                root.draw(&Rectangle::new([(a, PLOT_Y0), (b, PLOT_Y1)], RGBColor(238, 240, 244).filled())).map_err(draw_err)?;
            }
            if layers.len() <= 12 || l % 5 == 0 || l + 1 == layers.len() {
                root.draw_text(&l.to_string(), &label, ((a + b) / 2, PLOT_Y1 + 8)).map_err(draw_err)?;
            }
        }
        root.draw(&PathElement::new(vec![(PLOT_X0, y(0.0)), (PLOT_X1, y(0.0))], MUTED)).map_err(draw_err)?;
        let flat: Vec<f32> = layers.iter().flatten().map(|&x| if x.is_finite() { x } else { 0.0 }).collect();
        for px in 0..width {
            let (i0, i1) = (px * total / width, ((px + 1) * total / width).max(px * total / width + 1).min(total));
            let (lo, hi) = flat[i0..i1].iter().fold((0.0f32, 0.0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            let x = PLOT_X0 + px as i32;
            if hi > 0.0 {
                root.draw(&PathElement::new(vec![(x, y(0.0)), (x, y(hi))], WARM)).map_err(draw_err)?;
            }
            if lo < 0.0 {
                root.draw(&PathElement::new(vec![(x, y(0.0)), (x, y(lo))], COOL)).map_err(draw_err)?;
            }
        }
        let tag = ("sans-serif", 22).into_font().color(&INK).pos(Pos::new(HPos::Left, VPos::Center));
        for (layer, neuron, text) in marks {
            let Some(&v) = layers.get(*layer).and_then(|l| l.get(*neuron)) else { continue };
            let (x, yy) = (x_of(layer * d_ff + neuron), y(v));
            root.draw(&Circle::new((x, yy), 6, INK.filled())).map_err(draw_err)?;
            let tx = if x > PLOT_X1 - 160 { x - 150 } else { x + 12 };
            root.draw_text(text, &tag, (tx, yy)).map_err(draw_err)?;
        }
        root.draw_text("layer", &("sans-serif", 20).into_font().color(&MUTED), (PLOT_X0, PLOT_Y1 + 34)).map_err(draw_err)?;
        Ok(())
    })
}

/// `s`, or its first `n - 1` characters and an ellipsis when it is longer than `n`.
pub(crate) fn shorten(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(png_bytes: &[u8]) -> (png::OutputInfo, Vec<u8>) {
        let mut r = png::Decoder::new(png_bytes).read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).unwrap();
        (info, buf)
    }

    #[test]
    fn a_concept_card_shows_every_neuron_spike_where_its_index_falls() {
        // 4 layers × 5000 neurons (more neurons than pixels); one pos spike, one neg dip.
        let mut layers = vec![vec![0.01f32; 5000]; 4];
        layers[2][1234] = 4.0;
        layers[0][10] = -2.0;
        let png_bytes = layers_png("“ dog” neurons", "up view", &layers, &[(2, 1234, "2:1234".into())]).unwrap();
        let (info, buf) = decode(&png_bytes);
        assert_eq!((info.width, info.height), (WIDTH, HEIGHT));
        let px = |x: i32, y: i32| {
            let i = ((y as u32 * WIDTH + x as u32) * 3) as usize;
            (buf[i], buf[i + 1], buf[i + 2])
        };
        let total = 4 * 5000;
        let width = (PLOT_X1 - PLOT_X0) as usize;
        let col = |i: usize| PLOT_X0 + (i * width / total) as i32;
        let (xs, xd) = (col(2 * 5000 + 1234), col(10));
        // The scale runs from -2 (bottom) to 4 (top): zero sits a third of the way up.
        let zero = PLOT_Y1 - (PLOT_Y1 - PLOT_Y0) / 3;
        let warm = (WARM.0, WARM.1, WARM.2);
        let cool = (COOL.0, COOL.1, COOL.2);
        assert_eq!(px(xs, PLOT_Y0 + 20), warm, "the spike reaches the top");
        assert_eq!(px(xd, PLOT_Y1 - 5), cool, "the dip reaches the bottom");
        // Elsewhere nothing rises far from zero.
        let quiet = col(3 * 5000 + 2500);
        assert!((PLOT_Y0..zero - 10).all(|y| px(quiet, y) != warm));
        assert!((zero + 10..PLOT_Y1).all(|y| px(quiet, y) != cool));
        assert!(layers_png("t", "s", &[], &[]).is_err());
    }

    #[test]
    fn a_card_is_a_png_of_the_card_size_with_ink_where_the_bars_are() {
        let bars: Vec<(String, f32)> = vec![(" dog".into(), 4.0), ("Dog".into(), 2.0), ("a very long token that gets cut".into(), 0.5)];
        let png_bytes = bars_png("Neuron 29:808", "SmolLM2 · up view · neg", &bars).unwrap();
        let dec = png::Decoder::new(&png_bytes[..]);
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (WIDTH, HEIGHT));
        let px = |x: u32, y: u32| {
            let i = ((y * WIDTH + x) * 3) as usize;
            (buf[i], buf[i + 1], buf[i + 2])
        };
        // The first bar is full length (orange), the second half as long: at 3/4 of the width
        // the first row is orange and the second is background.
        let x = 330 + (1050 - 330) * 3 / 4;
        assert_eq!(px(x, 175 + 21), (216, 87, 42));
        assert_eq!(px(x, 175 + 42 + 21), (248, 249, 251));
        // Text was drawn: the title area has dark pixels.
        assert!((48..600).any(|x| (40..100).any(|y| px(x, y).0 < 100)));
    }
}
